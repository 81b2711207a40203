"""`FusedLoRALinear`: a frozen base `nn.Linear` plus k LoRAs, stacked, scaled per token by the layer's fusion weights.

    y = base(x) + sum_i w_i * s_i * B_i A_i drop_i(x)          (s_i = alpha_i / r_i, or alpha_i / sqrt(r_i))

The k A matrices are stacked into one (sum r_i, d_in) and the k B matrices into one (d_out, sum r_i), so a
projection costs the base matmul plus two matmuls whatever k is (ranks may differ). The per-token weights w
(batch, seq, k) are expanded to the rank columns, (batch, seq, sum r_i), once per layer and shared by all of
the layer's projections. The base projection runs once; the output has the base output's dtype.

`FusionState` is what the projections of one decoder layer share: the fusion mode, the static weights, and the
per-token weights that the layer's gate hook sets from the layer input before the projections run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.fusion.gate import FusionGate

MODES = ("flow", "static", "single", "base")


class FusionState:
    """Shared by the gate hook and the fused projections of one decoder layer (a plain object, not a module)."""

    def __init__(self, k: int):
        self.k = k
        self.mode = "flow"  # "flow" | "static" | "base" ("single" is static with one active LoRA)
        self.static: torch.Tensor | None = None  # (k,) fp32, on the layer's device
        self.static_values: list[float] = []  # the same as Python floats (no device sync in the hot path)
        self.active: int | None = None  # static mode with exactly one non-zero weight: that LoRA's index
        self.weights: torch.Tensor | None = None  # flow mode: (batch, seq, k) from the gate, fp32
        self.recorder: list | None = None  # when recording: receives (batch, seq, k) per forward
        self.dropout = True  # LoRA dropout while training (the original left it on when training the gate)
        self.cache: dict = {}  # rank-column scales per rank layout, valid for the current `weights`

    def set_weights(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.cache.clear()


class GateHook:
    """Forward pre-hook on a decoder layer's input norm: its input is the layer's input hidden state x.

    Hooking the norm rather than the decoder layer keeps the gate inside the layer's `forward`, so it is
    recomputed under gradient checkpointing and runs after FSDP has gathered the layer's (and gate's) parameters.
    """

    def __init__(self, gate: FusionGate, state: FusionState):
        self.gate = gate
        self.state = state

    def __call__(self, module: nn.Module, args: tuple) -> None:
        state = self.state
        if state.mode == "flow":
            state.set_weights(self.gate(args[0]))  # (batch, seq, k)
        if state.recorder is not None:
            x = args[0]
            w = state.weights if state.mode == "flow" else _static_or_zero(state, x)
            state.recorder.append(w.detach().float().cpu())


def _static_or_zero(state: FusionState, x: torch.Tensor) -> torch.Tensor:
    w = state.static if state.mode == "static" else torch.zeros(state.k, device=x.device)
    return w.expand(*x.shape[:-1], state.k)


class FusedLoRALinear(nn.Module):
    """Wraps `base_layer`; `loras[i]` is `(A_i, B_i, scaling_i, dropout_i)`, or None where LoRA i does not
    target this projection."""

    def __init__(self, base_layer: nn.Linear, loras: Sequence[tuple | None], state: FusionState):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        weight = base_layer.weight
        present = [(i, lora) for i, lora in enumerate(loras) if lora is not None]
        a = torch.cat([lora[0] for _, lora in present], dim=0)  # (R, d_in), R = sum of ranks
        b = torch.cat([lora[1] for _, lora in present], dim=1)  # (d_out, R)
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
        self.lora_B = nn.Parameter(b.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
        index = [i for i, lora in present for _ in range(lora[0].shape[0])]
        scale = [float(lora[2]) for _, lora in present for _ in range(lora[0].shape[0])]
        self.register_buffer("lora_index", torch.tensor(index, device=weight.device), persistent=False)
        self.register_buffer("lora_scaling", torch.tensor(scale, device=weight.device), persistent=False)
        # Per-LoRA rank-column slices, scalings and dropout probabilities; the layout key lets projections of one
        # layer with identical LoRA layouts share one expansion of the per-token weights.
        self.segments: dict[int, tuple[int, int]] = {}
        start = 0
        for i, lora in present:
            self.segments[i] = (start, start + lora[0].shape[0])
            start += lora[0].shape[0]
        self.scalings = {i: float(lora[2]) for i, lora in present}
        self.dropouts = {i: float(lora[3]) for i, lora in present}
        self.layout = tuple((i, self.segments[i], self.scalings[i]) for i, _ in present)
        self.any_dropout = any(p > 0 for p in self.dropouts.values())

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `proj.weight.dtype`
        return self.base_layer.weight

    def _down(self, x: torch.Tensor, segment: int | None = None) -> torch.Tensor:
        """A drop(x) for all LoRAs (or one): (..., d_in) -> (..., R). Dropout masks are independent per LoRA."""
        ids = None
        if self.any_dropout and self.training and self.state.dropout:  # cheap test first: decoding passes here
            ids = list(self.segments) if segment is None else [segment]
        if ids is None or not any(self.dropouts[i] > 0 for i in ids):
            if segment is None:
                return F.linear(x, self.lora_A)
            s, e = self.segments[segment]
            return F.linear(x, self.lora_A[s:e])
        probs = [self.dropouts[i] for i in ids]
        if x.device.type == "cpu":  # see lora_dropout_masks: a third of the cost of F.dropout's masks on CPU
            masks, scales = lora_dropout_masks(x, probs)
        else:  # CUDA & co.: torch's fused dropout kernel is the fastest there
            masks, scales = None, [1.0] * len(ids)
        parts = []
        for j, i in enumerate(ids):
            s, e = self.segments[i]
            if masks is None:
                dropped = F.dropout(x, probs[j], training=True) if probs[j] > 0 else x
            else:
                dropped = x if masks[j] is None else _KeepMask.apply(x, masks[j])
            h = F.linear(dropped, self.lora_A[s:e])
            parts.append(h if scales[j] == 1.0 else h * scales[j])  # 1/(1-p) on the rank-wide output, not on x
        return torch.cat(parts, dim=-1)

    def _column_scale(self, state: FusionState) -> torch.Tensor:
        """Per-token weight times scaling for every rank column: (batch, seq, R) in flow mode, (R,) in static.

        Computed once per layer (per rank layout) and kept in the LoRA dtype, so the layer's other projections reuse it.
        """
        scale = state.cache.get(self.layout)
        if scale is None:
            if state.mode == "flow":
                if state.weights is None:
                    raise RuntimeError("flow mode: no fusion weights for this layer; the decoder layer's input norm "
                                       "must run (and fire its gate hook) before its projections")
                scale = state.weights.index_select(-1, self.lora_index) * self.lora_scaling
            else:
                scale = state.static.index_select(0, self.lora_index) * self.lora_scaling
            scale = scale.to(self.lora_A.dtype)
            state.cache[self.layout] = scale
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Decoding runs this once per projection per token, so it keeps Python work and tensor calls to a minimum.
        result = self.base_layer(x, *args, **kwargs)
        state = self.state
        mode = state.mode
        if mode == "base":
            return result
        lora_a = self.lora_A
        if x.dtype != lora_a.dtype:
            x = x.to(lora_a.dtype)
        if mode == "static" and state.active is not None:  # single LoRA: only its slice of A and B
            i = state.active
            if i not in self.segments:
                return result
            s, e = self.segments[i]
            h = self._down(x, i) * (state.static_values[i] * self.scalings[i])
            return _add_up(result, h, self.lora_B[:, s:e])
        h = self._down(x)  # (batch, seq, R)
        scale = self._column_scale(state)
        if scale.dtype != h.dtype:
            scale = scale.to(h.dtype)
        return _add_up(result, h * scale, self.lora_B)

    def extra_repr(self) -> str:
        ranks = {i: e - s for i, (s, e) in self.segments.items()}
        return f"in={self.in_features}, out={self.out_features}, ranks={ranks}"


DROPOUT_BITS = 16


def lora_dropout_masks(x: torch.Tensor, probs: list[float]) -> tuple[list[torch.Tensor | None], list[float]]:
    """Independent dropout keep-masks shaped like `x`, one per probability, and the matching 1/(1 - p) scales.

    On CPU torch's Bernoulli sampling (what `F.dropout` uses) costs about as much as a projection's own matmul. Here
    all masks of one call come from a single draw of raw random bits, 16 bits per element: element j is kept when
    its 16 bits, read as a signed number, are >= -2^15 + round(p * 2^16). So the drop probability is p rounded to a
    multiple of 2^-16 (0.1 -> 0.100006) and the scale uses that rounded value, which keeps E[mask * scale] = 1
    exactly. The bits come from torch's default generator, so `torch.manual_seed` makes them reproducible.
    Masks are uint8 (1 byte per element, as torch's own dropout keeps for the backward pass); None where p is 0.
    """
    thresholds = [round(p * 2**DROPOUT_BITS) for p in probs]
    drawn = [j for j, t in enumerate(thresholds) if t > 0]
    masks: list[torch.Tensor | None] = [None] * len(probs)
    scales = [1.0] * len(probs)
    if not drawn:
        return masks, scales
    n = x.numel()
    words = -(-n * len(drawn) // 4)  # int64 words holding 4 x 16 bits
    bits = torch.randint(-2**63, 2**63 - 1, (words,), dtype=torch.int64, device=x.device).view(torch.int16)
    for slot, j in enumerate(drawn):
        chunk = bits[slot * n:(slot + 1) * n].view(x.shape)
        keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        masks[j] = torch.ge(chunk, -2**15 + thresholds[j], out=keep)
        scales[j] = 2**DROPOUT_BITS / (2**DROPOUT_BITS - thresholds[j])
    return masks, scales


class _KeepMask(torch.autograd.Function):
    """x * mask for a 0/1 uint8 mask, keeping only the 1-byte mask for the backward pass (x * mask.float() would
    keep a mask as wide as x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return x * mask.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None


ADDMM_MIN_ROWS = 32  # below this many tokens (decoding) the reshapes around addmm cost more than the add it saves


def _add_up(result: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """result + h B^T: over many tokens in one addmm (no separate add, no extra output-width tensor) when the dtypes
    agree or autocast casts them; otherwise, and for a few tokens, the plain sum in the result's dtype."""
    width = h.shape[-1]
    if h.numel() >= ADDMM_MIN_ROWS * width > 0 and (result.dtype == h.dtype == lora_b.dtype
                                                   or torch.is_autocast_enabled(result.device.type)):
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, width), lora_b.t())
        out = out.view(result.shape)
        return out if out.dtype == result.dtype else out.to(result.dtype)
    up = F.linear(h, lora_b)
    return result + (up if up.dtype == result.dtype else up.to(result.dtype))
