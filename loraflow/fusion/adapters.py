"""Read PEFT LoRA adapters (a local folder or a hub repo) into plain tensors plus their config, and validate them.

Both key styles are accepted:
- the released LoRA-Flow style, without an adapter name:
  `base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight`;
- the current in-memory PEFT style, with one: `...q_proj.lora_A.default.weight`.

Honoured config fields: `r`, `lora_alpha`, `use_rslora`, `lora_dropout`, `target_modules`, `rank_pattern`,
`alpha_pattern` and `fan_in_fan_out` (the fused layer computes `B (A x)`, which does not depend on how the *base*
weight is stored, so it only matters for merging, which loraflow never does). Anything loraflow cannot fuse
(DoRA, LoRA on embeddings, trained biases) is refused with the key named.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraflow.errors import LoraflowError
from loraflow.files import load_tensors, read_json

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoRAAdapter:
    """One LoRA: `weights[module] = (A, B)` with A (r, in_features) and B (out_features, r), module paths relative
    to the causal LM (e.g. `model.layers.0.self_attn.q_proj`)."""

    name: str
    source: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict = field(default_factory=dict)

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def dropout(self) -> float:
        return float(self.config.get("lora_dropout", 0.0) or 0.0)

    def rank(self, module: str) -> int:
        return int(self.weights[module][0].shape[0])

    def scaling(self, module: str) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA), with PEFT's per-module `alpha_pattern` applied."""
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.lora_alpha)
        r = self.rank(module)
        return float(alpha) / (math.sqrt(r) if self.use_rslora else r)

    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for `rank_pattern`/`alpha_pattern`: a key matches a module path ending in `.{key}` (regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def parse_source(source: str | os.PathLike) -> tuple[str, str | None, str | None]:
    """`owner/repo[/sub/folder][@revision]` -> (repo_id, subfolder, revision); local paths are returned as is."""
    from loraflow.bases import looks_local, missing_path_hint

    text = str(source)
    if Path(text).exists():
        return text, None, None
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser()), None, None
    if looks_local(text):  # a mistyped local folder: say so now instead of asking the hub (and retrying)
        raise LoraflowError(f"LoRA {text}: no such folder{missing_path_hint(text)}")
    revision = None
    if "@" in text:
        text, revision = text.rsplit("@", 1)
    parts = text.strip("/").split("/")
    if len(parts) < 2:
        raise LoraflowError(f"LoRA {source!r}: no such folder, and not a hub id of the form owner/repo[/subfolder]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision


def _fetch(source: str, subfolder: str | None, revision: str | None) -> Path:
    """Local folder as is; hub repo -> the cached folder holding adapter_config.json and the weights."""
    local = Path(source) / (subfolder or "")
    if local.is_dir():
        return local
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config_path = hf_hub_download(source, ADAPTER_CONFIG, subfolder=subfolder, revision=revision)
    except LocalEntryNotFoundError as e:
        raise LoraflowError(
            f"LoRA {source}{'/' + subfolder if subfolder else ''}: not a local folder and not in the hub cache, and "
            f"the hub cannot be reached ({e.__class__.__name__}). Download it with network access "
            "(bash scripts/model_preparation.sh) or pass a local folder."
        ) from None
    except Exception as e:  # hub errors (404, auth) carry useful text
        raise LoraflowError(f"LoRA {source}/{subfolder or ''}@{revision or 'main'}: {e}") from None
    for name in WEIGHT_FILES:
        try:
            hf_hub_download(source, name, subfolder=subfolder, revision=revision)
            break
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
    else:
        raise LoraflowError(f"LoRA {source}/{subfolder or ''}: neither of {WEIGHT_FILES} found on the hub")
    return Path(config_path).parent


def parse_peft_state_dict(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Group PEFT keys (either style) into {module_path: (A, B)}; refuse what cannot be fused."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names = set()
    for key, tensor in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            raise LoraflowError(
                f"LoRA {name}: key {key!r} is not a LoRA A/B weight (DoRA magnitudes, embedding LoRAs and trained "
                "biases cannot be fused)"
            )
        if m["adapter"] is not None:
            adapter_names.add(m["adapter"])
        found.setdefault(m["module"], {})[m["ab"]] = tensor
    if len(adapter_names) > 1:
        raise LoraflowError(f"LoRA {name}: the file holds adapters {sorted(adapter_names)}; save one per folder")
    weights = {}
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise LoraflowError(f"LoRA {name}: module {module} has no lora_{missing} weight")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraflowError(
                f"LoRA {name}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not share a rank"
            )
        weights[module] = (a, b)
    if not weights:
        raise LoraflowError(f"LoRA {name}: no LoRA weights found")
    return weights


def load_adapter(source: str | os.PathLike, name: str | None = None, subfolder: str | None = None,
                 revision: str | None = None) -> LoRAAdapter:
    """Load a PEFT LoRA from a local folder or a hub repo (`owner/repo[/subfolder][@revision]`)."""
    if subfolder is None and revision is None:
        repo, subfolder, revision = parse_source(source)
    else:
        repo = str(source)
    folder = _fetch(repo, subfolder, revision)
    config = read_json(folder / ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraflowError(f"{folder / ADAPTER_CONFIG}: peft_type is {peft_type}, only LORA adapters can be fused")
    if config.get("use_dora"):
        raise LoraflowError(f"{folder / ADAPTER_CONFIG}: use_dora is true; DoRA adapters cannot be fused")
    dropout = config.get("lora_dropout", 0.0) or 0.0
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoraflowError(f"{folder / ADAPTER_CONFIG}: lora_dropout={dropout!r}; it must be a number in [0, 1)")
    if config.get("bias", "none") not in ("none", None):
        raise LoraflowError(f"{folder / ADAPTER_CONFIG}: bias={config['bias']!r}; only bias='none' can be fused")
    weight_file = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weight_file is None:
        raise LoraflowError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")
    weights = parse_peft_state_dict(load_tensors(weight_file), name or folder.name)
    adapter = LoRAAdapter(name=name or Path(str(subfolder or repo)).name, source=str(source), weights=weights,
                          config=config)
    for module, (a, _) in weights.items():
        expected = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", a.shape[0]))
        if int(expected) != a.shape[0]:
            raise LoraflowError(
                f"LoRA {adapter.name}: {module} has rank {a.shape[0]} but {weight_file.parent / ADAPTER_CONFIG} "
                f"says r={expected}"
            )
    return adapter


def validate_adapter(adapter: LoRAAdapter, model: nn.Module, layer_of: dict[str, int]) -> None:
    """Check every LoRA weight against the base model: module exists, is an `nn.Linear` inside a decoder layer, and
    A/B fit its in/out features. `layer_of` maps module paths to decoder-layer indices."""
    modules = dict(model.named_modules())
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for module, (a, b) in adapter.weights.items():
        target = modules.get(module)
        if target is None:
            n_layers = 1 + max(layer_of.values(), default=-1)
            raise LoraflowError(
                f"LoRA {adapter.name}: key for {module} has no matching module in the base model "
                f"({type(model).__name__}, {n_layers} decoder layers). Is this LoRA for another base model?"
            )
        base = getattr(target, "base_layer", target)
        if not isinstance(base, nn.Linear):
            raise LoraflowError(f"LoRA {adapter.name}: {module} is a {type(base).__name__}, not an nn.Linear")
        if module not in layer_of:
            raise LoraflowError(
                f"LoRA {adapter.name}: {module} is outside the decoder layers; LoRA-Flow gates are per decoder layer"
            )
        for label, tensor, expected in (("lora_A", a, (a.shape[0], base.in_features)),
                                        ("lora_B", b, (base.out_features, a.shape[0]))):
            if tuple(tensor.shape) != expected:
                raise LoraflowError(
                    f"LoRA {adapter.name}: {module}.{label} has shape {tuple(tensor.shape)}, but the base module "
                    f"needs {expected} (base hidden_size {hidden}). Is this LoRA for another base model?"
                )
