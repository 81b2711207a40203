"""The LoRA-Flow terms inside vLLM's tensor-parallel linear layers (one decoder layer's worth).

    y = base(x) + B ((A x) * s),   s = w[lora of each rank column] * scaling   (flow: per token; static: fixed)

vLLM merges q/k/v into one column-parallel `qkv_proj` and gate/up into `gate_up_proj`; o and down are row-parallel.
The k LoRAs are stacked along the rank (R = sum of the active LoRAs' ranks), as in `loraflow.fusion.layers`:

- column-parallel (qkv, gate_up): A (sum over slices of R, d_in) is replicated, because every rank sees the whole
  input; each slice's B (out_s, R) is sharded along its output rows exactly as the base weight's slice (q by
  heads, k/v by KV heads with vLLM's replication when TP > KV heads, gate/up by halves), so a rank adds the LoRA
  term to precisely the output columns it owns. No communication.
- row-parallel (o, down): A (R, d_in) is sharded along its input columns as the base weight is; the rank-wide
  partial `A_shard x_shard` (R numbers per token, not d) is all-reduced, then the replicated B (d_out, R) is
  applied to the already reduced base output. One all-reduce of R values per row-parallel layer.
- the gate is replicated: its input, the residual stream, is whole on every rank, and it is tiny (k x hidden).

Gates compute in fp32 whatever the model's dtype; the LoRA tensors have the model's dtype (as `FusedLoRALinear`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FlowGate(nn.Module):
    """w = softmax(W x / T) + b from the layer input x; fp32, replicated over tensor-parallel ranks."""

    def __init__(self, hidden_size: int, k: int, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, hidden_size, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(k, dtype=torch.float32), requires_grad=False)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.to(torch.float32), self.weight)  # (tokens, k)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=-1) + self.bias


class _StackedLoRA(nn.Module):
    """Rank-column bookkeeping shared by both kinds: which LoRA and scaling each column has, the static scales.

    The per-token column scales are one small matmul, `w @ scale_matrix` ((tokens, k) x (k, R), one scaling per
    column in the row of its LoRA, zeros elsewhere): exactly `w[:, lora of column] * scaling` (every sum has one
    non-zero term), in one kernel instead of a gather and a multiply; on CPU, where vLLM runs eagerly, the number of
    small ops per layer is what LoRA-Flow costs over the base (`loraflow bench vllm`)."""

    def __init__(self, segments: Sequence[Sequence[tuple[int, int, float]]], static: Sequence[float] | None,
                 k: int):
        # segments[slice] = [(lora index, rank, scaling), ...] in the order the columns are stacked
        super().__init__()
        self.segments = [list(s) for s in segments]
        self.splits = [sum(r for _, r, _ in s) for s in self.segments]
        columns = [(i, scale) for s in self.segments for i, r, scale in s for _ in range(r)]
        matrix = torch.zeros(k, len(columns), dtype=torch.float32)
        for c, (i, scale) in enumerate(columns):
            matrix[i, c] = scale
        self.register_buffer("scale_matrix", matrix, persistent=False)
        self.static = static is not None
        if static is not None:  # static/single: the column scales never change; computed once, fp32 as FlowModel
            self.register_buffer("static_scale", torch.tensor(static, dtype=torch.float32) @ matrix,
                                 persistent=False)

    def column_scale(self, w: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        scale = self.static_scale if self.static else w @ self.scale_matrix
        return scale.to(dtype)

    def column_offset(self, slice_index: int, lora: int) -> tuple[int, int]:
        """(start, end) of LoRA `lora`'s columns in slice `slice_index`'s rank block."""
        start = 0
        for i, r, _ in self.segments[slice_index]:
            if i == lora:
                return start, start + r
            start += r
        raise KeyError(lora)


def _add_lora(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out + h B^T in one kernel (vLLM's hidden states are (tokens, features))."""
    if out.dim() == 2 and h.dim() == 2:
        return torch.addmm(out, h, b.t())
    return out + F.linear(h, b)


class ColumnLoRA(_StackedLoRA):
    """LoRA terms of a (merged) column-parallel layer with `len(out_sizes)` slices (q, k, v or gate, up).

    The slices' B matrices sit on the diagonal of one block-diagonal (sum out, sum R) matrix, so the term of every
    slice is one matmul (the zero blocks add exact zeros; ranks are small, so they cost little)."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], segments, static=None, k: int = 1):
        super().__init__(segments, static, k)
        dtype = torch.get_default_dtype()
        self.out_sizes = list(out_sizes)
        self.lora_A = nn.Parameter(torch.zeros(sum(self.splits), in_features, dtype=dtype), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(sum(self.out_sizes), sum(self.splits), dtype=dtype),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        h = F.linear(x, self.lora_A)  # (tokens, sum R)
        h = h * self.column_scale(w, h.dtype)
        return _add_lora(out, h, self.lora_B)

    def load(self, slice_index: int, lora: int, a: torch.Tensor, b_shard: torch.Tensor) -> None:
        s, e = self.column_offset(slice_index, lora)
        base = sum(self.splits[:slice_index])
        row = sum(self.out_sizes[:slice_index])
        self.lora_A.data[base + s:base + e].copy_(a)
        self.lora_B.data[row:row + self.out_sizes[slice_index], base + s:base + e].copy_(b_shard)


class RowLoRA(_StackedLoRA):
    """LoRA term of a row-parallel layer (o, down): A sharded by input like the base weight, B replicated."""

    def __init__(self, in_per_rank: int, out_features: int, segments, tp_size: int, static=None, k: int = 1):
        super().__init__([segments], static, k)
        dtype = torch.get_default_dtype()
        self.tp_size = tp_size
        self.lora_A = nn.Parameter(torch.zeros(self.splits[0], in_per_rank, dtype=dtype), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.splits[0], dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        h = F.linear(x, self.lora_A)  # (tokens, R): this rank's share of A x
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            h = tensor_model_parallel_all_reduce(h)
        h = h * self.column_scale(w, h.dtype)
        return _add_lora(out, h, self.lora_B)

    def load(self, lora: int, a_shard: torch.Tensor, b: torch.Tensor) -> None:
        s, e = self.column_offset(0, lora)
        self.lora_A.data[s:e].copy_(a_shard)
        self.lora_B.data[:, s:e].copy_(b)
