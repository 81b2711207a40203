"""`loraflow bench layer|scaling`: one projection, loraflow's fused layer against a per-LoRA Python loop, the loop
computing the base twice (as the original code did) and PEFT's LoraLayer, forward and forward+backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.bench.timing import interleaved
from loraflow.fusion.layers import FusedLoRALinear, FusionState


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
