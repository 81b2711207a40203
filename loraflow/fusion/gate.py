"""`FusionGate`: the per-layer gate of LoRA-Flow, `w = softmax(W x / T) + b` (paper eq. 2-3; SPEC §1).

- x: the decoder layer's input hidden state (before its input norm), per token, (batch, seq, hidden);
- W: (k, hidden), no bias inside the linear, zero-initialised;
- b: (k,), added *after* the softmax; the default init puts all weight on one LoRA (for k = 2 and the last LoRA
  this is the original `[-0.5, 0.5]`, so training starts from the task LoRA alone);
- T: temperature, 1 in training; the original used 1.1 at inference for the zh/ru math gates.

The gate always computes in its own dtype (fp32 by default), with autocast off, so a bf16/fp16 base does not
round the logits.
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
        if torch.is_autocast_enabled(x.device.type):  # entering the context costs more than the gate when decoding
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._weights(x)
        return self._weights(x)

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        logits = F.linear(x if x.dtype == weight.dtype else x.to(weight.dtype), weight)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=-1) + self.bias

    def extra_repr(self) -> str:
        return f"hidden={self.weight.shape[1]}, k={self.k}, temperature={self.temperature}"
