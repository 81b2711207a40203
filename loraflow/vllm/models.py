"""LoRA-Flow models for vLLM: vLLM's Llama, Mistral and Qwen2 with one gate per decoder layer.

Each is the vLLM model built with loraflow's decoder layer, which adds to the stock layer:
- `lora_fusion_gate` (flow mode): w = softmax(W x / T) + b, with x the layer input, i.e. the residual stream before
  the input norm: the `residual` the fused add-norm returns (the embeddings at layer 0);
- `qkv_lora`, `o_lora`, `gate_up_lora`, `down_lora` (`fusion.py`): the stacked LoRA terms on vLLM's merged qkv and
  gate_up layers and on o and down, all scaled by the same w (static/single: fixed weights; base: none).
Everything the folder's `loraflow` block says is fixed when the engine starts, so the forward has no per-request
state and no data-dependent Python (it traces under torch.compile and CUDA graphs).
`load_weights` loads the base through vLLM's own loader, then the LoRAs and the gate from the folder's `loraflow/`
subfolder, each tensor cut to this tensor-parallel rank's shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.utils import extract_layer_index

from loraflow.vllm.fusion import ColumnLoRA, FlowGate, RowLoRA

GROUPS = {  # fused vLLM layer -> (parent, the HF projections it holds, in its output order)
    "qkv_lora": ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "o_lora": ("self_attn", "o_proj", ("o_proj",)),
    "gate_up_lora": ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
    "down_lora": ("mlp", "down_proj", ("down_proj",)),
}


def active_loras(block: dict) -> tuple[list[int], list[float] | None]:
    """The LoRAs the engine computes and, for static/single, their fixed weights (zero-weight LoRAs are dropped:
    their terms are exactly 0)."""
    k, mode = block["k"], block["mode"]
    if mode == "flow":
        return list(range(k)), None
    if mode == "base":
        return [], None
    weights = list(block["static_weights"]) if mode == "static" else [float(i == block["lora"]) for i in range(k)]
    return [i for i in range(k) if weights[i] != 0.0], weights


class FlowLayerMixin:
    """Adds the gate and the LoRA terms to a vLLM decoder layer and runs it (before the stock layer in the MRO)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = kwargs.get("config") or kwargs["vllm_config"].model_config.hf_config
        self._init_fusion(config, extract_layer_index(kwargs["prefix"]))

    def _init_fusion(self, config, layer: int) -> None:
        block = config.loraflow
        attn = self.self_attn
        for flag in ("qk_norm", "do_llama_4_scaling"):
            if getattr(attn, flag, False):
                raise ValueError(f"loraflow: the base config enables {flag}, which LoRA-Flow models do not support")
        if getattr(self, "ada_rms_norm_t_cond", None) is not None:
            raise ValueError("loraflow: ada_rms_norm_t_cond is not supported by LoRA-Flow models")
        self.fusion_layer = layer
        self.fusion_flow = block["mode"] == "flow"
        active, static = active_loras(block)
        self.lora_fusion_gate = FlowGate(config.hidden_size, block["k"], block["temperature"]) \
            if self.fusion_flow else None
        for name, (parent, linear, projections) in GROUPS.items():
            segments = [[(i, block["loras"][i]["ranks"][p], block["loras"][i]["scalings"][p])
                         for i in active if p in block["loras"][i]["ranks"]] for p in projections]
            module = None
            if any(segments):
                base = getattr(getattr(self, parent), linear)
                if name in ("o_lora", "down_lora"):  # row-parallel
                    module = RowLoRA(base.input_size_per_partition, base.output_size_per_partition, segments[0],
                                     base.tp_size, static, k=block["k"])
                else:
                    module = ColumnLoRA(base.input_size, list(base.output_partition_sizes), segments, static,
                                        k=block["k"])
            setattr(self, name, module)
        # every LoRA term of the layer scales its rank columns by the same w: one matmul gives all their scales
        self.fusion_terms = [name for name in GROUPS if getattr(self, name) is not None]
        present = [getattr(self, name) for name in self.fusion_terms]
        self.fusion_scale_splits = [m.rank for m in present]
        self.fusion_static_scales = None  # static/single: the constant scales per term, in the model's dtype
        if present and self.fusion_flow:
            self.register_buffer("fusion_scale_matrix", torch.cat([m.scale_matrix for m in present], dim=1),
                                 persistent=False)
        elif present:
            self.register_buffer("fusion_scale_matrix", torch.cat([m.static_scale for m in present]),
                                 persistent=False)

    def finish_fusion(self) -> None:
        """After loading: the gate's constants (it folds 1/T and b into its matmuls) and the static scales."""
        if not self.fusion_scale_splits:
            return
        if self.fusion_flow:
            self.lora_fusion_gate.finish(self.fusion_scale_matrix)
        else:
            dtype = getattr(self, self.fusion_terms[0]).lora_B.dtype  # the model's
            parts = self.fusion_scale_matrix.to(dtype).split(self.fusion_scale_splits)
            self.fusion_static_scales = dict(zip(self.fusion_terms, parts))

    def _fusion_scales(self, x: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Each present LoRA term's column scales, (tokens, R) for flow (from the layer input x), (R,) for
        static/single, in `dtype`."""
        if not self.fusion_scale_splits:
            return {}
        if not self.fusion_flow:
            return self.fusion_static_scales
        scale = self.lora_fusion_gate.column_scales(x)
        if scale.dtype != dtype:
            scale = scale.to(dtype)
        return dict(zip(self.fusion_terms, scale.split(self.fusion_scale_splits, dim=-1)))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **_) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        # residual is now this layer's input x_l (tokens, hidden): the gate's input
        scales = self._fusion_scales(residual, hidden_states.dtype)  # flow: from w = the gate on x_l, fp32
        attn = self.self_attn
        qkv, _ = attn.qkv_proj(hidden_states)  # with A x in its last columns where A is fused into the base
        if self.qkv_lora is not None:
            qkv = self.qkv_lora.forward(hidden_states, qkv, scales["qkv_lora"])
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        attn_output = attn.attn(q, k, v)
        hidden_states, _ = attn.o_proj(attn_output)
        if self.o_lora is not None:
            hidden_states = self.o_lora.forward(attn_output, hidden_states, scales["o_lora"])

        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        mlp = self.mlp
        gate_up, _ = mlp.gate_up_proj(hidden_states)
        if self.gate_up_lora is not None:
            gate_up = self.gate_up_lora.forward(hidden_states, gate_up, scales["gate_up_lora"])
        act = mlp.act_fn(gate_up)
        hidden_states, _ = mlp.down_proj(act)
        if self.down_lora is not None:
            hidden_states = self.down_lora.forward(act, hidden_states, scales["down_lora"])
        return hidden_states, residual


class LoraFlowLlamaDecoderLayer(FlowLayerMixin, LlamaDecoderLayer):
    pass


class LoraFlowMistralDecoderLayer(FlowLayerMixin, MistralDecoderLayer):
    pass


class LoraFlowQwen2DecoderLayer(FlowLayerMixin, Qwen2DecoderLayer):
    pass


# ------------------------------------------------------------------------------------------------ weight loading
def _shard_rows(linear, projection: str, tensor: torch.Tensor) -> torch.Tensor:
    """The rows of a column-parallel projection's (out, r) B that this tensor-parallel rank holds."""
    if linear.tp_size == 1:
        return tensor
    if projection in ("q_proj", "k_proj", "v_proj"):
        if projection == "q_proj":
            size, rank = linear.num_heads * linear.head_size, linear.tp_rank
        else:  # KV heads: vLLM replicates them when TP > KV heads
            size, rank = linear.num_kv_heads * linear.head_size, linear.tp_rank // linear.num_kv_head_replicas
    else:
        size, rank = tensor.shape[0] // linear.tp_size, linear.tp_rank
    return tensor[rank * size:(rank + 1) * size]


def _shard_columns(linear, tensor: torch.Tensor) -> torch.Tensor:
    """The input columns of a row-parallel projection's (r, in) A that this rank holds."""
    size = linear.input_size_per_partition
    return tensor[:, linear.tp_rank * size:(linear.tp_rank + 1) * size]


def load_fusion_weights(model: nn.Module, folder: str) -> set[str]:
    """Copy the folder's LoRAs and gate into every (local) decoder layer; returns the parameter names filled."""
    from loraflow.fusion.adapters import load_adapter
    from loraflow.fusion.checkpoints import read_gate
    from loraflow.fusion.folder import GATE_DIR

    block = model.config.loraflow
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"loraflow: {folder} is not a local LoRA-Flow model folder (write one with loraflow export)")
    active, _ = active_loras(block)
    adapters = {i: load_adapter(folder / block["loras"][i]["path"]) for i in active}
    layers = [layer for layer in model.model.layers if isinstance(layer, FlowLayerMixin)]  # PP: this stage's
    gate = read_gate(folder / GATE_DIR)[0] if block["mode"] == "flow" else None
    for layer in layers:
        index = layer.fusion_layer
        if gate is not None:
            layer.lora_fusion_gate.weight.data.copy_(gate[f"layers.{index}.weight"])
            layer.lora_fusion_gate.bias.data.copy_(gate[f"layers.{index}.bias"])
        for name, (parent, linear_name, projections) in GROUPS.items():
            module = getattr(layer, name)
            if module is None:
                continue
            linear = getattr(getattr(layer, parent), linear_name)
            for s, projection in enumerate(projections):
                for i, adapter in adapters.items():
                    key = f"model.layers.{index}.{parent}.{projection}"
                    if key not in adapter.weights:
                        continue
                    a, b = adapter.weights[key]
                    if isinstance(module, RowLoRA):
                        module.load(i, _shard_columns(linear, a), b)
                    else:
                        module.load(s, i, a, _shard_rows(linear, projection, b))
            module.finish(linear)  # B^T once; A into the base weight (before vLLM packs it, after this loader)
        layer.finish_fusion()
    return {name for name, _ in model.named_parameters()
            if "lora_fusion_gate." in name or any(f".{g}." in name for g in GROUPS)}


