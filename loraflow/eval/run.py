"""`loraflow eval`: generate for one benchmark with one fusion method, then score (as `loraflow score` does).

  loraflow eval --task math --language zh --split test --method flow --gate checkpoints/Gates/zh_math \\
      --base meta-llama/Llama-2-7b-hf --lora-root checkpoints/LoRAs --data-root data --out-dir outputs/eval

Methods (the rows of the paper's table): `base` (no LoRA), `lang` / `task` (one LoRA: `{lang}_lora`,
`{task}_lora` under --lora-root), `average` (static 1/k each), `lorahub` (static weights from a LoRA-Hub search
on the training examples, saved to and reused from `OUT_DIR/lorahub_{lang}_{task}.json`), `flow` (a gate; its
temperature is --temperature, else 1.1 for zh-math and ru-math and 1.0 otherwise, as in the original).
--task is `math` or `code` with --split test|dev, or a benchmark name: mgsm, math-dev, humaneval, code-dev.

Writes into `OUT_DIR/{benchmark}_{lang}/{name}/` (name = the method unless --name): `predictions.jsonl`
(resumable: rerun the same command after a crash and finished items are kept), `run.json` (what generated the
predictions; a rerun with a different configuration is refused), `results.json` and `results.md`.
Code benchmarks run model-written programs: they need --allow-code-execution (checked before anything runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..errors import LoraflowError
from ..files import atomic_write_json, atomic_write_text, read_json
from .generate import DecodeConfig, generate_predictions, read_predictions
from .tasks import (
    PROMPT_STYLES,
    EvalTask,
    build_prompt,
    check_language,
    data_file,
    load_records,
    load_system_prompts,
    prompt_has_bos,
    resolve_task,
)

METHODS = ("base", "lang", "task", "average", "lorahub", "flow")
# Gate temperature at inference (SPEC §1): the original used 1.1 for these gates, 1.0 for the others.
DEFAULT_TEMPERATURES = {("zh", "math"): 1.1, ("ru", "math"): 1.1}
# run.json keys that change generations: a rerun that differs in one of them may not reuse the predictions
GENERATION_KEYS = ("task", "language", "split", "method", "base", "loras", "gate", "gate_sha256", "temperature",
                   "static_weights", "prompt_style", "decode", "dtype", "engine")


def default_temperature(language: str, domain: str) -> float:
    return DEFAULT_TEMPERATURES.get((language, domain), 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True,
                   help="math | code (with --split), or mgsm | math-dev | humaneval | code-dev")
    p.add_argument("--language", required=True, help="zh, ru, es (the release), or any language with data (e.g. en)")
    p.add_argument("--split", choices=("test", "dev"), help="test (default) or dev")
    p.add_argument("--method", required=True, choices=METHODS, help="fusion method (see above)")
    p.add_argument("--gate", help="gate for --method flow: a loraflow gate (folder or .safetensors) or an original .pt")
    p.add_argument("--base", required=True, help="base model: a folder or hub id (its tokenizer is used)")
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
    p.add_argument("--temperature", type=float, help="gate temperature for flow (default 1.1 zh/ru math, else 1.0)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, default="faithful",
                   help="faithful: the original [INST] prompts; chat-template: the tokenizer's chat template")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written programs (code tasks; sandboxed, but not a security boundary)")
    p.add_argument("--timeout", type=float, default=3.0, help="code tasks: seconds per program (3, as the original)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: transformers generate; vllm: a vLLM engine on a model folder written for the method")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: GPUs per model (1)")
    p.add_argument("--lorahub-budget", type=int, default=40, help="LoRA-Hub: loss evaluations (40)")
    p.add_argument("--lorahub-examples", type=int, help="LoRA-Hub: use the first N training examples (default all)")
    p.add_argument("--lorahub-seed", type=int, default=0, help="LoRA-Hub: seed (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------------------------ planning

def _resolve(args) -> dict:
    """Every check that needs neither the model nor the data, in the order a user would fix them."""
    task = resolve_task(args.task, args.split)
    language = check_language(args.language)
    if task.needs_execution and not args.allow_code_execution:
        raise LoraflowError(f"{task.name} is scored by running the programs the model writes; pass "
                            "--allow-code-execution to allow it (they run in loraflow's sandbox: a separate, "
                            "resource-limited process, which is not a security boundary)")
    if args.method == "flow" and not args.gate:
        raise LoraflowError("--method flow needs --gate (a loraflow gate or an original .pt)")
    if args.method != "flow" and args.gate:
        raise LoraflowError(f"--gate is only used by --method flow, not {args.method}")
    if args.method != "flow" and args.temperature is not None:
        raise LoraflowError(f"--temperature is the gate temperature: only --method flow has a gate, not {args.method}")
    if args.gate and not Path(args.gate).exists():
        raise LoraflowError(f"gate {args.gate}: not found")
    if args.temperature is not None and not args.temperature > 0:
        raise LoraflowError(f"--temperature must be > 0, got {args.temperature}")
    if not args.timeout > 0:
        raise LoraflowError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.limit is not None and args.limit < 1:
        raise LoraflowError(f"--limit must be at least 1, got {args.limit}")
    if not args.data:
        data_file(task, language, args.data_root)  # an unknown language fails here, listing the languages there are
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens or task.max_new_tokens,
                          max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
                          stop=tuple(args.stop) if args.stop else task.stop)
    lang_lora = args.lang_lora or str(Path(args.lora_root) / f"{language}_lora")
    task_lora = args.task_lora or str(Path(args.lora_root) / f"{task.domain}_lora")
    loras = {"base": [], "lang": [lang_lora], "task": [task_lora]}.get(args.method, [lang_lora, task_lora])
    for lora in loras:
        if not Path(lora).exists():
            which = "language" if lora == lang_lora else "task"
            raise LoraflowError(f"the {which} LoRA {lora} does not exist (method {args.method} needs "
                                f"{' and '.join(loras)}; set --lora-root, --lang-lora or --task-lora)")
    temperature = None
    if args.method == "flow":
        temperature = args.temperature if args.temperature is not None else default_temperature(language, task.domain)
    return {"task": task, "language": language, "decode": decode, "loras": loras, "temperature": temperature}


def run_dir(out_dir: str | os.PathLike, task: EvalTask, language: str, name: str) -> Path:
    return Path(out_dir) / f"{task.name}_{language}" / name


def lorahub_path(out_dir: str | os.PathLike, language: str, domain: str) -> Path:
    return Path(out_dir) / f"lorahub_{language}_{domain}.json"


def _sha256(path: Path) -> str | None:
    from ..checkpoints import gate_files

    tensor_file = gate_files(path)[0]
    if not tensor_file.is_file():
        return None
    h = hashlib.sha256()
    with tensor_file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _versions() -> dict:
    import importlib.metadata as md

    out = {"loraflow": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "nevergrad"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# ------------------------------------------------------------------------------------------------------- model

def _device_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    return device, dtype


def load_model(args, plan: dict, device: str, dtype: str):
    """The model of one method: the plain base for `base`, else a FlowModel on the method's LoRAs."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if args.method == "base":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.base, dtype=torch_dtype).to(device).eval()
    from ..model import FlowModel

    k = len(plan["loras"])
    kwargs = {
        "lang": {"mode": "single", "lora": 0}, "task": {"mode": "single", "lora": 0},
        "average": {"mode": "static", "static_weights": [1.0 / k] * k},
        "lorahub": {"mode": "static", "static_weights": [1.0 / k] * k},  # replaced by the searched weights
        "flow": {"mode": "flow", "gate": args.gate, "temperature": plan["temperature"]},
    }[args.method]
    return FlowModel.from_pretrained(args.base, plan["loras"], torch_dtype=torch_dtype, device=device, **kwargs)


