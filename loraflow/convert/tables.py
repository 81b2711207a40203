"""Pure state-dict -> state-dict converters between loraflow and the original LoRA-Flow (BMTrain/ModelCenter) formats.

Every converter is driven by a mapping table, takes sizes from the tensors or configs it is given (never hard-coded
layer counts or widths), and is strict: an unknown key, a missing layer or a wrong shape is a `LoraflowError` that
names the key. Nothing here touches files; `checkpoints.py` and the CLI do the I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from loraflow.errors import LoraflowError


# ---------------------------------------------------------------------------------------------------------------
# The table engine shared by the LoRA and base converters. A `Row` maps one tensor name on the source side to one
# on the destination side; `{l}` stands for the decoder layer index. `shape` names the expected sizes, resolved
# from the config: h = hidden, f = intermediate (dim_ff), v = vocab, q = heads * head_dim, kv = kv_heads * head_dim,
# r = the LoRA rank of `module` in that layer. A size the config does not give is bound on first sight, so all
# tensors must at least agree with each other.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    src: str
    dst: str
    shape: tuple[str, ...]
    module: str = ""

    def flipped(self) -> Row:
        return Row(self.dst, self.src, self.shape, self.module)


def _key_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{l\}", r"(\d+)") + "$")


def _listing(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _plan(shapes: Mapping[str, Sequence[int] | None], rows, what: str, num_layers: int | None = None,
          drop=(), partial: bool = False) -> tuple[dict[str, tuple[str | None, Row | None, int | None]], int]:
    """Map every key of `shapes` through `rows`: ({src: (dst or None to drop, row, layer)}, num_layers).

    Raises on keys no row (nor a `drop` pattern) matches, on layers >= `num_layers`, and, unless `partial`, on any
    row x layer with no key (layers 0..num_layers-1; `num_layers` defaults to the highest layer seen + 1).
    """
    compiled = [(row, _key_regex(row.src)) for row in rows]
    plan, unknown = {}, []
    for key in shapes:
        if any(p.match(key) for p in drop):
            plan[key] = (None, None, None)
            continue
        for row, rx in compiled:
            m = rx.match(key)
            if m:
                layer = int(m.group(1)) if rx.groups else None
                if layer is not None and num_layers is not None and layer >= num_layers:
                    unknown.append(f"{key} (layer {layer} >= num_layers {num_layers})")
                else:
                    plan[key] = (row.dst.format(l=layer), row, layer)
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoraflowError(f"{what}: unknown keys: {_listing(sorted(unknown))}")
    layers = [layer for _, _, layer in plan.values() if layer is not None]
    if num_layers is None:
        if not layers:
            raise LoraflowError(f"{what}: no per-layer tensors found")
        num_layers = max(layers) + 1
    if not partial:
        missing = [r.src.format(l=i) for r in rows for i in (range(num_layers) if "{l}" in r.src else [None])
                   if r.src.format(l=i) not in shapes]
        if missing:
            raise LoraflowError(f"{what}: missing keys (layers 0..{num_layers - 1}): {_listing(missing)}")
    return plan, num_layers


def _check_shapes(plan, shapes, dims: Mapping[str, int | None], what: str, rank=None) -> dict:
    """Check each planned tensor's shape against `dims` (and `rank(module, layer)`); return the sizes bound."""
    bound: dict[tuple, int] = {}
    bad = []
    for key, (_, row, layer) in plan.items():
        shape = shapes[key]
        if row is None or shape is None:
            continue
        shape = tuple(int(s) for s in shape)
        expected = []
        for i, sym in enumerate(row.shape):
            slot, value = ((sym, row.module, layer), rank(row.module, layer) if rank else None) if sym == "r" \
                else ((sym,), dims.get(sym))
            if value is None:
                value = bound.setdefault(slot, shape[i] if i < len(shape) else -1)
            expected.append(value)
        if shape != tuple(expected):
            bad.append(f"{key} has shape {shape}, expected {tuple(expected)}")
    if bad:
        raise LoraflowError(f"{what}: wrong shapes: {_listing(bad, 6)}")
    return bound


