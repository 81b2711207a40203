"""`FusedLoRALinear`: a frozen base `nn.Linear` plus k LoRAs, stacked, scaled per token by the layer's fusion weights.

    y = base(x) + sum_i w_i * s_i * B_i A_i drop_i(x)          (s_i = alpha_i / r_i, or alpha_i / sqrt(r_i))

The k A matrices are stacked into one (sum r_i, d_in) and the k B matrices into one (d_out, sum r_i), so a
projection costs the base matmul plus two matmuls whatever k is (ranks may differ). The per-token weights w
(batch, seq, k) are expanded to the rank columns, (batch, seq, sum r_i), once per layer and shared by all of
the layer's projections. The base projection runs once; the output has the base output's dtype.

`FusionState` is what the projections of one decoder layer share: the fusion mode, the static weights, and the
per-token weights that the layer's gate hook sets from the layer input before the projections run. It is a module
(a child of its decoder layer) and every tensor that outlives a forward is a buffer of a module, so `.to()`,
`.cuda()`, FSDP and dtype casts move it with the model. The gates' and the fusion state's own tensors keep their
dtype under module-wide casts (`flow.to(torch.bfloat16)` leaves the gates fp32): see `keep_dtype`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraflow.fusion.gate import FusionGate, keep_dtype

MODES = ("flow", "static", "single", "base")


class FusionState(nn.Module):
    """Shared by the gate hook and the fused projections of one decoder layer; a child module of that layer.

    Buffers: `static` (k,) fp32, the static weights. Attributes: the mode and the per-forward values (the gate's
    weights, the rank-column scales computed from them, the examples' dropout keys), which are recomputed every
    forward on the input's device. The projections refer to their state without registering it as their own child.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.mode = "flow"  # "flow" | "static" | "base" ("single" is static with one active LoRA)
        self.register_buffer("static", torch.zeros(k), persistent=False)  # (k,) fp32
        self.static_values: list[float] = [0.0] * k  # the same as Python floats (no device sync in the hot path)
        self.static_version = 0  # bumped by set_static: projections rebuild their static column scales
        self.active: int | None = None  # static mode with exactly one non-zero weight: that LoRA's index
        self.weights: torch.Tensor | None = None  # flow mode: (batch, seq, k) from the gate, fp32
        self.recorder: list | None = None  # when recording: receives (batch, seq, k) per forward
        self.dropout = True  # LoRA dropout while training (the original left it on when training the gate)
        self.dropout_keys: torch.Tensor | None = None  # (batch,) int64 per-example dropout keys, or None: random
        self.layouts: list[tuple] = []  # the distinct rank layouts of the layer's projections
        self.cache: list[torch.Tensor | None] = []  # flow mode: rank-column scales per layout, for `weights`
        self.hook = None  # the handle of the gate hook on the decoder layer's input norm

    def layout_slot(self, layout: tuple) -> int:
        """The cache slot of a projection's rank layout (projections with equal layouts share one)."""
        if layout not in self.layouts:
            self.layouts.append(layout)
            self.cache.append(None)
        return self.layouts.index(layout)

    def set_weights(self, weights: torch.Tensor) -> None:
        # once per layer and token when decoding: plain attributes, so skip nn.Module.__setattr__'s checks
        d = self.__dict__
        d["weights"] = weights
        d["cache"] = [None] * len(self.layouts)

    def set_static(self, values: Sequence[float] | None, mode: str = "static") -> None:
        """Static (or single-LoRA) fusion with one weight per LoRA; None: back to `mode` ("flow" or "base")."""
        if values is None:
            self.mode, self.active = mode, None
        else:
            self.static_values = [float(v) for v in values]
            nonzero = [i for i, v in enumerate(self.static_values) if v != 0.0]
            self.mode, self.active = "static", nonzero[0] if len(nonzero) == 1 else None
            self.static = torch.tensor(self.static_values, dtype=torch.float32, device=self.static.device)
            self.static_version += 1
        self.weights = None
        self.cache = [None] * len(self.layouts)

    def _apply(self, fn, recurse=True):
        super()._apply(keep_dtype(fn), recurse)
        # rebuilt from the Python values on the new device (to_empty leaves garbage); per-forward values dropped
        self.static = torch.tensor(self.static_values, dtype=torch.float32, device=self.static.device)
        self.weights, self.dropout_keys = None, None
        self.cache = [None] * len(self.layouts)
        return self

    def extra_repr(self) -> str:
        return f"k={self.k}, mode={self.mode}"


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
    target this projection. `name` (the module's path in the model) keys its dropout masks (`dropout_masks`)."""

    def __init__(self, base_layer: nn.Linear, loras: Sequence[tuple | None], state: FusionState, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "state", state)  # shared with the layer's other projections; not our child
        weight = base_layer.weight
        present = [(i, lora) for i, lora in enumerate(loras) if lora is not None]
        a = torch.cat([lora[0] for _, lora in present], dim=0)  # (R, d_in), R = sum of ranks
        b = torch.cat([lora[1] for _, lora in present], dim=1)  # (d_out, R)
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
        self.lora_B = nn.Parameter(b.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
        # Per-LoRA rank-column slices, scalings and dropout probabilities; the layout slot lets projections of one
        # layer with identical LoRA layouts share one expansion of the per-token weights.
        self.segments: dict[int, tuple[int, int]] = {}
        start = 0
        for i, lora in present:
            self.segments[i] = (start, start + lora[0].shape[0])
            start += lora[0].shape[0]
        self.scalings = {i: float(lora[2]) for i, lora in present}
        self.dropouts = {i: float(lora[3]) for i, lora in present}
        self.salts = {i: dropout_salt(name, i) for i, _ in present}
        self.layout_slot = state.layout_slot(tuple((i, self.segments[i], self.scalings[i]) for i, _ in present))
        self.any_dropout = any(p > 0 for p in self.dropouts.values())
        self.static_version = -1  # the state's static_version that `static_scale` was built for
        # Derived, non-persistent buffers, rebuilt from the Python values above after every move or cast (`_apply`)
        self.register_buffer("lora_index", torch.empty(0, dtype=torch.long, device=weight.device), persistent=False)
        self.register_buffer("lora_scaling", torch.empty(0, device=weight.device), persistent=False)
        self.register_buffer("lora_salts", torch.empty(0, dtype=torch.long, device=weight.device), persistent=False)
        self.register_buffer("static_scale", torch.empty(0, device=weight.device), persistent=False)  # (R,)
        self._build_buffers()

    def _build_buffers(self) -> None:
        device = self.lora_A.device
        index = [i for i, (s, e) in self.segments.items() for _ in range(e - s)]
        self.lora_index = torch.tensor(index, device=device)
        self.lora_scaling = torch.tensor([self.scalings[i] for i in index], dtype=torch.float32, device=device)
        self.lora_salts = torch.tensor(list(self.salts.values()), dtype=torch.long, device=device)  # per LoRA here
        self.static_version = -1  # static_scale is rebuilt at the next static forward, in the LoRA dtype

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._build_buffers()
        return self

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
        if segment is None:
            salts = self.lora_salts
        else:
            n = list(self.segments).index(segment)
            salts = self.lora_salts[n:n + 1]
        masks, scales = dropout_masks(x, [self.dropouts[i] for i in ids], salts, self.state.dropout_keys)
        parts = []
        for j, i in enumerate(ids):
            s, e = self.segments[i]
            dropped = x if masks[j] is None else _KeepMask.apply(x, masks[j])
            h = F.linear(dropped, self.lora_A[s:e])
            parts.append(h if scales[j] == 1.0 else h * scales[j])  # 1/(1-p) on the rank-wide output, not on x
        return torch.cat(parts, dim=-1)

    def _column_scale(self, state: FusionState) -> torch.Tensor:
        """Per-token weight times scaling for every rank column: (batch, seq, R) in flow mode, (R,) in static.

        In the LoRA dtype. Flow: computed once per layer (per rank layout) and forward, shared by the layer's other
        projections. Static: the buffer `static_scale`, rebuilt when the state's static weights change.
        """
        if state.mode != "flow":
            if self.static_version != state.static_version:  # from the Python values: no read from the device
                columns = [i for i, (s, e) in self.segments.items() for _ in range(e - s)]
                scale = (torch.tensor([state.static_values[i] for i in columns], dtype=torch.float32)
                         * torch.tensor([self.scalings[i] for i in columns], dtype=torch.float32))
                self.static_scale = scale.to(device=self.lora_A.device, dtype=self.lora_A.dtype)
                self.static_version = state.static_version
            return self.static_scale
        scale = state.cache[self.layout_slot]
        if scale is None:
            if state.weights is None:
                raise RuntimeError("flow mode: no fusion weights for this layer; the decoder layer's input norm "
                                   "must run (and fire its gate hook) before its projections")
            scale = (state.weights.index_select(-1, self.lora_index) * self.lora_scaling).to(self.lora_A.dtype)
            state.cache[self.layout_slot] = scale
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
# splitmix64's constants as signed int64 (torch has no uint64 arithmetic on every device): the Weyl increment and
# the two multipliers of its finaliser
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _to_int64(value: int) -> int:
    value &= 2**64 - 1
    return value - 2**64 if value >= 2**63 else value


def mix64(value: int) -> int:
    """splitmix64's finaliser on a Python int (a 64-bit hash), as a signed int64."""
    z = value & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return _to_int64(z ^ (z >> 31))


def dropout_salt(name: str, lora: int) -> int:
    """The part of a dropout key that names the projection (its module path, which holds the layer) and the LoRA."""
    return _to_int64(int.from_bytes(hashlib.blake2b(f"{name}#{lora}".encode(), digest_size=8).digest(), "little"))


def example_dropout_key(seed: int, step: int, position: int) -> int:
    """The dropout key of the example at `position` in the global batch of optimizer step `step`: the same whatever
    process or micro-batch holds it."""
    return mix64(mix64(mix64(seed) ^ step) ^ position)


def _fold(z: torch.Tensor) -> None:
    """z ^= z >>> 32 in place (a logical shift, done on the int32 halves of each little-endian int64)."""
    halves = z.view(torch.int32).view(-1, 2)
    halves[:, 0].bitwise_xor_(halves[:, 1])


def random_words(keys: torch.Tensor, count: int) -> torch.Tensor:
    """(*keys.shape, count) int64 of counter-based random bits: word c of key k is a 64-bit hash of (k, c).

    Stream k is splitmix64's (k + c * golden) through a finaliser with 32-bit shifts (mixing by multiplications and
    32-bit folds), in wrapping int64 arithmetic, so CPU and CUDA give the same bits. A stream's first n words do not
    depend on `count`. Cost: about what torch.randint takes for the same words on CPU.
    """
    counter = torch.arange(count, dtype=torch.int64, device=keys.device)
    z = torch.add(keys.unsqueeze(-1), counter, alpha=_GOLDEN)  # (*keys, count)
    _fold(z)
    z.mul_(_MIX1)
    _fold(z)
    z.mul_(_MIX2)
    _fold(z)
    return z


def dropout_masks(x: torch.Tensor, probs: list[float], salts: torch.Tensor, keys: torch.Tensor | None = None,
                  ) -> tuple[list[torch.Tensor | None], list[float]]:
    """Dropout keep-masks shaped like `x` (batch, ..., d_in), one per probability, and the 1/(1 - p) scales.

    The mask of element (b, t, j) for LoRA slot s is a function of (keys[b] ^ salts[s], t, j) only: keys[b] is the
    example's key (`example_dropout_key`, set by training through `FlowModel.set_dropout_keys`) and the salt names
    the layer, projection and LoRA (`dropout_salt`; `salts`: (len(probs),) int64 on x's device). So the masks do
    not depend on which process or micro-batch holds the example, nor on the padded length. Without keys each call
    draws fresh ones from torch's generator (reproducible under `torch.manual_seed`, and replayed by activation
    checkpointing's RNG restore).

    Each element gets 16 random bits: it is kept when they, read as a signed number, are >= -2^15 + round(p * 2^16).
    So the drop probability is p rounded to a multiple of 2^-16 (0.1 -> 0.100006) and the scale uses that rounded
    value, which keeps E[mask * scale] = 1 exactly. Masks are uint8 (1 byte per element, as torch's own dropout
    keeps for backward); None where p is 0.
    """
    thresholds = [round(p * 2**DROPOUT_BITS) for p in probs]
    drawn = [j for j, t in enumerate(thresholds) if t > 0]
    masks: list[torch.Tensor | None] = [None] * len(probs)
    scales = [1.0] * len(probs)
    if not drawn:
        return masks, scales
    d_in = x.shape[-1]
    rows = x.shape[0] if x.dim() == 3 else 1
    tokens = x.numel() // max(rows * d_in, 1)
    if keys is None:
        row_keys = torch.randint(-2**63, 2**63 - 1, (len(drawn), rows), dtype=torch.int64, device=x.device)
    else:
        if keys.numel() != rows:
            raise RuntimeError(f"LoRA dropout: {keys.numel()} example keys set for an input of {rows} rows "
                               f"{tuple(x.shape)}; FlowModel.set_dropout_keys needs one key per batch row")
        row_keys = keys.view(1, rows) ^ salts.view(-1, 1)  # (len(probs), rows)
        if len(drawn) < len(probs):
            row_keys = torch.stack([row_keys[j] for j in drawn])  # (drawn, rows)
    width = -(-d_in // 4) * 4  # 16-bit fields per token, a whole number of int64 words
    bits = random_words(row_keys, tokens * width // 4).view(torch.int16).view(len(drawn), rows, tokens, width)
    for slot, j in enumerate(drawn):
        fields = bits[slot] if width == d_in else bits[slot, ..., :d_in]
        keep = torch.empty((rows, tokens, d_in), dtype=torch.uint8, device=x.device)
        masks[j] = torch.ge(fields, -2**15 + thresholds[j], out=keep).view(x.shape)
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