def _vllm_generator(args, plan: dict, config: dict, out: Path, dtype: str, decode: DecodeConfig):
    """A vLLM engine on the method's model folder, with room for the longest prompt and its generation."""
    from ..vllm.engine import VLLMGenerator, method_folder

    folder = method_folder(out, args.method, args.base, plan["loras"], args.gate, plan["temperature"],
                           config.get("static_weights"))
    positions = read_json(Path(folder) / "config.json").get("max_position_embeddings")
    length = decode.max_prompt_tokens + decode.max_new_tokens
    return VLLMGenerator(folder, dtype=dtype, tensor_parallel_size=args.tensor_parallel_size,
                         max_model_len=min(length, positions) if positions else length)


def lorahub_examples(args, plan: dict, tokenizer) -> list[dict]:
    """The training examples of `{lang}_{task}`, tokenised with the loss on the response only."""
    from ..data import load_split, training_example
    from ..prompts import system_prompt

    task, language = plan["task"], plan["language"]
    records = load_split(args.data_root, language, task.domain, "train")
    kind = records.kind
    if args.lorahub_examples:
        records = records[:args.lorahub_examples]
    system = system_prompt(load_system_prompts(args.data_root), language, task.domain)
    style = "llama2-chat" if args.prompt_style == "faithful" else "chat-template"
    return [training_example(tokenizer, r, kind, system, style=style) for r in records]


# ------------------------------------------------------------------------------------------------------ scoring