def _apply(plan, state_dict, dtype=None) -> dict[str, torch.Tensor]:
    """Rename by `plan` (tensors are shared, not copied); cast floating tensors only if `dtype` is given."""
    out = {}
    for key, tensor in state_dict.items():
        dst = plan[key][0]
        if dst is not None:
            out[dst] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def _shapes(state_dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------
# Gates. Original release (SPEC §5), per decoder layer i:
#   encoder.layers.{i}.lora_fusion_gate.weight  (k, hidden)  fp16
#   encoder.layers.{i}.weight_bias              (1, k)       fp16
# loraflow gate file (gate.safetensors), per decoder layer i:
#   layers.{i}.weight  (k, hidden)  fp32
#   layers.{i}.bias    (k,)         fp32
# ---------------------------------------------------------------------------------------------------------------
GATE_ROWS = (
    Row("encoder.layers.{l}.lora_fusion_gate.weight", "layers.{l}.weight", ("k", "h")),
    Row("encoder.layers.{l}.weight_bias", "layers.{l}.bias", ("one", "k")),
)
ORIGINAL_GATE_PATTERNS = {"weight": _key_regex(GATE_ROWS[0].src), "bias": _key_regex(GATE_ROWS[1].src)}
LORAFLOW_GATE_PATTERNS = {"weight": _key_regex(GATE_ROWS[0].dst), "bias": _key_regex(GATE_ROWS[1].dst)}


def _gate_plan(state_dict, rows, what):
    # A bias may come as (1, k) (the release) or (k,) (loraflow): both are checked as (1, k).
    shapes = {k: (1, *v.shape) if v.dim() == 1 and "bias" in k else tuple(v.shape) for k, v in state_dict.items()}
    plan, num_layers = _plan(shapes, rows, what)
    bound = _check_shapes(plan, shapes, {"one": 1}, what)
    return plan, (num_layers, bound[("k",)], bound[("h",)])


def gate_original_to_loraflow(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original released gate (`encoder.layers.{i}.lora_fusion_gate.weight`, `...weight_bias`) -> loraflow gate."""
    plan, _ = _gate_plan(state_dict, GATE_ROWS, "original gate")
    return {dst: (state_dict[src].reshape(-1) if dst.endswith(".bias") else state_dict[src]).float().clone()
            for src, (dst, _, _) in plan.items()}


def gate_loraflow_to_original(state_dict: dict[str, torch.Tensor], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """loraflow gate -> the original release's key names, shapes and dtype (fp16 by default)."""
    plan, _ = _gate_plan(state_dict, [r.flipped() for r in GATE_ROWS], "loraflow gate")
    return {dst: (state_dict[src].reshape(1, -1) if dst.endswith("weight_bias") else state_dict[src]).to(dtype).clone()
            for src, (dst, _, _) in plan.items()}


def gate_shape(state_dict: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(num_layers, k, hidden) of a loraflow-format gate state dict (validated)."""
    return _gate_plan(state_dict, [r.flipped() for r in GATE_ROWS], "loraflow gate")[1]


# ---------------------------------------------------------------------------------------------------------------
# The seven projections of a Llama decoder layer (SPEC §5): Hugging Face module under `model.layers.{l}`,
# ModelCenter module under `encoder.layers.{l}`, input size, output size (nn.Linear weights are (out, in)).
# ---------------------------------------------------------------------------------------------------------------
PROJECTIONS = (
    ("self_attn.q_proj", "self_att.self_attention.project_q", "h", "q"),
    ("self_attn.k_proj", "self_att.self_attention.project_k", "h", "kv"),
    ("self_attn.v_proj", "self_att.self_attention.project_v", "h", "kv"),
    ("self_attn.o_proj", "self_att.self_attention.attention_out", "q", "h"),
    ("mlp.gate_proj", "ffn.ffn.w_in.w_0", "h", "f"),
    ("mlp.up_proj", "ffn.ffn.w_in.w_1", "h", "f"),
    ("mlp.down_proj", "ffn.ffn.w_out", "f", "h"),
)
PROJECTION_NAMES = tuple(hf.split(".")[-1] for hf, *_ in PROJECTIONS)  # q_proj ... down_proj (PEFT target names)


def hf_dims(config: Mapping) -> dict[str, int]:
    """Sizes (h, f, v, q, kv, layers) from a Hugging Face Llama config.json dict; missing fields are errors."""
    config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    need = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in need if config.get(k) is None]
    if missing:
        raise LoraflowError(f"Hugging Face config: missing {missing} (is this a Llama config.json?)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {"h": config["hidden_size"], "f": config["intermediate_size"], "v": config["vocab_size"],
            "q": heads * head_dim, "kv": (config.get("num_key_value_heads") or heads) * head_dim,
            "layers": config["num_hidden_layers"]}


# ---------------------------------------------------------------------------------------------------------------
# LoRA: PEFT <-> BMTrain/ModelCenter (SPEC §5). PEFT keys may carry an adapter name (`lora_A.default.weight`, the
# in-memory style); saved PEFT adapters and everything written here have none.
# ---------------------------------------------------------------------------------------------------------------
LORA_ROWS = tuple(
    Row(f"base_model.model.model.layers.{{l}}.{hf}.lora_{ab}.weight",
        f"encoder.layers.{{l}}.{mc}_lora.lora_{ab}.weight", ("r", din) if ab == "A" else (dout, "r"), module=hf)
    for hf, mc, din, dout in PROJECTIONS for ab in "AB"
)
_ADAPTER_NAME = re.compile(r"\.lora_([AB])\.([^.]+)\.weight$")


def _strip_adapter_name(state_dict, adapter_name: str | None) -> dict[str, torch.Tensor]:
    """`...lora_A.<name>.weight` -> `...lora_A.weight`; refuse a mix of adapters unless one is chosen."""
    names = {m.group(2) for k in state_dict if (m := _ADAPTER_NAME.search(k))}
    if adapter_name is None and len(names) > 1:
        raise LoraflowError(f"PEFT LoRA: several adapters in one state dict {sorted(names)}; choose one")
    out = {}
    for key, tensor in state_dict.items():
        m = _ADAPTER_NAME.search(key)
        if m and adapter_name is not None and m.group(2) != adapter_name:
            continue
        out[_ADAPTER_NAME.sub(r".lora_\1.weight", key) if m else key] = tensor
    return out


def _lora_rank_fn(lora_config: Mapping | None):
    """rank(module, layer) from a PEFT-style config (r, rank_pattern matched as PEFT does), or None."""
    if not lora_config or lora_config.get("r") is None:
        return None
    patterns = dict(lora_config.get("rank_pattern") or {})

    def rank(module: str, layer: int) -> int:
        name = f"model.layers.{layer}.{module}"
        for pattern, r in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                return int(r)
        return int(lora_config["r"])

    return rank


def _lora_plan(shapes, rows, what, lora_config, base_config):
    base = hf_dims(base_config) if base_config is not None else {}
    modules = {r.module for r in rows if any(_key_regex(r.src).match(k) for k in shapes)}
    targets = (lora_config or {}).get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        extra = sorted({m.split(".")[-1] for m in modules} - set(targets))
        if extra:
            raise LoraflowError(f"{what}: tensors for {extra}, which are not in target_modules {sorted(targets)}")
        modules |= {r.module for r in rows if r.module.split(".")[-1] in targets}
    plan, num_layers = _plan(shapes, [r for r in rows if r.module in modules] or rows, what,
                             num_layers=base.get("layers"))
    _check_shapes(plan, shapes, base, what, rank=_lora_rank_fn(lora_config))
    return plan, num_layers


def check_peft_lora(state_dict, peft_config: Mapping | None = None, base_config: Mapping | None = None,
                    adapter_name: str | None = None) -> dict:
    """Validate a PEFT LoRA state dict; return {"num_layers", "target_modules", "ranks": {module: rank}}."""
    state_dict = _strip_adapter_name(state_dict, adapter_name)
    plan, num_layers = _lora_plan(_shapes(state_dict), LORA_ROWS, "PEFT LoRA", peft_config, base_config)
    ranks = {row.module.split(".")[-1]: state_dict[k].shape[0] for k, (_, row, _) in plan.items()
             if k.endswith("lora_A.weight")}
    return {"num_layers": num_layers, "target_modules": [m for m in PROJECTION_NAMES if m in ranks], "ranks": ranks}


def lora_peft_to_bmtrain(state_dict, peft_config: Mapping | None = None, base_config: Mapping | None = None,
                         adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """PEFT LoRA (`base_model.model.model.layers.{l}.self_attn.q_proj.lora_A[.name].weight`) -> BMTrain/ModelCenter.

    Checks ranks against `peft_config` (adapter_config.json: r, rank_pattern, target_modules) and, when
    `base_config` (the base model's config.json) is given, in/out sizes and the layer count.
    """
    state_dict = _strip_adapter_name(state_dict, adapter_name)
    plan, _ = _lora_plan(_shapes(state_dict), LORA_ROWS, "PEFT LoRA", peft_config, base_config)
    return _apply(plan, state_dict)


def lora_bmtrain_to_peft(state_dict, lora_config: Mapping | None = None,
                         base_config: Mapping | None = None) -> dict[str, torch.Tensor]:
    """BMTrain/ModelCenter LoRA (`encoder.layers.{l}.self_att.self_attention.project_q_lora.lora_A.weight`) -> PEFT,
    in the standard saved style (no adapter name). Same checks as `lora_peft_to_bmtrain`."""
    rows = [r.flipped() for r in LORA_ROWS]
    plan, _ = _lora_plan(_shapes(state_dict), rows, "BMTrain LoRA", lora_config, base_config)
    return _apply(plan, state_dict)


def lora_config_peft_to_bmtrain(peft_config: Mapping, num_layers: int) -> dict:
    """The JSON written beside a BMTrain LoRA: what a BMTrain trainer needs (r, alpha, dropout, targets) plus the
    full adapter_config.json, so the reverse conversion rebuilds it exactly."""
    if str(peft_config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraflowError(f"adapter_config.json: peft_type {peft_config.get('peft_type')!r} is not LORA")
    targets = peft_config.get("target_modules")
    return {"format": "modelcenter-lora", "r": peft_config.get("r"), "lora_alpha": peft_config.get("lora_alpha"),
            "lora_dropout": peft_config.get("lora_dropout", 0.0),
            "target_modules": sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
            "rank_pattern": peft_config.get("rank_pattern") or {}, "use_rslora": bool(peft_config.get("use_rslora")),
            "num_layers": num_layers, "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
            "peft_config": dict(peft_config)}


def lora_config_bmtrain_to_peft(lora_config: Mapping) -> dict:
    """adapter_config.json for a converted BMTrain LoRA: the stored original if there is one, else a fresh one."""
    if lora_config.get("peft_config"):
        return dict(lora_config["peft_config"])
    missing = [k for k in ("r", "lora_alpha", "target_modules") if lora_config.get(k) is None]
    if missing:
        raise LoraflowError(f"BMTrain LoRA config: missing {missing} (needed to write adapter_config.json)")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_config["r"],
            "lora_alpha": lora_config["lora_alpha"], "lora_dropout": lora_config.get("lora_dropout", 0.0),
            "target_modules": list(lora_config["target_modules"]), "bias": "none",
            "rank_pattern": lora_config.get("rank_pattern") or {}, "use_rslora": bool(lora_config.get("use_rslora")),
            "base_model_name_or_path": lora_config.get("base_model_name_or_path"), "inference_mode": True}


# ---------------------------------------------------------------------------------------------------------------
# Base model: Hugging Face Llama <-> ModelCenter Llama (SPEC §5; ModelCenter writes `pytorch_model.pt`).
# ---------------------------------------------------------------------------------------------------------------
HF_HEAD, MC_HEAD = "lm_head.weight", "output_projection.weight"
BASE_ROWS = (
    Row("model.embed_tokens.weight", "input_embedding.weight", ("v", "h")),
    Row("model.norm.weight", "encoder.output_layernorm.weight", ("h",)),
    Row("model.layers.{l}.input_layernorm.weight", "encoder.layers.{l}.self_att.layernorm_before_attention.weight",
        ("h",)),
    Row("model.layers.{l}.post_attention_layernorm.weight", "encoder.layers.{l}.ffn.layernorm_before_ffn.weight",
        ("h",)),
    *(Row(f"model.layers.{{l}}.{hf}.weight", f"encoder.layers.{{l}}.{mc}.weight", (dout, din))
      for hf, mc, din, dout in PROJECTIONS),
)
HEAD_ROW = Row(HF_HEAD, MC_HEAD, ("v", "h"))
# Buffers some Hugging Face checkpoints carry but every loader recomputes: dropped, not refused.
HF_DERIVED_BUFFERS = (_key_regex("model.layers.{l}.self_attn.rotary_emb.inv_freq"),)

# ModelCenter config.json field <- Hugging Face config.json field. The first seven are what the original's
# transform script wrote; vocab_size and tied are ModelCenter LlamaConfig fields it left at their defaults.
BASE_CONFIG_FIELDS = (
    ("dim_model", "hidden_size"), ("dim_ff", "intermediate_size"), ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"), ("num_heads_kv", "num_key_value_heads"), ("dim_head", "head_dim"),
    ("norm_eps", "rms_norm_eps"), ("vocab_size", "vocab_size"), ("tied", "tie_word_embeddings"),
)
MC_DEFAULTS = {"vocab_size": 32000, "norm_eps": 1e-6, "tied": False}  # ModelCenter LlamaConfig's own defaults
# Hugging Face settings ModelCenter's Llama cannot express: converting a model that needs another value would
# silently change what it computes, so it is refused.
HF_FIXED = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_type": "default", "rope_theta": 10000.0}
LLAMA_DEFAULTS = {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
# Used for the Hugging Face fields ModelCenter does not record, when no reference HF config is at hand.
HF_FILL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 4096, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}


def _hf_value(config: Mapping, key: str):
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if key in ("rope_type", "rope_theta"):
        value = rope.get(key, rope.get("type")) if key == "rope_type" else rope.get(key, config.get(key))
        return value if value is not None else HF_FIXED[key]
    if key == "num_key_value_heads":
        return config.get(key) or config.get("num_attention_heads")
    if key == "head_dim":
        return config.get(key) or config["hidden_size"] // config["num_attention_heads"]
    return config.get(key, LLAMA_DEFAULTS.get(key))


def base_config_hf_to_modelcenter(hf_config: Mapping) -> dict:
    """ModelCenter config.json from a Hugging Face Llama config.json (refusing what ModelCenter cannot express)."""
    hf_config = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
    hf_dims(hf_config)
    wrong = {k: _hf_value(hf_config, k) for k, v in HF_FIXED.items() if _hf_value(hf_config, k) != v}
    if wrong:
        raise LoraflowError(f"Hugging Face config: {wrong} cannot be expressed in a ModelCenter Llama config "
                            f"(it needs {({k: HF_FIXED[k] for k in wrong})})")
    return {mc: _hf_value(hf_config, hf) for mc, hf in BASE_CONFIG_FIELDS}


def base_config_modelcenter_to_hf(mc_config: Mapping, reference: Mapping | None = None) -> dict:
    """Hugging Face config.json from a ModelCenter one. Fields ModelCenter does not record (max positions, token
    ids, ...) come from `reference` (e.g. the HF config the model was converted from), else from Llama-2's."""
    need = ["dim_model", "dim_ff", "num_layers", "num_heads", "dim_head"]
    missing = [k for k in need if mc_config.get(k) is None]
    if missing:
        raise LoraflowError(f"ModelCenter config: missing {missing} (is this a ModelCenter config.json?)")
    mc = {**MC_DEFAULTS, **mc_config}
    if mc.get("num_heads_kv") in (None, -1):
        mc["num_heads_kv"] = mc["num_heads"]
    derived = {hf: mc[k] for k, hf in BASE_CONFIG_FIELDS}
    if reference is None:
        return {**HF_FILL, **derived}
    reference = dict(reference)
    clash = {hf: (_hf_value(reference, hf), v) for hf, v in derived.items() if _hf_value(reference, hf) != v}
    if clash:
        raise LoraflowError(f"the reference Hugging Face config disagrees with the ModelCenter config "
                            f"(field: (reference, modelcenter)): {clash}")
    return reference  # it already implies every derived value: returned as is, so a round trip is exact


def _base_plan(shapes, dims, rows, head: Row, tied: bool, what: str, drop=(), partial=False):
    if tied and head.src in shapes:
        raise LoraflowError(f"{what}: the config ties the output layer to the embeddings, yet the checkpoint has "
                            f"{head.src}; untie it in config.json if it is a separate head, or remove the key")
    rows = list(rows) if tied else [*rows, head]
    plan, _ = _plan(shapes, rows, what, num_layers=dims["layers"], drop=drop, partial=partial)
    _check_shapes(plan, shapes, dims, what)
    return plan


def base_plan_hf_to_modelcenter(shapes: Mapping[str, Sequence[int] | None], hf_config: Mapping,
                                partial: bool = False) -> dict:
    """Validate HF Llama tensor names/shapes ({key: shape or None}); return {hf_key: (mc_key or None, row, layer)}.

    `partial=True` skips the missing-key check (for one shard of many; check all names first without it).
    """
    dims = hf_dims(hf_config)
    tied = base_config_hf_to_modelcenter(hf_config)["tied"]
    return _base_plan(shapes, dims, BASE_ROWS, HEAD_ROW, tied, "Hugging Face Llama", HF_DERIVED_BUFFERS, partial)


def base_plan_modelcenter_to_hf(shapes: Mapping[str, Sequence[int] | None], mc_config: Mapping,
                                partial: bool = False) -> dict:
    """Like `base_plan_hf_to_modelcenter`, from ModelCenter names to Hugging Face names."""
    hf_config = base_config_modelcenter_to_hf(mc_config)
    return _base_plan(shapes, hf_dims(hf_config), [r.flipped() for r in BASE_ROWS], HEAD_ROW.flipped(),
                      hf_config["tie_word_embeddings"], "ModelCenter Llama", partial=partial)


def base_hf_to_modelcenter(state_dict, hf_config: Mapping, dtype: torch.dtype | None = None):
    """Hugging Face Llama state dict -> ModelCenter Llama state dict (tensors shared; cast only if `dtype`)."""
    return _apply(base_plan_hf_to_modelcenter(_shapes(state_dict), hf_config), state_dict, dtype)


def base_modelcenter_to_hf(state_dict, mc_config: Mapping, dtype: torch.dtype | None = None):
    """ModelCenter Llama state dict -> Hugging Face Llama state dict (tensors shared; cast only if `dtype`)."""
    return _apply(base_plan_modelcenter_to_hf(_shapes(state_dict), mc_config), state_dict, dtype)

