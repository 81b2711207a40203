"""scripts/model_preparation.sh and loraflow/release.py with the hub stubbed by a local folder laid out like the
release (tiny PEFT LoRAs with the original key names as .bin pickles, fp16 gates with the original key names)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loraflow.convert.release import GATES, LORAS, PrepareConfig, prepare_models
from loraflow.convert.tables import PROJECTIONS, gate_original_to_loraflow
from loraflow.errors import LoraflowError
from loraflow.files import load_tensors

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "model_preparation.sh"


BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False}
SIZES = {"h": 64, "q": 64, "kv": 32, "f": 160}  # what BASE implies (head_dim 16)


def _release_lora(folder: Path, r: int, seed: int) -> None:
    """A LoRA as the release ships it: adapter_config.json + an fp16 adapter_model.bin with old-style keys."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(BASE["num_hidden_layers"]):
        for hf, _, din, dout in PROJECTIONS:
            prefix = f"base_model.model.model.layers.{layer}.{hf}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, SIZES[din], generator=g).half()
            state[f"{prefix}.lora_B.weight"] = torch.randn(SIZES[dout], r, generator=g).half()
    folder.mkdir(parents=True)
    torch.save(state, folder / "adapter_model.bin")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.1,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "bias": "none", "base_model_name_or_path": "/data/llama2-7b-hf"}
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release folder, tiny base folder): LoRAs/{zh,ru,es,math,code}_lora + Gates/{lang}_{task}.pt."""
    root = tmp_path_factory.mktemp("release")
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(BASE))  # config.json only: preparation never reads base weights
    for i, name in enumerate(LORAS):
        _release_lora(root / "LoRA-Flow" / "LoRAs" / name, r=8 if name == "code_lora" else 4, seed=i)
    (root / "LoRA-Flow" / "Gates").mkdir()
    for j, name in enumerate(GATES):
        g = torch.Generator().manual_seed(j)
        gate = {}
        for layer in range(BASE["num_hidden_layers"]):
            gate[f"encoder.layers.{layer}.lora_fusion_gate.weight"] = torch.randn(2, 64, generator=g).half()
            gate[f"encoder.layers.{layer}.weight_bias"] = torch.randn(1, 2, generator=g).half()
        torch.save(gate, root / "LoRA-Flow" / "Gates" / f"{name}.pt")
    return root / "LoRA-Flow", base


def _script(tmp_path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "HF_HOME": str(tmp_path / "hf_home"), **env}
    full.pop("PYTHONPATH", None)  # the script puts the repository on the path itself
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_script_prepares_a_local_release_then_a_rerun_does_nothing(release, tmp_path):
    repo, base = release
    ckpt = tmp_path / "ckpt"
    env = {"REPO": str(repo), "BASE_MODEL": str(base), "CHECKPOINT_DIR": str(ckpt)}
    first = _script(tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert "+ " in first.stderr and "prepare-models" in first.stderr  # the command is echoed
    for name in GATES:
        meta = json.loads((ckpt / "Gates" / name / "gate.json").read_text())
        lang, task = name.split("_")
        assert meta["lora_names"] == [f"{lang}_lora", f"{task}_lora"]
        assert meta["temperature"] == (1.1 if name in ("zh_math", "ru_math") else 1.0)
        converted = load_tensors(ckpt / "Gates" / name / "gate.safetensors")
        expected = gate_original_to_loraflow(load_tensors(repo / "Gates" / f"{name}.pt"))
        assert all(torch.equal(converted[k], expected[k]) for k in expected)
    for name in LORAS:
        assert (ckpt / "LoRAs" / name / "adapter_model.bin").read_bytes() == \
            (repo / "LoRAs" / name / "adapter_model.bin").read_bytes()
        assert f"{name}: checked (2 layers, ranks [{8 if name == 'code_lora' else 4}])" in first.stderr
    assert not (ckpt / "BM_LoRAs").exists()
    stamp = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file()}

    second = _script(tmp_path, **env)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr and "zh_lora: present, sha256 verified" in second.stderr
    assert "Gates/zh_math up to date" in second.stderr
    assert stamp == {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_script_offline_with_a_hub_repo_fails_fast_saying_how_to_supply_files(release, tmp_path):
    repo, base = release
    start = time.monotonic()
    result = _script(tmp_path, HF_HUB_OFFLINE="1", REPO="Bowen232/LoRA-Flow", BASE_MODEL=str(base),
                     CHECKPOINT_DIR=str(tmp_path / "ckpt"), ONLY="zh_lora zh_math")
    assert result.returncode == 2 and time.monotonic() - start < 30
    assert "HF_HUB_OFFLINE is set" in result.stderr and "REPO=/path/to/LoRA-Flow" in result.stderr
    assert "LoRAs/zh_lora/adapter_config.json" in result.stderr and "Gates/zh_math.pt" in result.stderr
    assert "ru_lora" not in result.stderr  # ONLY is honoured
    assert not list((tmp_path / "ckpt").rglob("*.pt"))

    # Offline, but the file is in the Hugging Face cache: taken from there.
    snapshot = tmp_path / "hf_home" / "hub" / "models--Bowen232--LoRA-Flow" / "snapshots" / "0123abc"
    (snapshot / "Gates").mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    shutil.copy(repo / "Gates" / "zh_math.pt", snapshot / "Gates" / "zh_math.pt")
    cached = _script(tmp_path, HF_HUB_OFFLINE="1", REPO="Bowen232/LoRA-Flow", BASE_MODEL=str(base),
                     CHECKPOINT_DIR=str(tmp_path / "ckpt"), ONLY="zh_math")
    assert cached.returncode == 0, cached.stderr
    assert "copied Gates/zh_math.pt from the Hugging Face cache" in cached.stderr
    assert (tmp_path / "ckpt" / "Gates" / "zh_math" / "gate.safetensors").is_file()


def test_only_subset_and_bmtrain_forms(release, tmp_path):
    repo, base = release
    ckpt = tmp_path / "ckpt"
    cfg = PrepareConfig(repo=str(repo), base_model=str(base), checkpoint_dir=ckpt,
                        only=["zh_lora math_lora", "zh_math"], convert_bmtrain=True)
    done = prepare_models(cfg, say=lambda m: None)
    assert list(done) == ["zh_lora", "math_lora", "zh_math"]
    assert sorted(p.name for p in (ckpt / "LoRAs").iterdir()) == ["math_lora", "zh_lora"]
    assert sorted(p.name for p in (ckpt / "BM_LoRAs").iterdir()) == ["math", "zh"]
    bmt = load_tensors(ckpt / "BM_LoRAs" / "zh" / "lora.pt")
    assert "encoder.layers.1.self_att.self_attention.project_v_lora.lora_B.weight" in bmt
    assert json.loads((ckpt / "BM_LoRAs" / "zh" / "lora_config.json").read_text())["lora_alpha"] == 16


def test_release_that_does_not_fit_the_base_is_refused(release, tmp_path):
    repo, _ = release
    other = tmp_path / "other_base.json"
    other.write_text(json.dumps({**BASE, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}))
    with pytest.raises(LoraflowError, match="wrong shapes"):
        prepare_models(PrepareConfig(repo=str(repo), base_model=str(other), checkpoint_dir=tmp_path / "c",
                                     only=["ru_lora"]), say=lambda m: None)
    with pytest.raises(LoraflowError, match=r"gate does not fit: 2 layers x hidden 64, base model has 2 x 32"):
        prepare_models(PrepareConfig(repo=str(repo), base_model=str(other), checkpoint_dir=tmp_path / "c",
                                     only=["ru_code"]), say=lambda m: None)
    with pytest.raises(LoraflowError, match="unknown names"):
        PrepareConfig(only=["fr_lora"])


def test_a_changed_file_is_checked_again(release, tmp_path):
    repo, base = release
    cfg = PrepareConfig(repo=str(repo), base_model=str(base), checkpoint_dir=tmp_path / "c", only=["es_code"])
    prepare_models(cfg, say=lambda m: None)
    gate = load_tensors(tmp_path / "c" / "Gates" / "es_code.pt")
    gate["encoder.layers.1.lora_fusion_gate.weight"] = torch.zeros(3, 64, dtype=torch.float16)
    torch.save(gate, tmp_path / "c" / "Gates" / "es_code.pt")
    with pytest.raises(LoraflowError, match=r"encoder\.layers\.1\.lora_fusion_gate\.weight has shape \(3, 64\)"):
        prepare_models(cfg, say=lambda m: None)
