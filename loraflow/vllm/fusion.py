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
  applied to the already reduced base output. One all-reduce of R values per row-parallel layer; with A appended
  to the base weight (`finish` below) the partial `A_shard x_shard` rides in the base layer's own all-reduce.
- the gate is replicated: its input, the residual stream, is whole on every rank, and it is tiny (k x hidden).

Gates compute in fp32 whatever the model's dtype; the LoRA tensors have the model's dtype (as `FusedLoRALinear`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FlowGate(nn.Module):
    """w = softmax(W x / T) + b from the layer input x; fp32, replicated over tensor-parallel ranks. The layer uses
    it as `column_scales` (w times each rank column's scaling), which needs `finish` after the gate is loaded."""

    def __init__(self, hidden_size: int, k: int, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, hidden_size, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(k, dtype=torch.float32), requires_grad=False)
        self.temperature = float(temperature)

        self.weight_t = None  # (W / T)^T, contiguous (finish)
        self.scale_matrix = self.scale_bias = None

    def finish(self, scale_matrix: torch.Tensor) -> None:
        """After loading: fold 1/T into W, and b into the layer's column scales (b @ scale_matrix), so that
        `column_scales` is three kernels (on CPU vLLM runs eagerly and each small op costs as much as it computes).
        The arithmetic differs from `forward` only in rounding."""
        self.weight_t = (self.weight.data / self.temperature).t().contiguous()
        self.scale_matrix = scale_matrix
        self.scale_bias = self.bias.data @ scale_matrix

    def column_scales(self, x: torch.Tensor) -> torch.Tensor:
        """w @ scale_matrix, w = softmax(W x / T) + b: every LoRA rank column's scale for each token, fp32."""
        if self.weight_t is None:
            raise RuntimeError("loraflow: FlowGate.finish was not called after loading the gate")
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        p = torch.softmax(x @ self.weight_t, dim=-1)
        if p.dim() == 2:
            return torch.addmm(self.scale_bias, p, self.scale_matrix)
        return self.scale_bias + p @ self.scale_matrix


class _StackedLoRA(nn.Module):
    """Rank-column bookkeeping shared by both kinds: which LoRA and scaling each column has, the static scales.

    The per-token column scales are one small matmul, `w @ scale_matrix` ((tokens, k) x (k, R), one scaling per
    column in the row of its LoRA, zeros elsewhere): exactly `w[:, lora of column] * scaling` (every sum has one
    non-zero term), in one kernel instead of a gather and a multiply. The decoder layer concatenates the four
    projections' matrices and computes every scale of the layer in one matmul (`models.py`); on CPU, where vLLM
    runs eagerly, the number of small ops per layer is what LoRA-Flow costs over the base (`loraflow bench vllm`).

    After loading, `finish(base)` appends A's rows to the base layer's own weight where the base is an
    unquantized vLLM linear: one GEMM then gives the base output and A x side by side, with vLLM's own kernel (on
    CPU its prepacked oneDNN matmul) and, for a row-parallel layer, in its one all-reduce. A's input is the base
    layer's input in every projection, so this is the same arithmetic; the LoRA-Flow model's forward splits the
    output. Elsewhere (quantized bases, gathered outputs) A stays a separate matmul."""

    def __init__(self, segments: Sequence[Sequence[tuple[int, int, float]]], static: Sequence[float] | None,
                 k: int):
        # segments[slice] = [(lora index, rank, scaling), ...] in the order the columns are stacked
        super().__init__()
        self.segments = [list(s) for s in segments]
        self.splits = [sum(r for _, r, _ in s) for s in self.segments]
        self.rank = sum(self.splits)
        columns = [(i, scale) for s in self.segments for i, r, scale in s for _ in range(r)]
        matrix = torch.zeros(k, len(columns), dtype=torch.float32)
        for c, (i, scale) in enumerate(columns):
            matrix[i, c] = scale
        self.register_buffer("scale_matrix", matrix, persistent=False)
        if static is not None:  # static/single: the column scales never change; computed once, fp32 as FlowModel
            self.register_buffer("static_scale", torch.tensor(static, dtype=torch.float32) @ matrix,
                                 persistent=False)
        self.fused = False  # A's rows appended to the base weight (finish)
        self.b_t = None  # B^T, contiguous (finish): addmm's right operand without a transpose per call

    def column_offset(self, slice_index: int, lora: int) -> tuple[int, int]:
        """(start, end) of LoRA `lora`'s columns in slice `slice_index`'s rank block."""
        start = 0
        for i, r, _ in self.segments[slice_index]:
            if i == lora:
                return start, start + r
            start += r
        raise KeyError(lora)

    def finish(self, base: nn.Module) -> None:
        """After the LoRA tensors are loaded: B^T once, and A into the base layer's weight where it can go."""
        self.b_t = self.lora_B.data.t().contiguous()
        if _fusable(base, self.lora_A, row=isinstance(self, RowLoRA)):
            weight = base.weight
            weight.data = torch.cat([weight.data, self.lora_A.data], dim=0)
            if getattr(base, "bias", None) is not None:  # the A rows have no bias
                base.bias.data = torch.cat([base.bias.data, base.bias.data.new_zeros(self.rank)])
            self.fused = True

    def _term(self, out: torch.Tensor, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """out + (h * scale) B^T, the add inside the matmul (vLLM's hidden states are (tokens, features))."""
        h = h * scale
        b_t = self.b_t if self.b_t is not None else self.lora_B.t()
        if out.dim() == 2 and h.dim() == 2:
            return torch.addmm(out, h, b_t)
        return out + h @ b_t


def _fusable(base: nn.Module, lora_a: torch.Tensor, row: bool) -> bool:
    """Whether A's rows can be appended to `base`'s weight: an unquantized vLLM linear of A's dtype and input
    width whose output this rank uses as it is (not gathered; row-parallel: reduced inside the layer)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    weight = getattr(base, "weight", None)
    if not isinstance(getattr(base, "quant_method", None), UnquantizedLinearMethod) or weight is None \
            or weight.dim() != 2 or weight.dtype != lora_a.dtype or weight.shape[1] != lora_a.shape[1] \
            or weight.device != lora_a.device:
        return False
    if row:
        return base.tp_size == 1 or bool(base.reduce_results)
    return not (getattr(base, "gather_output", False) and base.tp_size > 1)


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

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """y: the base layer's output (fused: with A x in its last R columns); scale: (tokens or 1, R)."""
        if self.fused:
            out, h = y.split([y.shape[-1] - self.rank, self.rank], dim=-1)
        else:
            out, h = y, F.linear(x, self.lora_A)  # (tokens, sum R)
        return self._term(out, h, scale)

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

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """y: the base layer's (reduced) output; fused, its last R columns are the reduced A x."""
        if self.fused:
            out, h = y.split([y.shape[-1] - self.rank, self.rank], dim=-1)
        else:
            out, h = y, F.linear(x, self.lora_A)  # (tokens, R): this rank's share of A x
            if self.tp_size > 1:
                from vllm.distributed import tensor_model_parallel_all_reduce

                h = tensor_model_parallel_all_reduce(h)
        return self._term(out, h, scale)

    def load(self, lora: int, a_shard: torch.Tensor, b: torch.Tensor) -> None:
        s, e = self.column_offset(0, lora)
        self.lora_A.data[s:e].copy_(a_shard)
        self.lora_B.data[:, s:e].copy_(b)
