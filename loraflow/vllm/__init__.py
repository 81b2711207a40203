"""loraflow's vLLM plugin: LoRA-Flow model folders (`loraflow export`) served by vLLM.

vLLM calls `register()` in every engine process through the `vllm.general_plugins` entry point (pyproject.toml),
so `vllm serve OUT`, `LLM(model=OUT)`, `loraflow serve OUT` and lm-eval's vllm backend all find loraflow's
architectures. The classes are registered lazily (`module:Class` strings): importing this package never imports
vLLM or torch, so `loraflow --help` stays fast and vLLM is needed only where it runs.
"""

from __future__ import annotations

from loraflow.fusion.folder import ARCHITECTURES

MODELS_MODULE = "loraflow.vllm.models"


def register() -> None:
    """Register LoraFlow{Llama,Mistral,Qwen2}ForCausalLM with vLLM's ModelRegistry (idempotent)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"{MODELS_MODULE}:{name}")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
