"""`FlowModel`: a Hugging Face causal LM with k LoRAs fused per token by one `FusionGate` per decoder layer.

    model = FlowModel.from_pretrained("meta-llama/Llama-2-7b-hf",
                                      loras=["checkpoints/LoRAs/zh_lora", "checkpoints/LoRAs/math_lora"],
                                      gate="checkpoints/Gates/zh_math.pt", torch_dtype=torch.bfloat16, device="cuda")
    out = model.generate(**tokenizer(prompt, return_tensors="pt").to("cuda"), max_new_tokens=512)

All of the paper's methods share this one injected model through its fusion mode:
`flow` (the gates), `static` (one fixed weight per LoRA: average, LoRA-Hub), `single` (one LoRA), `base` (none).
Only the gate parameters are trainable; the base model and the LoRAs are frozen.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from loraflow.errors import LoraflowError
from loraflow.fusion.adapters import LoRAAdapter, load_adapter, validate_adapter
from loraflow.fusion.gate import FusionGate
from loraflow.fusion.layers import MODES, FusedLoRALinear, FusionState, GateHook

GATE_MODULE = "lora_fusion_gate"  # the attribute each decoder layer gets; the original's name too (SPEC §5)
STATE_MODULE = "lora_fusion_state"  # each decoder layer's FusionState (buffers only, none persistent)


def is_gate_parameter(name: str) -> bool:
    """The one predicate that selects trainable (and saved) parameters."""
    return f".{GATE_MODULE}." in f".{name}"


def find_decoder_layers(model: nn.Module, gate_input: str = "input_layernorm") -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of decoder layers (each has `gate_input`, the norm whose input is the layer input)."""
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(hasattr(c, gate_input) for c in mod)]
    if len(found) != 1:
        raise LoraflowError(
            f"{type(model).__name__}: expected one list of Llama-style decoder layers (each with `.{gate_input}`), "
            f"found {len(found)}: {[n for n, _ in found]}"
        )
    return found[0]


def inject_fusion(model: nn.Module, adapters: Sequence[LoRAAdapter], temperature: float = 1.0,
                  bias_init: str = "one-hot", bias_index: int = -1,
                  gate_input: str = "input_layernorm") -> list[FusionState]:
    """Wrap every targeted Linear in a `FusedLoRALinear` and give every decoder layer a `FusionGate`, in place.

    Returns the per-layer `FusionState`s. Raises when an adapter does not fit the model, nothing matched, or the
    model already carries a fusion (`eject_fusion` removes it).
    """
    if not adapters:
        raise LoraflowError("LoRA-Flow needs at least one LoRA")
    injected = [name for name, mod in model.named_modules() if isinstance(mod, (FusedLoRALinear, FusionState))]
    if injected:
        raise LoraflowError(f"{type(model).__name__} already has a LoRA-Flow fusion injected (at {injected[0]}); "
                            "use that FlowModel, or call its unload() to get the plain base back first")
    prefix, layers = find_decoder_layers(model, gate_input)
    layer_of = {f"{prefix}.{i}.{name}": i for i, layer in enumerate(layers)
                for name, _ in layer.named_modules() if name}
    for adapter in adapters:
        validate_adapter(adapter, model, layer_of)
    k = len(adapters)
    hidden = model.config.hidden_size
    states = []
    for layer in layers:
        ref = next(layer.parameters())
        state = FusionState(k).to(ref.device)
        gate = FusionGate(hidden, k, temperature, bias_init, bias_index, device=ref.device)
        layer.add_module(GATE_MODULE, gate)
        layer.add_module(STATE_MODULE, state)
        state.hook = getattr(layer, gate_input).register_forward_pre_hook(GateHook(gate, state))
        states.append(state)
    modules = dict(model.named_modules())
    targets = sorted({m for a in adapters for m in a.weights})
    for module in targets:
        parent_name, attr = module.rsplit(".", 1)
        loras = [(a.weights[module][0], a.weights[module][1], a.scaling(module), a.dropout)
                 if module in a.weights else None for a in adapters]
        setattr(modules[parent_name], attr,
                FusedLoRALinear(modules[module], loras, states[layer_of[module]], name=module))
    return states


