"""The dev metric of gate training: after each epoch, generate on the pair's dev set and score it with the evaluation
harness, the way the original chose its best epoch (SPEC §2-3). It is the default selection (`--select auto` with
dev data; `--select dev-metric`):

    loraflow train --language zh --task math ...                                  # math dev: accuracy
    loraflow train --language zh --task code ... --allow-code-execution           # code dev: pass@1 (sandbox)
    loraflow train ... --select dev-metric-strict    # the same generations, strict scoring
    loraflow train ... --select dev-loss             # no generation: the response-token loss (cheap)

The dev set is DATA_ROOT/dev/{language}_{task}_dev.jsonl (or --dev-file), its first --dev-limit items. As the
original evaluated it (SPEC §3 "Dev sets"): the evaluation prompts (for ru math the original's hard-coded system
prompt; MBPP's triple-quoted prompt), greedy decoding (`loraflow.eval.generate`, at most --dev-max-new-tokens new
tokens), the model in **fp32** (a bf16 base is cast up for the dev pass and back afterwards, which is exact;
--no-dev-fp32 keeps the training dtype) and the gate temperature of evaluation (1.1 for zh/ru math, else 1.0;
--dev-temperature). Each process generates every world_size-th item; rank 0 writes
RUN_DIR/dev/epoch_{n}/predictions.jsonl and scores it exactly as `loraflow score` does (results.json and the
scored lines beside it). `dev-metric` takes the faithful number: math dev accuracy (GSM8KZeroPost of the generation
against GSM8KPost of the whole worked answer, so items whose worked answer does not end in a bare number can never
count) or code dev pass@1 (`generation.split("\\n\\n")[1]`, a failure where there is no blank line).
`dev-metric-strict` takes `accuracy_strict` / `pass@1_strict`. The best epoch is the one with the highest metric,
ties going to the lower dev loss, then to the earlier epoch.

Not with --fsdp: generating on a sharded model would need every process in lockstep, token by token.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import LoraflowError


def check_dev_metric_config(cfg) -> None:
    """What `--dev-metric` needs, checked before anything is loaded (a `TrainConfig`)."""
    from loraflow.eval.registry import require_code_execution, resolve_task

    if not cfg.dev_metric:
        return
    flag = f"--select {cfg.select}"
    if cfg.language is None or cfg.task is None:
        raise LoraflowError(f"{flag} needs --language and --task: the dev set and its scorer come from the pair")
    try:
        task = resolve_task(cfg.task, "dev")
    except LoraflowError:
        raise LoraflowError(f"{flag}: there is no dev benchmark for task {cfg.task!r} (math or code); select the "
                            "epoch by dev loss (--select dev-loss)") from None
    require_code_execution(task, cfg.allow_code_execution, f"{flag} (or --select dev-loss): ")
    if cfg.fsdp:
        raise LoraflowError(f"{flag} does not work with --fsdp (generation on a sharded base); use --select dev-loss "
                            "and choose the epoch afterwards with scripts/eval.sh SPLIT=dev on each epoch_N gate")


@contextmanager
def running_in(module, dtype):
    """Every floating parameter and buffer of `module` in `dtype` inside the block, back to its own dtype after.

    Parameters keep their identity (the optimizer holds them); bf16 -> fp32 -> bf16 is exact, and fp32 gates are
    untouched.
    """
    tensors = [(p, p.dtype) for p in module.parameters()]
    buffers = [(m, name, b.dtype) for m in module.modules() for name, b in m._buffers.items()
               if b is not None and b.is_floating_point()]
    if all(d == dtype or not p.is_floating_point() for p, d in tensors):
        yield
        return
    try:
        for p, d in tensors:
            if p.is_floating_point() and d != dtype:
                p.data = p.data.to(dtype)
        for m, name, _ in buffers:
            m._buffers[name] = m._buffers[name].to(dtype)
        yield
    finally:
        for p, d in tensors:
            if p.dtype != d:
                p.data = p.data.to(d)
        for m, name, d in buffers:
            m._buffers[name] = m._buffers[name].to(d)


@contextmanager
def gate_temperature(flow, temperature: float | None):
    """The gates at `temperature` inside the block (None: unchanged), back to the training temperature after."""
    if temperature is None:
        yield
        return
    before = flow.temperature
    flow.set_temperature(temperature)
    try:
        yield
    finally:
        flow.set_temperature(before)


@dataclass
class DevMetric:
    """The dev benchmark of one run: items with their prompts, how to decode and score, where the data is."""

    task: object  # loraflow.eval.registry.Benchmark
    language: str
    data: str  # the dev data file
    items: list[dict]  # {"id", "prompt"}
    decode: object  # loraflow.eval.generate.DecodeConfig
    tokenizer: object
    allow_code_execution: bool
    name: str  # the metric of results.json that selects: "accuracy", "pass@1", or their `_strict` twins
    temperature: float | None = None  # --dev-temperature (None: the registry's default for the pair)
    fp32: bool = True  # generate with the model cast to fp32

    def __call__(self, flow, info, out_dir: Path) -> float:
        """Generate (each process its share), score on rank 0, and return the metric on every process."""
        import torch
        import torch.distributed as dist

        from loraflow.eval import score
        from loraflow.eval.generate import generate_texts
        from loraflow.eval.predictions import write_predictions
        from loraflow.eval.registry import resolve_temperature

        # the one temperature rule: --dev-temperature if given, else the pair's evaluation default (the original
        # scored the dev set like the test set, SPEC §3: 1.1 for zh/ru math), not the gate's training temperature
        temperature, source = resolve_temperature(self.temperature, None, self.language, self.task.domain)
        mine = list(range(info.rank, len(self.items), info.world_size))
        with running_in(flow, torch.float32) if self.fp32 else nullcontext(), \
                gate_temperature(flow, temperature):
            texts = generate_texts(flow, self.tokenizer, [self.items[i]["prompt"] for i in mine], self.decode)
        pairs = list(zip(mine, texts))
        if info.enabled:
            gathered = [None] * info.world_size
            dist.all_gather_object(gathered, pairs)
            pairs = [p for part in gathered for p in part]
        value = [None]
        if info.master:
            by_index = dict(pairs)
            rows = []
            for i, item in enumerate(self.items):
                text = by_index[i]
                generation = ({"generation": text[0], "generation_original": text[1]} if isinstance(text, tuple)
                              else {"generation": text})
                rows.append({"id": item["id"], "task": self.task.name, "language": self.language, "split": "dev",
                             "method": "flow", "prompt": item["prompt"], **generation})
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
    when the epoch is selected by dev loss."""
    if not cfg.dev_metric:
        return None
    from loraflow.data.prompts import FAITHFUL
    from loraflow.eval.generate import DecodeConfig
    from loraflow.eval.registry import build_prompt, load_records, load_system_prompts, prompt_has_bos, resolve_task

    task = resolve_task(cfg.task, "dev")
    records, source = load_records(task, cfg.language, cfg.data_root, cfg.dev_file)
    records = records[:cfg.dev_limit]
    system_prompts = load_system_prompts(cfg.data_root)
    prompts = [build_prompt(task, r, cfg.language, cfg.prompt_style, system_prompts, tokenizer) for r in records]
    decode = DecodeConfig(max_new_tokens=cfg.dev_max_new_tokens, batch_size=cfg.dev_batch_size, stop=task.stop,
                          add_special_tokens=not prompt_has_bos(tokenizer, prompts[0]),
                          original_view=cfg.prompt_style == FAITHFUL)
    items = [{"id": str(r["id"]), "prompt": p} for r, p in zip(records, prompts)]
    name = task.metrics[0] + ("_strict" if cfg.select == "dev-metric-strict" else "")
    return DevMetric(task, cfg.language, source, items, decode, tokenizer, cfg.allow_code_execution, name,
                     temperature=cfg.dev_temperature, fp32=cfg.dev_fp32)
