"""The gate temperature, one rule (`loraflow.eval.registry.resolve_temperature`): an explicit value wins; else the
value the gate file records; else the registry's default for the pair (1.1 for zh/ru math, as the original ran
those gates). eval, plot-gates and training's dev metric all apply it; run.json and results.json say which."""

from __future__ import annotations

import pytest
import torch

from loraflow.cli import main
from loraflow.errors import LoraflowError
from loraflow.eval.registry import default_temperature, resolve_temperature
from loraflow.fusion.checkpoints import write_gate
from loraflow.tiny import tiny_original_gate


def _loraflow_gate(path, temperature):
    tensors = {}
    for i in range(2):
        tensors[f"layers.{i}.weight"] = torch.zeros(2, 64)
        tensors[f"layers.{i}.bias"] = torch.zeros(2)
    config = {"format": "loraflow-gate", "k": 2, "lora_names": ["zh_lora", "math_lora"], "hidden_size": 64,
              "num_layers": 2}
    if temperature is not None:
        config["temperature"] = temperature
    write_gate(path, tensors, config)
    return path


def test_gate_temperatures_are_the_originals():
    """SPEC §1: 1.1 for the zh-math and ru-math gates, 1.0 for every other pair."""
    assert default_temperature("zh", "math") == default_temperature("ru", "math") == 1.1
    assert {default_temperature(lang, task) for lang, task in
            [("es", "math"), ("zh", "code"), ("ru", "code"), ("es", "code"), ("en", "math")]} == {1.0}


def test_explicit_then_gate_file_then_the_pairs_default(tmp_path):
    recorded = _loraflow_gate(tmp_path / "zh_math", 1.0)  # e.g. a gate trained by `loraflow train` at T = 1
    original = tmp_path / "zh_math.pt"
    torch.save(tiny_original_gate(), original)  # the release format records no temperature
    assert resolve_temperature(1.3, recorded, "zh", "math") == (1.3, "explicit")
    assert resolve_temperature(None, recorded, "zh", "math") == (1.0, "gate file")
    assert resolve_temperature(None, original, "zh", "math") == (1.1, "default for zh_math")
    assert resolve_temperature(None, original) == (1.1, "default for zh_math")  # the pair from the file's name
    assert resolve_temperature(None, original, "es", "math") == (1.0, "default for es_math")
    unnamed = _loraflow_gate(tmp_path / "mine", None)
    assert resolve_temperature(None, unnamed) == (1.0, "default")
    assert resolve_temperature(None, None, "ru", "math", recorded=0.9) == (0.9, "gate file")  # a gate in memory
    with pytest.raises(LoraflowError, match="--temperature must be > 0"):
        resolve_temperature(0.0, recorded)


def test_plot_gates_applies_the_same_rule(tmp_path, monkeypatch, capsys):
    """plot-gates used to take the gate file's value while eval always took the pair's: both now use the rule."""
    pytest.importorskip("matplotlib")
    from loraflow.fusion.model import FlowModel

    seen = []

    def fake(*args, **kwargs):
        seen.append(kwargs["temperature"])
        raise LoraflowError("stop here")

    monkeypatch.setattr(FlowModel, "from_pretrained", fake)
    original = tmp_path / "ru_math.pt"
    torch.save(tiny_original_gate(), original)
    common = ["plot-gates", "--base-model", "b", "--loras", "a", "c", "--prompt", "x", "--out-dir", str(tmp_path)]
    assert main([*common, "--gate", str(original)]) == 2
    assert main([*common, "--gate", str(_loraflow_gate(tmp_path / "ru_math", 1.0))]) == 2
    assert main([*common, "--gate", str(original), "--temperature", "2.0"]) == 2
    assert seen == [1.1, 1.0, 2.0]
    assert "gate temperature 1.1 (default for ru_math)" in capsys.readouterr().out