def eject_fusion(model: nn.Module, gate_input: str = "input_layernorm") -> nn.Module:
    """Undo `inject_fusion` in place: every `FusedLoRALinear` back to its base Linear, gates, states and hooks
    removed. Returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedLoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.base_layer)
    for layer in find_decoder_layers(model, gate_input)[1]:
        state = getattr(layer, STATE_MODULE, None)
        if state is not None:
            state.hook.remove()
            delattr(layer, STATE_MODULE)
        if hasattr(layer, GATE_MODULE):
            delattr(layer, GATE_MODULE)
    return model


class GateRecording:
    """Gate weights seen during a forward or `generate`, per layer: call `.weights()` after the run."""

    def __init__(self, num_layers: int):
        self.per_layer: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def weights(self, row: int | None = None) -> torch.Tensor:
        """(layers, batch, tokens, k), or (layers, tokens, k) for one batch `row`; tokens = every position the model
        ran on, in order (prompt, then each generated token; left padding included)."""
        if not self.per_layer[0]:
            raise LoraflowError("no gate weights were recorded: run a forward or generate inside record_gates()")
        out = torch.stack([torch.cat(chunks, dim=1) for chunks in self.per_layer])
        return out if row is None else out[:, row]


class FlowModel(nn.Module):
    def __init__(self, model: nn.Module, adapters: Sequence[LoRAAdapter], mode: str = "flow",
                 static_weights: Sequence[float] | None = None, lora: int | str | None = None,
                 temperature: float = 1.0, bias_init: str = "one-hot", bias_index: int = -1,
                 base_name_or_path: str | None = None):
        super().__init__()
        self.model = model
        self.base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # restored by unload
        self.states = inject_fusion(model, adapters, temperature, bias_init, bias_index)
        self.lora_names = [a.name for a in adapters]
        if len(set(self.lora_names)) != len(self.lora_names):
            raise LoraflowError(f"LoRA names must be unique, got {self.lora_names}; pass lora_names=[...]")
        self.lora_ids = [a.source for a in adapters]
        self.base_name_or_path = base_name_or_path or getattr(model.config, "_name_or_path", None)
        for name, param in self.named_parameters():
            param.requires_grad_(is_gate_parameter(name))
        # The injected modules are created in training mode; follow the wrapped model's mode (eval after
        # `from_pretrained`) so LoRA dropout never runs at inference unless `.train()` asks for it.
        self.train(model.training)
        self.mode = mode
        self.set_mode(mode, weights=static_weights, lora=lora)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, base: str | os.PathLike | nn.Module, loras: Sequence | None = None,
                        gate: str | os.PathLike | None = None,
                        mode: str | None = None, static_weights: Sequence[float] | None = None,
                        temperature: float | None = None, torch_dtype: torch.dtype | None = None, device=None,
                        lora: int | str | None = None, lora_names: Sequence[str] | None = None,
                        bias_init: str = "one-hot", bias_index: int = -1, check_lora_names: bool = True,
                        gguf_file: str | None = None, **model_kwargs) -> FlowModel:
        """Load a base causal LM (a path, a hub id, or a model object), k LoRAs, and optionally a gate.

        loras: folders, hub ids (`owner/repo[/subfolder][@revision]`) or `LoRAAdapter`s, in fusion order (the
        paper: language LoRA first, task LoRA second). gate: a loraflow gate (folder or `.safetensors` with its
        `.json`) or an original released `.pt`. temperature: None = the gate file's, else 1.0.
        gguf_file: the base is a GGUF file in the folder (or hub repo) `base`, dequantized on load (`pip install
        gguf`); `base="path/model.gguf"` works too.
        mode: flow (the default) | static (needs static_weights) | single (needs lora, an index or name; default
        0) | base. `base` alone may be a LoRA-Flow model folder (`loraflow export`): its LoRAs, gate, mode, static
        weights and temperature are the defaults then.
        Returns the model in eval mode, as Hugging Face's `from_pretrained` does: call `.train()` to train the gates
        (LoRA dropout runs only then).
        """
        if loras is None:
            from loraflow.fusion.folder import folder_spec

            if isinstance(base, nn.Module):
                raise LoraflowError("FlowModel.from_pretrained: loras=[...] is required unless base is a model folder")
            spec = folder_spec(base)
            base, loras, lora_names = spec.base, spec.loras, lora_names or spec.lora_names
            gate = gate if gate is not None else spec.gate
            mode = mode or spec.mode
            static_weights = static_weights if static_weights is not None else spec.static_weights
            lora = lora if lora is not None else spec.lora
            temperature = temperature if temperature is not None else spec.temperature
        mode = mode or "flow"
        if isinstance(base, nn.Module):
            model, base_id = base, getattr(getattr(base, "config", None), "_name_or_path", None)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
        else:
            from loraflow.bases import load_base_model

            base_id = str(base)
            if torch_dtype is not None:
                model_kwargs["dtype"] = torch_dtype
            model = load_base_model(base_id, gguf_file=gguf_file, **model_kwargs)
        model.eval()
        if lora_names is not None and len(lora_names) != len(loras):
            raise LoraflowError(f"lora_names has {len(lora_names)} names for {len(loras)} LoRAs")
        adapters = []
        for i, src in enumerate(loras):
            name = lora_names[i] if lora_names is not None else None
            if isinstance(src, LoRAAdapter):
                adapters.append(src if name is None else LoRAAdapter(name, src.source, src.weights, src.config))
            else:
                adapters.append(load_adapter(src, name=name))
        if device is not None:
            model.to(device)
        flow = cls(model, adapters, mode="base", temperature=1.0 if temperature is None else temperature,
                   bias_init=bias_init, bias_index=bias_index, base_name_or_path=base_id)
        if gate is not None:
            flow.load_gate(gate, check_lora_names=check_lora_names)
            if temperature is not None:
                flow.set_temperature(temperature)
        flow.set_mode(mode, weights=static_weights, lora=lora)
        return flow.eval()

    # ------------------------------------------------------------------------------------------------- modes
    def set_mode(self, mode: str, weights: Sequence[float] | None = None, lora: int | str | None = None) -> None:
        """flow | static (weights: k floats) | single (lora: index or name, default 0) | base."""
        if mode not in MODES:
            raise LoraflowError(f"fusion mode {mode!r}: choose one of {MODES}")
        if mode == "single":
            index = self.lora_index(0 if lora is None else lora)
            weights = [1.0 if i == index else 0.0 for i in range(self.k)]
        if mode in ("static", "single"):
            if weights is None or len(weights) != self.k:
                raise LoraflowError(f"static fusion needs {self.k} weights (one per LoRA {self.lora_names}), "
                                    f"got {None if weights is None else list(weights)}")
            values = [float(w) for w in weights]
        for state in self.states:
            state.set_static(values if mode in ("static", "single") else None, mode)
        self.mode = mode

    def lora_index(self, lora: int | str) -> int:
        if isinstance(lora, str):
            if lora not in self.lora_names:
                raise LoraflowError(f"no LoRA named {lora!r}; LoRAs: {self.lora_names}")
            return self.lora_names.index(lora)
        if not -self.k <= lora < self.k:
            raise LoraflowError(f"LoRA index {lora} out of range for {self.k} LoRAs")
        return lora % self.k

    def set_temperature(self, temperature: float) -> None:
        if not temperature > 0:
            raise LoraflowError(f"gate temperature must be > 0, got {temperature}")
        for gate in self.gates():
            gate.temperature = float(temperature)

    def set_lora_dropout(self, enabled: bool) -> None:
        """LoRA dropout while training (on by default, as in the original gate training)."""
        for state in self.states:
            state.dropout = bool(enabled)

    def set_dropout_keys(self, keys: torch.Tensor | None) -> None:
        """One int64 key per batch row for the next forwards (and their backward): the LoRA dropout masks of a
        row are then a function of its key, layer, projection and LoRA only (`layers.dropout_masks`). Training
        sets `layers.example_dropout_key(seed, step, position in the global batch)`; None: fresh random masks."""
        if keys is not None:
            keys = keys.to(device=self.device, dtype=torch.int64).reshape(-1)
        for state in self.states:
            state.dropout_keys = keys

    def unload(self) -> nn.Module:
        """Remove the fusion and return the plain base model (its Linears, no gates or hooks, its parameters'
        requires_grad as before). This FlowModel cannot be used afterwards."""
        model = eject_fusion(self.model)
        for name, param in model.named_parameters():
            param.requires_grad_(self.base_requires_grad.get(name, param.requires_grad))
        del self.model
        self.states = []
        self.unloaded = True
        return model

    def __getattr__(self, name: str):
        if name == "model" and self.__dict__.get("unloaded"):
            raise LoraflowError("this FlowModel was unloaded: use the base model unload() returned, or load anew")
        return super().__getattr__(name)

    # ------------------------------------------------------------------------------------------- structure
    def layers(self) -> nn.ModuleList:
        return find_decoder_layers(self.model)[1]

    def gates(self) -> list[FusionGate]:
        return [getattr(layer, GATE_MODULE) for layer in self.layers()]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if is_gate_parameter(n)]

    def named_gate_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if is_gate_parameter(n))

    @property
    def k(self) -> int:
        return len(self.lora_names)

    @property
    def num_layers(self) -> int:
        return len(self.states)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def temperature(self) -> float:
        return self.gates()[0].temperature

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------------ running it
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute decoder layers in backward (non-reentrant, so frozen inputs still pass gradients to gates)."""
        kwargs = {"use_reentrant": False}
        enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @contextlib.contextmanager
    def record_gates(self) -> Iterator[GateRecording]:
        """Record the fusion weights of every layer and token while the block runs (flow: the gates' outputs;
        static/single: the fixed weights; base: zeros)."""
        recording = GateRecording(self.num_layers)
        for state, chunks in zip(self.states, recording.per_layer):
            state.recorder = chunks
        try:
            yield recording
        finally:
            for state in self.states:
                state.recorder = None

    # ---------------------------------------------------------------------------------------------- gates
    def save_gate(self, path: str | os.PathLike, **metadata) -> None:
        """Write `gate.safetensors` + `gate.json` (a folder), or `X.safetensors` + `X.json`."""
        from loraflow.fusion.checkpoints import save_gate

        save_gate(self, path, **metadata)

    def load_gate(self, path: str | os.PathLike, check_lora_names: bool = True) -> dict | None:
        """Load a loraflow gate or an original `.pt`; refuses a mismatch in k, hidden size, layers or LoRA order."""
        from loraflow.fusion.checkpoints import load_gate_into

        return load_gate_into(self, path, check_lora_names=check_lora_names)
