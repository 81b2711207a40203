"""loraflow: LoRA-Flow (Wang et al., ACL 2024) as a library.

k frozen LoRA modules on one frozen Hugging Face causal LM, fused per token by one tiny gate per decoder layer:
`w_l = softmax(W_l x / T) + b_l`, where x is the layer's input hidden state; the same w_l weights the LoRA outputs
of every targeted projection of layer l.

    from loraflow import FlowModel
    model = FlowModel.from_pretrained(base, loras=[lang_lora, task_lora], gate="zh_math.pt")
"""

from loraflow.errors import LoraflowError

__version__ = "0.1.0"

_LAZY = {
    "FlowModel": "loraflow.fusion.model",
    "FusionGate": "loraflow.fusion.gate",
    "FusedLoRALinear": "loraflow.fusion.layers",
    "LoRAAdapter": "loraflow.fusion.adapters",
    "load_adapter": "loraflow.fusion.adapters",
    "inject_fusion": "loraflow.fusion.model",
    "is_gate_parameter": "loraflow.fusion.model",
}

__all__ = ["LoraflowError", "__version__", *_LAZY]


def __getattr__(name: str):
    # torch-heavy names are imported on first use, so `loraflow --help` and the scorers start fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraflow' has no attribute {name!r}")
