"""`FusionGate`: the per-layer gate of LoRA-Flow, `w = softmax(W x / T) + b` (paper eq. 2-3; SPEC §1).

- x: the decoder layer's input hidden state (before its input norm), per token, (batch, seq, hidden);
- W: (k, hidden), no bias inside the linear, zero-initialised;
- b: (k,), added *after* the softmax; the default init puts all weight on one LoRA (for k = 2 and the last LoRA
  this is the original `[-0.5, 0.5]`, so training starts from the task LoRA alone);
- T: temperature, 1 in training; the original used 1.1 at inference for the zh/ru math gates.

The gate always computes in its own dtype (fp32 by default), with autocast off, so a bf16/fp16 base does not
round the logits. Module-wide casts (`flow.to(torch.bfloat16)`, `.half()`) move the gate but keep its dtype
(`keep_dtype`); the backward pass keeps the layer input in its own dtype (`_UpcastLinear`), not an fp32 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.errors import LoraflowError

BIAS_INITS = ("one-hot", "uniform")


def initial_bias(k: int, init: str = "one-hot", index: int = -1) -> torch.Tensor:
    """b such that the fresh gate (W = 0, softmax = 1/k) outputs one-hot on LoRA `index`, or uniform 1/k."""
    if init == "uniform":
        return torch.zeros(k)
    if init == "one-hot":
        if not -k <= index < k:
            raise LoraflowError(f"gate bias init: LoRA index {index} out of range for k={k}")
        bias = torch.full((k,), -1.0 / k)
        bias[index] += 1.0
        return bias
    raise LoraflowError(f"gate bias init {init!r}: choose one of {BIAS_INITS}")


def keep_dtype(fn):
    """For `Module._apply`: apply `fn` (a move, a cast or both), but keep each tensor's dtype. A cast's result is
    dropped and the original tensor is moved to the device `fn` chose, so fp32 values are never rounded."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        return out if out.dtype == t.dtype else t.to(device=out.device)

    return apply


class _UpcastLinear(torch.autograd.Function):
    """F.linear(x.to(weight.dtype), weight) that saves x in its own dtype for backward and upcasts it there again,
    so a bf16 model's gates keep no fp32 copy of every layer input between forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).to(x.dtype)  # (..., hidden)
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)  # (k, hidden)
        return grad_x, grad_w


class FusionGate(nn.Module):
    def __init__(self, hidden_size: int, k: int, temperature: float = 1.0, bias_init: str = "one-hot",
                 bias_index: int = -1, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(k, hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(initial_bias(k, bias_init, bias_index).to(dtype=dtype, device=device))
        self.temperature = float(temperature)

    @property
    def k(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, seq, hidden) -> (batch, seq, k)
        kind = x.device.type  # (meta: no autocast there, and torch refuses to ask)
        if kind != "meta" and torch.is_autocast_enabled(kind):  # entering the context costs more than the gate
            with torch.autocast(device_type=kind, enabled=False):
                return self._weights(x)
        return self._weights(x)

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.dtype == weight.dtype:
            logits = F.linear(x, weight)
        elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            logits = _UpcastLinear.apply(x, weight)
        else:  # decoding: no graph, the plain cast
            logits = F.linear(x.to(weight.dtype), weight)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=-1) + self.bias

    def _apply(self, fn, recurse=True):
        return super()._apply(keep_dtype(fn), recurse)

    def extra_repr(self) -> str:
        return f"hidden={self.weight.shape[1]}, k={self.k}, temperature={self.temperature}"