class _FlowLoading:
    """load_weights: the base through vLLM's loader, then the LoRA-Flow tensors from the folder."""

    def _remember_folder(self, vllm_config) -> None:
        self.loraflow_folder = vllm_config.model_config.model

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        return set(loaded) | load_fusion_weights(self, self.loraflow_folder)


class LoraFlowLlamaForCausalLM(_FlowLoading, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LoraFlowLlamaDecoderLayer)
        self._remember_folder(vllm_config)


class LoraFlowMistralForCausalLM(_FlowLoading, MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LoraFlowMistralDecoderLayer)
        self._remember_folder(vllm_config)


class _FlowQwen2Model(Qwen2Model):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=LoraFlowQwen2DecoderLayer)


class LoraFlowQwen2ForCausalLM(_FlowLoading, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        # Qwen2ForCausalLM builds its Qwen2Model with the stock layer and takes no layer type: swap the class it
        # constructs for the duration of its __init__ (the only difference is the decoder layer)
        import vllm.model_executor.models.qwen2 as qwen2

        stock = qwen2.Qwen2Model
        qwen2.Qwen2Model = _FlowQwen2Model
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            qwen2.Qwen2Model = stock
        self._remember_folder(vllm_config)


__all__ = ["LoraFlowLlamaForCausalLM", "LoraFlowMistralForCausalLM", "LoraFlowQwen2ForCausalLM"]
