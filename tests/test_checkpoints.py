"""Gate files: round trips, refusals, and the original release's format."""

from __future__ import annotations

import os

import pytest
import torch

from loraflow import FlowModel, LoraflowError
from loraflow.convert.tables import gate_loraflow_to_original, gate_original_to_loraflow
from loraflow.fusion.checkpoints import read_gate
from loraflow.tiny import tiny_lora, tiny_model, tiny_original_gate


@pytest.fixture
def trained(tiny_pair):
    _, loras = tiny_pair
    flow = FlowModel.from_pretrained(tiny_model("llama"), loras)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return flow


def _gates(flow):
    return [(g.weight.detach().clone(), g.bias.detach().clone()) for g in flow.gates()]


@pytest.mark.parametrize("target", ["folder", "zh_math.safetensors"])
def test_gate_round_trip_is_exact(trained, tiny_pair, tmp_path, target):
    trained.set_temperature(1.1)
    trained.save_gate(tmp_path / target)
    loaded = FlowModel.from_pretrained(tiny_model("llama"), tiny_pair[1], gate=tmp_path / target)
    for (w0, b0), (w1, b1) in zip(_gates(trained), _gates(loaded)):
        assert torch.equal(w0, w1) and torch.equal(b0, b1)
    assert loaded.temperature == 1.1
    ids = torch.randint(4, 250, (1, 6))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, loaded(input_ids=ids).logits)
    config = read_gate(tmp_path / target)[1]
    assert config["k"] == 2 and config["lora_names"] == ["lang_lora", "task_lora"]
    assert config["hidden_size"] == 64 and config["num_layers"] == 2


def test_temperature_argument_overrides_the_gate_file(trained, tiny_pair, tmp_path):
    trained.save_gate(tmp_path / "g")
    assert FlowModel.from_pretrained(tiny_model("llama"), tiny_pair[1], gate=tmp_path / "g",
                                     temperature=1.1).temperature == 1.1


def test_mismatched_gate_loads_fail_clearly(trained, tiny_pair, tmp_path):
    trained.save_gate(tmp_path / "g")
    lang, task = tiny_pair[1]
    with pytest.raises(LoraflowError, match=r"another order"):
        FlowModel.from_pretrained(tiny_model("llama"), [task, lang], gate=tmp_path / "g")
    with pytest.raises(LoraflowError, match=r"k \(number of LoRAs\) is 2, but the model has 1"):
        FlowModel.from_pretrained(tiny_model("llama"), [lang], gate=tmp_path / "g")
    with pytest.raises(LoraflowError, match=r"layers is 2, but the model has 3"):
        deeper = tiny_model("llama", layers=3)
        FlowModel.from_pretrained(deeper, [tiny_lora(tiny_model("llama", layers=3), tmp_path / "l3a", r=2) and
                                           tmp_path / "l3a",
                                           tiny_lora(tiny_model("llama", layers=3), tmp_path / "l3b", r=2) and
                                           tmp_path / "l3b"], gate=tmp_path / "g", check_lora_names=False)
    with pytest.raises(LoraflowError, match=r"hidden size is 64, but the model has 32"):
        wide = [tiny_lora(tiny_model("llama", hidden=32), tmp_path / f"h{i}", r=2) and tmp_path / f"h{i}"
                for i in range(2)]
        FlowModel.from_pretrained(tiny_model("llama", hidden=32), wide, gate=tmp_path / "g",
                                  check_lora_names=False)
    os.remove(tmp_path / "g" / "gate.json")
    with pytest.raises(LoraflowError, match="gate.json is missing"):
        FlowModel.from_pretrained(tiny_model("llama"), tiny_pair[1], gate=tmp_path / "g")


def test_original_gate_round_trip_is_identical():
    original = tiny_original_gate()
    back = gate_loraflow_to_original(gate_original_to_loraflow(original))
    assert back.keys() == original.keys()
    for key in original:
        assert back[key].dtype == original[key].dtype and torch.equal(back[key], original[key]), key


def test_original_pt_gate_loads_into_flow_model(tiny_pair, tmp_path):
    original = tiny_original_gate()
    torch.save(original, tmp_path / "zh_math.pt")
    flow = FlowModel.from_pretrained(tiny_model("llama"), tiny_pair[1], gate=tmp_path / "zh_math.pt")
    for i, gate in enumerate(flow.gates()):
        assert torch.equal(gate.weight, original[f"encoder.layers.{i}.lora_fusion_gate.weight"].float())
        assert torch.equal(gate.bias, original[f"encoder.layers.{i}.weight_bias"].float().reshape(2))


@pytest.mark.parametrize("broken,match", [
    (lambda sd: sd.update({"encoder.layers.0.extra": torch.zeros(1)}), "unknown keys"),
    (lambda sd: sd.pop("encoder.layers.1.weight_bias"), "missing"),
    (lambda sd: sd.update({"encoder.layers.1.lora_fusion_gate.weight": torch.zeros(2, 63)}), r"expected \(2, 64\)"),
])
def test_original_gate_refusals_name_the_key(broken, match):
    sd = tiny_original_gate()
    broken(sd)
    with pytest.raises(LoraflowError, match=match):
        gate_original_to_loraflow(sd)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickled_gate_is_refused(tiny_pair, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"encoder.layers.0.weight_bias": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(LoraflowError, match="refused to load"):
        FlowModel.from_pretrained(tiny_model("llama"), tiny_pair[1], gate=tmp_path / "evil.pt")
    assert not marker.exists()