def score(task: EvalTask, predictions: Path, data: str | None, data_root: str | None, language: str,
          allow_code_execution: bool, timeout: float = 3.0) -> dict:
    """Exactly `loraflow score` on the finished predictions (it writes results.json and the scored lines beside
    them); returns its results."""
    from . import score as scoring

    scoring.run(argparse.Namespace(task=task.name, predictions=Path(predictions), data=Path(data) if data else None,
                                   data_root=Path(data_root or "data"), language=language,
                                   allow_code_execution=allow_code_execution, timeout=timeout, workers=None))
    return read_json(Path(predictions).parent / "results.json")


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

def run(args) -> int:
    plan = _resolve(args)
    task, language, decode = plan["task"], plan["language"], plan["decode"]
    name = args.name or args.method
    records, data_source = load_records(task, language, args.data_root, args.data)
    if args.limit:
        records = records[:args.limit]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    system_prompts = load_system_prompts(args.data_root) if args.data_root else {}
    prompts = [build_prompt(task, r, language, args.prompt_style, system_prompts, tokenizer) for r in records]
    decode = DecodeConfig(**{**asdict(decode), "add_special_tokens": not prompt_has_bos(tokenizer, prompts[0])})
    device, dtype = _device_dtype(args)

    out = run_dir(args.out_dir, task, language, name)
    predictions, run_json = out / "predictions.jsonl", out / "run.json"
    config = {"task": task.name, "language": language, "split": task.split, "method": args.method, "name": name,
              "base": str(args.base), "loras": plan["loras"], "gate": args.gate,
              "gate_sha256": _sha256(Path(args.gate)) if args.gate else None, "temperature": plan["temperature"],
              "prompt_style": args.prompt_style, "decode": asdict(decode), "dtype": dtype, "device": device,
              "data": data_source, "limit": args.limit, "engine": args.engine}
    if args.method == "lorahub" and lorahub_path(args.out_dir, language, task.domain).is_file():
        from ..lorahub import load_weights

        config["static_weights"] = load_weights(lorahub_path(args.out_dir, language, task.domain))
    check_resume(run_json, config)

    items = [{"id": r["id"], "task": task.name, "language": language, "split": task.split, "method": args.method,
              "prompt": p} for r, p in zip(records, prompts)]
    done = {row["id"] for row in read_predictions(predictions)}
    todo = sum(1 for item in items if item["id"] not in done)
    log = (lambda *a: None) if args.no_progress else (lambda *a: print(*a, file=sys.stderr))
    log(f"{task.name} {language} ({task.split}), method {args.method}: {len(items)} items, {todo} to generate "
        f"-> {predictions}")
    if todo:
        # vLLM runs from a model folder; the LoRA-Hub search itself still runs on the HF model
        model = load_model(args, plan, device, dtype) if args.engine == "hf" or args.method == "lorahub" else None
        if args.method == "average":
            k = len(plan["loras"])
            config["static_weights"] = [1.0 / k] * k
        elif args.method == "lorahub":
            from ..lorahub import LoraHubConfig, lorahub_weights

            hub_config = LoraHubConfig(budget=args.lorahub_budget, seed=args.lorahub_seed)
            weights, reused = lorahub_weights(
                model, lambda: lorahub_examples(args, plan, tokenizer), lorahub_path(args.out_dir, language,
                                                                                     task.domain),
                hub_config, progress=not args.no_progress, language=language, task=task.domain)
            log(f"LoRA-Hub weights {[round(w, 4) for w in weights]} ({'reused' if reused else 'searched'}: "
                f"{lorahub_path(args.out_dir, language, task.domain)})")
            model.set_mode("static", weights=weights)
            config["static_weights"] = weights
            config["lorahub"] = asdict(hub_config)
            check_resume(run_json, config)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_json, config)
        if args.engine == "vllm":
            model = _vllm_generator(args, plan, config, out, dtype, decode)
        try:
            generate_predictions(model, tokenizer, items, predictions, decode, progress=not args.no_progress)
        finally:
            if args.engine == "vllm":
                model.close()
    elif not run_json.is_file():
        atomic_write_json(run_json, config)

    results = score(task, predictions, data_source if Path(data_source).is_file() else None, args.data_root,
                    language, args.allow_code_execution, args.timeout)
    results.update({"task": task.name, "language": language, "split": task.split, "method": args.method,
                    "name": name, "config": {**read_json(run_json), **{k: config[k] for k in ("limit", "data")},
                                             "scoring": results.get("config", {})},
                    "versions": {**results.get("versions", {}), **_versions()}})
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown_summary(results))
    print(markdown_summary(results), end="")
    return 0
