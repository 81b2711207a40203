"""`loraflow eval`: generate for one benchmark with one fusion method, then score (as `loraflow score` does).

  loraflow eval --task math --language zh --split test --method flow --gate checkpoints/Gates/zh_math \\
      --base-model meta-llama/Llama-2-7b-hf --lora-root checkpoints/LoRAs --data-root data --out-dir outputs/eval

Methods (the rows of the paper's table): `base` (no LoRA), `lang` / `task` (one LoRA: `{lang}_lora`,
`{task}_lora` under --lora-root), `average` (static 1/k each), `lorahub` (static weights from a LoRA-Hub search
on the training examples, saved to and reused from `OUT_DIR/lorahub_{lang}_{task}.json`), `flow` (a gate; its
temperature is --temperature, else the gate file's, else 1.1 for zh-math and ru-math and 1.0 otherwise, as in the
original: `registry.resolve_temperature`; run.json records which it was, `temperature_source`).
--task is `math` or `code` with --split test|dev, or a benchmark name: mgsm, math-dev, humaneval, code-dev.

Writes into `OUT_DIR/{benchmark}_{lang}/{name}/` (name = the method unless --name): `predictions.jsonl`
(resumable: rerun the same command after a crash and finished items are kept), `run.json` (what generated the
predictions; a rerun with a different configuration is refused), `results.json` and `results.md`.
Code benchmarks run model-written programs: they need --allow-code-execution (checked before anything runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from loraflow.devices import add_device_arguments, resolve_device, resolve_dtype
from loraflow.errors import LoraflowError
from loraflow.eval.generate import DecodeConfig, generate_predictions, read_predictions
from loraflow.eval.methods import gate_sha256, load_method_model, lorahub_examples
from loraflow.eval.registry import (
    FAITHFUL,
    METHODS,
    PROMPT_STYLES,
    Benchmark,
    build_prompt,
    canonical_style,
    check_language,
    data_file,
    get_method,
    load_records,
    load_system_prompts,
    lora_paths,
    prompt_has_bos,
    require_code_execution,
    resolve_task,
    resolve_temperature,
    static_weights,
)
from loraflow.eval.repair import RELEASED, VARIANTS
from loraflow.eval.score import score_predictions
from loraflow.files import atomic_write_json, atomic_write_text, read_json
from loraflow.versions import versions

# run.json keys that change generations: a rerun that differs in one of them may not reuse the predictions
GENERATION_KEYS = ("task", "language", "split", "method", "base", "gguf_file", "loras", "gate", "gate_sha256",
                   "temperature", "static_weights", "prompt_style", "variant", "decode", "dtype", "engine")


@dataclass
class EvalConfig:
    """Everything `loraflow eval` needs (one field per flag)."""

    task: str
    language: str
    method: str
    base_model: str
    gguf_file: str | None = None
    split: str | None = None
    gate: str | None = None
    lora_root: str = "checkpoints/LoRAs"
    lang_lora: str | None = None
    task_lora: str | None = None
    data_root: str = "data"
    data: str | None = None
    out_dir: str = "outputs/eval"
    name: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    max_prompt_tokens: int = 2048
    stop: list[str] | None = None
    temperature: float | None = None
    prompt_style: str = FAITHFUL
    allow_code_execution: bool = False
    timeout: float = 3.0
    dtype: str = "float32"  # faithful evaluation runs in fp32, as the original (SPEC §3)
    device: str = "auto"
    lorahub_budget: int = 40
    lorahub_examples: int | None = None
    lorahub_seed: int = 0
    no_progress: bool = False
    check_lora_names: bool = True
    variant: str = RELEASED
    engine: str = "hf"  # "hf" | "vllm"
    tensor_parallel_size: int = 1  # --engine vllm

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalConfig:
        if not getattr(args, "base_model", None):
            raise LoraflowError("--base-model is required: the base model, a folder or hub id")
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True,
                   help="math | code (with --split), or mgsm | math-dev | humaneval | code-dev")
    p.add_argument("--language", required=True, help="zh, ru, es (the release), or any language with data (e.g. en)")
    p.add_argument("--split", choices=("test", "dev"), help="test (default) or dev")
    p.add_argument("--method", required=True, choices=list(METHODS), help="fusion method (see above)")
    p.add_argument("--gate", help="gate for --method flow: a loraflow gate (folder or .safetensors) or an original .pt")
    p.add_argument("--base-model", dest="base_model", help="base model: a folder or hub id (its tokenizer is used)")
    p.add_argument("--base", dest="base_model", help=argparse.SUPPRESS)  # the old spelling, for one release
    p.add_argument("--gguf-file", help="the base is this GGUF file in the --base-model folder or hub repo")
    p.add_argument("--lora-root", default="checkpoints/LoRAs", help="holds {lang}_lora and {task}_lora")
    p.add_argument("--lang-lora", help="the language LoRA (default: LORA_ROOT/{lang}_lora)")
    p.add_argument("--task-lora", help="the task LoRA (default: LORA_ROOT/{task}_lora)")
    p.add_argument("--data-root", default="data", help="holds test/ dev/ train/ and system_prompts.json")
    p.add_argument("--data", help="the evaluation data file itself (overrides --data-root's)")
    p.add_argument("--out-dir", default="outputs/eval", help="where run folders and LoRA-Hub weights go")
    p.add_argument("--name", help="run folder name (default: the method), e.g. flow-epoch3")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--max-new-tokens", type=int, help="default: the task's (512)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="prompts keep their last N tokens (2048)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="also stop a row at this text (repeatable; default: only EOS, as the original)")
    p.add_argument("--temperature", type=float, help="gate temperature for flow (default: the gate file's, else "
                                                     "1.1 for zh/ru math and 1.0 otherwise)")
    p.add_argument("--no-check-lora-names", dest="check_lora_names", action="store_false",
                   help="load a gate whose gate.json names other LoRAs (same count and shapes, e.g. renamed copies)")
    p.add_argument("--variant", choices=VARIANTS, default=RELEASED,
                   help="humaneval: faithful = the translated prompts as released; repaired = the English prompts "
                        "with the translated docstrings (loraflow/eval/repair.py), reported separately")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default=FAITHFUL,
                   help="faithful: the original [INST] prompts; chat-template: the tokenizer's chat template")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written programs (code tasks; sandboxed, but not a security boundary)")
    p.add_argument("--timeout", type=float, default=3.0, help="code tasks: seconds per program (3, as the original)")
    add_device_arguments(p)
    # faithful evaluation runs in fp32, as the original did (SPEC §3): no `auto` -> bf16 on CUDA here
    p.set_defaults(dtype="float32")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: transformers generate; vllm: a vLLM engine on a model folder written for the method")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: GPUs per model (1)")
    p.add_argument("--lorahub-budget", type=int, default=40, help="LoRA-Hub: loss evaluations (40)")
    p.add_argument("--lorahub-examples", type=int, help="LoRA-Hub: use the first N training examples (default all)")
    p.add_argument("--lorahub-seed", type=int, default=0, help="LoRA-Hub: seed (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------------------ planning

def _resolve(cfg: EvalConfig) -> dict:
    """Every check that needs neither the model nor the data, in the order a user would fix them."""
    task = resolve_task(cfg.task, cfg.split)
    language = check_language(cfg.language)
    require_code_execution(task, cfg.allow_code_execution)
    method = get_method(cfg.method)
    if method.mode == "flow" and not cfg.gate:
        raise LoraflowError("--method flow needs --gate (a loraflow gate or an original .pt)")
    if method.mode != "flow" and cfg.gate:
        raise LoraflowError(f"--gate is only used by --method flow, not {cfg.method}")
    if method.mode != "flow" and cfg.temperature is not None:
        raise LoraflowError(f"--temperature is the gate temperature: only --method flow has a gate, not {cfg.method}")
    if cfg.gate and not Path(cfg.gate).exists():
        raise LoraflowError(f"gate {cfg.gate}: not found")
    if cfg.temperature is not None and not cfg.temperature > 0:
        raise LoraflowError(f"--temperature must be > 0, got {cfg.temperature}")
    if not cfg.timeout > 0:
        raise LoraflowError(f"--timeout must be > 0 seconds, got {cfg.timeout}")
    if cfg.variant != RELEASED and task.name != "humaneval":
        raise LoraflowError(f"--variant {cfg.variant} is a HumanEval prompt set; {task.name} has only the faithful "
                            "prompts")
    if cfg.limit is not None and cfg.limit < 1:
        raise LoraflowError(f"--limit must be at least 1, got {cfg.limit}")
    if not cfg.data:
        data_file(task, language, cfg.data_root)  # an unknown language fails here, listing the languages there are
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens or task.max_new_tokens,
                          max_prompt_tokens=cfg.max_prompt_tokens, batch_size=cfg.batch_size,
                          stop=tuple(cfg.stop) if cfg.stop else task.stop)
    lang_lora = cfg.lang_lora or str(Path(cfg.lora_root) / f"{language}_lora")
    task_lora = cfg.task_lora or str(Path(cfg.lora_root) / f"{task.domain}_lora")
    loras = lora_paths(cfg.method, lang_lora, task_lora)
    for lora in loras:
        if not Path(lora).exists():
            which = "language" if lora == lang_lora else "task"
            raise LoraflowError(f"the {which} LoRA {lora} does not exist (method {cfg.method} needs "
                                f"{' and '.join(loras)}; set --lora-root, --lang-lora or --task-lora)")
    temperature = source = None
    if method.mode == "flow":
        temperature, source = resolve_temperature(cfg.temperature, cfg.gate, language, task.domain)
    return {"task": task, "language": language, "decode": decode, "loras": loras, "temperature": temperature,
            "temperature_source": source}


def run_dir(out_dir: str | os.PathLike, task: Benchmark, language: str, name: str) -> Path:
    return Path(out_dir) / f"{task.name}_{language}" / name


def lorahub_path(out_dir: str | os.PathLike, language: str, domain: str) -> Path:
    return Path(out_dir) / f"lorahub_{language}_{domain}.json"


def check_resume(run_json: Path, config: dict) -> None:
    """Refuse to add to predictions made under another configuration (keys in `GENERATION_KEYS` both know)."""
    if not run_json.is_file():
        return
    old, config = read_json(run_json), json.loads(json.dumps(config))  # compare as JSON: tuples are lists
    for c in (old, config):  # the batch size does not change greedy generations
        if isinstance(c.get("decode"), dict):
            c["decode"].pop("batch_size", None)
    differ = [k for k in GENERATION_KEYS if k in old and k in config and old[k] != config[k]]
    if differ:
        lines = "; ".join(f"{k}: {old[k]!r} before, {config[k]!r} now" for k in differ)
        raise LoraflowError(f"{run_json.parent} holds predictions from another configuration ({lines}). Use another "
                            "--out-dir or --name, or delete that folder to start over")


def base_dtype(model) -> str:
    """The dtype the base weights are in ("float32", ...): with no autocast, the dtype the model runs in."""
    from loraflow.fusion.model import is_gate_parameter

    return next(str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if not is_gate_parameter(n))


def _vllm_generator(cfg: EvalConfig, plan: dict, config: dict, out: Path, dtype: str, decode: DecodeConfig):
    """A vLLM engine on the method's model folder, with room for the longest prompt and its generation."""
    from loraflow.vllm.engine import VLLMGenerator, method_folder

    folder = method_folder(out, cfg.method, cfg.base_model, plan["loras"], cfg.gate, plan["temperature"],
                           config.get("static_weights"))
    positions = read_json(Path(folder) / "config.json").get("max_position_embeddings")
    length = decode.max_prompt_tokens + decode.max_new_tokens
    return VLLMGenerator(folder, dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                         max_model_len=min(length, positions) if positions else length)


