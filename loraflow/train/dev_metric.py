"""The dev metric of gate training: after each epoch, generate on the pair's dev set and score it with the
evaluation harness, the way the original chose its best epoch (SPEC §2).

    loraflow train --language zh --task math ... --dev-metric                          # math dev: accuracy
    loraflow train --language zh --task code ... --dev-metric --allow-code-execution   # code dev: pass@1 (sandbox)

The dev set is DATA_ROOT/dev/{language}_{task}_dev.jsonl (or --dev-file), its first --dev-limit items. Prompts are
the evaluation prompts of SPEC §3 (with --prompt-style chat-template, the tokenizer's chat template), decoding is
greedy (`loraflow.eval.generate`) with at most --dev-max-new-tokens new tokens. Each process generates every
world_size-th item; rank 0 writes RUN_DIR/dev/epoch_{n}/predictions.jsonl and scores it exactly as `loraflow score`
does (results.json and the scored lines beside it). The metric is the task's headline number: math dev accuracy
(the faithful extraction; `accuracy_strict` is in results.json too) or code dev pass@1. With a dev metric, the best
epoch is the one with the highest metric, ties going to the lower dev loss, then to the earlier epoch.

Not with --fsdp: generating on a sharded model would need every process in lockstep, token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import LoraflowError


def check_dev_metric_config(cfg) -> None:
    """What `--dev-metric` needs, checked before anything is loaded (a `TrainConfig`)."""
    from loraflow.eval.registry import require_code_execution, resolve_task

    if not cfg.dev_metric:
        return
    if cfg.language is None or cfg.task is None:
        raise LoraflowError("--dev-metric needs --language and --task: the dev set and its scorer come from the pair")
    try:
        task = resolve_task(cfg.task, "dev")
    except LoraflowError:
        raise LoraflowError(f"--dev-metric: there is no dev benchmark for task {cfg.task!r} (math or code); train "
                            "without it and select the epoch by dev loss") from None
    require_code_execution(task, cfg.allow_code_execution, "--dev-metric: ")
    if cfg.fsdp:
        raise LoraflowError("--dev-metric does not work with --fsdp (generation on a sharded base); select the epoch "
                            "afterwards with scripts/eval.sh SPLIT=dev on each epoch_N gate")


@dataclass
class DevMetric:
    """The dev benchmark of one run: items with their prompts, how to decode, where the data is."""

    task: object  # loraflow.eval.registry.Benchmark
    language: str
    data: str  # the dev data file
    items: list[dict]  # {"id", "prompt"}
    decode: object  # loraflow.eval.generate.DecodeConfig
    tokenizer: object
    allow_code_execution: bool

    @property
    def name(self) -> str:
        return self.task.metrics[0]

    def __call__(self, flow, info, out_dir: Path) -> float:
        """Generate (each process its share), score on rank 0, and return the metric on every process."""
        import torch.distributed as dist

        from loraflow.eval import score
        from loraflow.eval.generate import generate_texts
        from loraflow.eval.predictions import write_predictions
        from loraflow.eval.registry import resolve_temperature

        # the one temperature rule; the gate in training records its own temperature (no explicit value here)
        temperature, source = resolve_temperature(None, None, self.language, self.task.domain,
                                                  recorded=flow.temperature)
        flow.set_temperature(temperature)
        mine = list(range(info.rank, len(self.items), info.world_size))
        texts = generate_texts(flow, self.tokenizer, [self.items[i]["prompt"] for i in mine], self.decode)
        pairs = list(zip(mine, texts))
        if info.enabled:
            gathered = [None] * info.world_size
            dist.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        value = [None]
        if info.master:
            by_index = dict(pairs)
            rows = [{"id": item["id"], "task": self.task.name, "language": self.language, "split": "dev",
                     "method": "flow", "prompt": item["prompt"], "generation": by_index[i]}
                    for i, item in enumerate(self.items)]
            out_dir.mkdir(parents=True, exist_ok=True)
            predictions = out_dir / "predictions.jsonl"
            write_predictions(predictions, rows)
            results = score.score_predictions(self.task, predictions, self.data, data_root=None,
                                              language=self.language, allow_code_execution=self.allow_code_execution,
                                              config={"temperature": temperature, "temperature_source": source})
            value = [float(results["metrics"][self.name])]
        if info.enabled:
            dist.broadcast_object_list(value, src=0)
        return value[0]


def build_dev_metric(cfg, tokenizer) -> DevMetric | None:
    """The run's dev benchmark (data read and prompts built now, so bad data fails before the first step), or None
    without --dev-metric."""
    if not cfg.dev_metric:
        return None
    from loraflow.eval.generate import DecodeConfig
    from loraflow.eval.registry import build_prompt, load_records, load_system_prompts, prompt_has_bos, resolve_task

    task = resolve_task(cfg.task, "dev")
    records, source = load_records(task, cfg.language, cfg.data_root, cfg.dev_file)
    records = records[:cfg.dev_limit]
    system_prompts = load_system_prompts(cfg.data_root)
    prompts = [build_prompt(task, r, cfg.language, cfg.prompt_style, system_prompts, tokenizer) for r in records]
    decode = DecodeConfig(max_new_tokens=cfg.dev_max_new_tokens, batch_size=cfg.dev_batch_size, stop=task.stop,
                          add_special_tokens=not prompt_has_bos(tokenizer, prompts[0]))
    items = [{"id": str(r["id"]), "prompt": p} for r, p in zip(records, prompts)]
    return DevMetric(task, cfg.language, source, items, decode, tokenizer, cfg.allow_code_execution)
