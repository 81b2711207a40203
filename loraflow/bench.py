"""`loraflow bench`: benchmarks measured side by side in one process, reported as ratios.

    loraflow bench layer                      # fused projection vs a per-LoRA loop, forward+backward
    loraflow bench layer --shapes 4096x4096 --tokens 512 --k 2 --ranks 64,64 --json out.json

On CUDA it times with CUDA events in bf16; on CPU with `perf_counter` in fp32. Variants are interleaved
(round-robin, several rounds, median per variant) so a noisy machine shifts them together and ratios stay
meaningful. Numbers are never asserted in tests; `tests/test_bench.py` only checks that every variant computes the
same output.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def interleaved(variants: dict[str, Callable[[], None]], device, rounds: int = 5, warmup: int = 1) -> dict:
    """Median seconds per variant, running the variants round-robin `rounds` times after `warmup` rounds."""
    timer = _timer(device)
    samples = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            t = timer(fn)
            if r >= warmup:
                samples[name].append(t)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def flop_floor(d_in: int, d_out: int, ranks: list[int]) -> float:
    """(base + LoRA FLOPs) / base FLOPs for one projection: 1 + sum(r) (d_in + d_out) / (d_in d_out)."""
    return 1.0 + sum(ranks) * (d_in + d_out) / (d_in * d_out)


def bench_layer(d_in: int, d_out: int, tokens: int, ranks: list[int], device, dtype, rounds: int = 5) -> dict:
    """Forward+backward (gradients for the input and the fusion weights, as in gate training)."""
    fused, state = make_fused(d_in, d_out, ranks, device, dtype)
    loop = LoopLoRALinear(fused)
    loop2 = LoopLoRALinear(fused, base_twice=True)
    k = len(ranks)
    x = torch.randn(1, tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    w = torch.softmax(torch.randn(1, tokens, k, device=device), -1).requires_grad_(True)
    grad = torch.randn(1, tokens, d_out, device=device, dtype=dtype)

    def run_base():
        fused.base_layer(x).backward(grad)

    def run_fused():
        state.set_weights(w)
        fused(x).backward(grad)

    def run_loop():
        loop(x, w.to(dtype)).backward(grad)

    def run_loop2():
        loop2(x, w.to(dtype)).backward(grad)

    times = interleaved({"base": run_base, "fused": run_fused, "loop": run_loop, "loop_base_twice": run_loop2},
                        torch.device(device), rounds=rounds)
    return {"shape": f"{d_in}x{d_out}", "tokens": tokens, "k": k, "ranks": ranks, "seconds": times,
            "fused_vs_loop": times["loop"] / times["fused"],
            "fused_vs_original": times["loop_base_twice"] / times["fused"],
            "fused_over_base": times["fused"] / times["base"], "flop_floor": flop_floor(d_in, d_out, ranks)}


def environment(device) -> dict:
    info = {"host": platform.node(), "torch": torch.__version__, "device": str(device),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    layer = sub.add_parser("layer", help="fused projection vs per-LoRA loop, forward+backward")
    layer.add_argument("--shapes", default="4096x4096,4096x11008", help="comma list of d_in x d_out")
    layer.add_argument("--tokens", type=int, default=512, help="tokens per call (batch 1)")
    layer.add_argument("--ranks", default="64,64", help="comma list, one rank per LoRA (k = its length)")
    layer.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (median reported)")
    layer.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    layer.add_argument("--json", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    print(f"{'shape':>10} {'tokens':>6} {'k':>2} {'ranks':>8} {'base ms':>8} {'fused ms':>9} {'loop ms':>8} "
          f"{'loop/fused':>10} {'orig/fused':>10} {'fused/base':>10} {'floor':>6}")
    for shape in args.shapes.split(","):
        d_in, d_out = (int(v) for v in shape.lower().split("x"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            row = bench_layer(d_in, d_out, args.tokens, ranks, device, dtype, rounds=args.rounds)
        s = row["seconds"]
        print(f"{row['shape']:>10} {args.tokens:>6} {len(ranks):>2} {args.ranks:>8} {s['base'] * 1e3:8.1f} "
              f"{s['fused'] * 1e3:9.1f} {s['loop'] * 1e3:8.1f} {row['fused_vs_loop']:10.2f} "
              f"{row['fused_vs_original']:10.2f} {row['fused_over_base']:10.3f} {row['flop_floor']:6.3f}")
        rows.append(row)
    if args.json:
        from .files import atomic_write_json

        atomic_write_json(args.json, {"environment": environment(device), "dtype": str(dtype), "layer": rows})
    return 0


def main(argv=None) -> int:  # `python -m loraflow.bench layer ...`
    parser = argparse.ArgumentParser(prog="python -m loraflow.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