def markdown_summary(results: dict) -> str:
    metrics = results.get("metrics", {})
    head = "| task | language | split | method | " + " | ".join(metrics) + " | items |"
    sep = "|" + "---|" * (5 + len(metrics))
    values = " | ".join(f"{100 * v:.1f}" if isinstance(v, float) else str(v) for v in metrics.values())
    counts = results.get("counts", {})
    n = counts.get("ids_scored", counts.get("scored", ""))
    row = f"| {results['task']} | {results['language']} | {results['split']} | {results['method']} | {values} | {n} |"
    return "\n".join((head, sep, row)) + "\n"


# ---------------------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> int:
    run_eval(EvalConfig.from_args(args))
    return 0


def run_eval(cfg: EvalConfig) -> dict:
    """Generate (resuming what is there) and score one benchmark with one method; returns the results."""
    plan = _resolve(cfg)
    task, language, decode = plan["task"], plan["language"], plan["decode"]
    style = canonical_style(cfg.prompt_style)
    name = cfg.name or (cfg.method if cfg.variant == RELEASED else f"{cfg.method}-{cfg.variant}")
    records, data_source = load_records(task, language, cfg.data_root, cfg.data)
    if cfg.variant == "repaired":
        from loraflow.eval.humaneval import load_english_humaneval
        from loraflow.eval.repair import repaired_records

        records = repaired_records(records, load_english_humaneval(), data_source)
    if cfg.limit:
        records = records[:cfg.limit]
    from loraflow.bases import load_base_tokenizer

    tokenizer = load_base_tokenizer(cfg.base_model, cfg.gguf_file)
    system_prompts = load_system_prompts(cfg.data_root) if cfg.data_root else {}
    prompts = [build_prompt(task, r, language, style, system_prompts, tokenizer) for r in records]
    decode = DecodeConfig(**{**asdict(decode), "add_special_tokens": not prompt_has_bos(tokenizer, prompts[0]),
                             "original_view": style == FAITHFUL})
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)

    out = run_dir(cfg.out_dir, task, language, name)
    predictions, run_json = out / "predictions.jsonl", out / "run.json"
    config = {"task": task.name, "language": language, "split": task.split, "method": cfg.method, "name": name,
              "base": str(cfg.base_model), "gguf_file": cfg.gguf_file,
              "loras": plan["loras"], "gate": cfg.gate,
              "gate_sha256": gate_sha256(cfg.gate) if cfg.gate else None, "temperature": plan["temperature"],
              "temperature_source": plan["temperature_source"],
              "prompt_style": style, "variant": cfg.variant, "decode": asdict(decode), "dtype": dtype, "device": device,
              "data": data_source, "limit": cfg.limit, "engine": cfg.engine}
    hub_file = lorahub_path(cfg.out_dir, language, task.domain)
    if cfg.method == "lorahub" and hub_file.is_file():
        from loraflow.train.lorahub import load_weights

        config["static_weights"] = load_weights(hub_file)
    check_resume(run_json, config)

    items = [{"id": r["id"], "task": task.name, "language": language, "split": task.split, "method": cfg.method,
              "prompt": p} for r, p in zip(records, prompts)]
    done = {row["id"] for row in read_predictions(predictions)}
    todo = sum(1 for item in items if item["id"] not in done)
    log = (lambda *a: None) if cfg.no_progress else (lambda *a: print(*a, file=sys.stderr))
    log(f"{task.name} {language} ({task.split}), method {cfg.method}: {len(items)} items, {todo} to generate "
        f"-> {predictions}")
    if todo:
        # vLLM runs from a model folder; the LoRA-Hub search itself still runs on the HF model
        model = None
        if cfg.engine == "hf" or cfg.method == "lorahub":
            model = load_method_model(cfg.base_model, cfg.method, plan["loras"], gate=cfg.gate,
                                      temperature=plan["temperature"], dtype=dtype, device=device,
                                      check_lora_names=cfg.check_lora_names, gguf_file=cfg.gguf_file)
            ran = base_dtype(model)
            if ran != dtype:
                raise LoraflowError(f"asked for --dtype {dtype}, but the loaded model's weights are {ran}")
        if get_method(cfg.method).weights == "uniform":
            config["static_weights"] = static_weights(cfg.method, len(plan["loras"]))
        elif cfg.method == "lorahub":
            from loraflow.train.lorahub import LoraHubConfig, lorahub_weights

            hub_config = LoraHubConfig(budget=cfg.lorahub_budget, seed=cfg.lorahub_seed)
            weights, reused = lorahub_weights(
                model, lambda: lorahub_examples(task, language, cfg.data_root, tokenizer, prompt_style=style,
                                                limit=cfg.lorahub_examples),
                hub_file, hub_config, progress=not cfg.no_progress, language=language, task=task.domain)
            log(f"LoRA-Hub weights {[round(w, 4) for w in weights]} ({'reused' if reused else 'searched'}: "
                f"{hub_file})")
            model.set_mode("static", weights=static_weights(cfg.method, model.k, weights))
            config["static_weights"] = weights
            config["lorahub"] = asdict(hub_config)
            check_resume(run_json, config)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_json, config)
        if cfg.engine == "vllm":
            model = _vllm_generator(cfg, plan, config, out, dtype, decode)
        try:
            generate_predictions(model, tokenizer, items, predictions, decode, progress=not cfg.no_progress)
        finally:
            if cfg.engine == "vllm":
                model.close()
    elif not run_json.is_file():
        atomic_write_json(run_json, config)

    results = score_predictions(task, predictions, data_source if Path(data_source).is_file() else None,
                                data_root=cfg.data_root, language=language,
                                allow_code_execution=cfg.allow_code_execution, timeout=cfg.timeout)
    results.update({"task": task.name, "language": language, "split": task.split, "method": cfg.method,
                    "name": name, "variant": cfg.variant,
                    "config": {**read_json(run_json), **{k: config[k] for k in ("limit", "data")},
                                             "scoring": results.get("config", {})},
                    "versions": versions()})
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_summary(results))
    print(markdown_summary(results), end="")
    return results
