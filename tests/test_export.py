"""`loraflow export`: the model folder's files and config block, `FlowModel.from_pretrained(folder)` equal to the
model built from the parts, and the refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch

from loraflow.cli import main
from loraflow.errors import LoraflowError
from loraflow.fusion.folder import export_model_folder, folder_spec, is_model_folder
from loraflow.fusion.model import FlowModel
from loraflow.tiny import save_tiny_flow, save_tiny_loras, tiny_model

RANKS = {"zh_lora": 4, "math_lora": 8}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return save_tiny_flow(tmp_path_factory.mktemp("export_parts"), ranks=RANKS)


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(4, 260, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


MODES = [
    ("flow", {"temperature": 1.1}, {"temperature": 1.1}),
    ("static", {"static_weights": [0.3, 0.9]}, {"static_weights": [0.3, 0.9]}),
    ("single", {"lora": "math_lora"}, {"lora": 1}),
    ("base", {}, {}),
]


@pytest.mark.parametrize("mode, export_kwargs, model_kwargs", MODES, ids=[m[0] for m in MODES])
def test_folder_loads_as_the_model_built_from_its_parts(parts, tmp_path, mode, export_kwargs, model_kwargs):
    base, loras, gate = parts
    gate_arg = gate if mode == "flow" else None
    out = export_model_folder(tmp_path / "m", str(base), [str(p) for p in loras], gate=gate_arg, mode=mode,
                              **export_kwargs)
    assert is_model_folder(out)
    reference = FlowModel.from_pretrained(base, [str(p) for p in loras], gate=gate_arg, mode=mode, **model_kwargs)
    loaded = FlowModel.from_pretrained(out)
    assert loaded.mode == mode and loaded.lora_names == list(RANKS)
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=0, atol=0)
    if mode != "base":  # the LoRAs matter, so equality above is not the base model twice
        assert not torch.allclose(_logits(loaded), _logits(FlowModel.from_pretrained(out, mode="base")))
    if mode == "flow":
        assert loaded.temperature == 1.1


def test_folder_files_and_config_block(parts, tmp_path):
    base, loras, gate = parts
    out = export_model_folder(tmp_path / "m", str(base), [str(p) for p in loras], gate=gate, temperature=1.1)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LoraFlowLlamaForCausalLM"]
    block = config["loraflow"]
    assert block["base_architecture"] == "LlamaForCausalLM" and block["mode"] == "flow" and block["k"] == 2
    assert [lora["name"] for lora in block["loras"]] == list(RANKS)
    assert block["loras"][1]["ranks"] == {p: 8 for p in block["loras"][1]["targets"]}
    assert block["loras"][1]["scalings"]["down_proj"] == 16 / 8
    assert block["loras"][0]["lora_dropout"] == 0.1
    assert block["temperature"] == 1.1
    for name in ("model.safetensors", "tokenizer.json", "loraflow/gate.safetensors", "loraflow/gate.json",
                 "loraflow/loras/zh_lora/adapter_model.safetensors", "loraflow/loras/math_lora/adapter_config.json"):
        assert (out / name).is_file(), name
    # hard links by default: the base weights are not duplicated on disk
    assert os.stat(out / "model.safetensors").st_ino == os.stat(base / "model.safetensors").st_ino
    copied = export_model_folder(tmp_path / "c", str(base), [str(p) for p in loras], gate=gate, weights="copy")
    assert os.stat(copied / "model.safetensors").st_ino != os.stat(base / "model.safetensors").st_ino
    spec = folder_spec(out)
    assert spec.gate == out / "loraflow" and spec.loras[0] == out / "loraflow/loras/zh_lora"


def test_cli_export_and_refusals(parts, tmp_path, capsys):
    base, loras, gate = parts
    common = ["--base-model", str(base), "--loras", *map(str, loras)]
    assert main(["export", str(tmp_path / "m"), *common, "--gate", str(gate)]) == 0
    assert main(["export", str(tmp_path / "m"), *common, "--gate", str(gate)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m"), *common, "--gate", str(gate), "--overwrite"]) == 0
    assert main(["export", str(tmp_path / "n"), *common]) == 2
    assert "--mode flow needs --gate" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "n"), *common, "--mode", "static", "--static-weights", "1"]) == 2
    assert "needs 2 numbers" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


@pytest.mark.parametrize("name, flags, want", [("zh_math.pt", [], 1.1), ("es_code.pt", [], 1.0),
                                               ("gate.pt", [], 1.0), ("zh_math.pt", ["--temperature", "1.3"], 1.3)])
def test_cli_export_takes_the_temperature_by_evals_rule(parts, tmp_path, capsys, name, flags, want):
    """An original .pt gate records no temperature: export takes the pair's default from its name, as eval does."""
    from transformers import AutoConfig

    from loraflow.tiny import tiny_original_gate

    base, loras, _ = parts
    config = AutoConfig.from_pretrained(base)
    gate = tmp_path / name
    torch.save(tiny_original_gate(config.num_hidden_layers, 2, config.hidden_size), gate)
    out = tmp_path / "m"
    assert main(["export", str(out), "--base-model", str(base), "--loras", *map(str, loras), "--gate", str(gate),
                 *flags]) == 0
    assert json.loads((out / "config.json").read_text())["loraflow"]["temperature"] == want
    assert f"gate temperature {want}" in capsys.readouterr().err


def test_refuses_what_a_folder_cannot_represent(parts, tmp_path):
    base, loras, gate = parts
    # a LoRA whose rank differs in one layer
    odd = save_tiny_loras(lambda: tiny_model("llama"), tmp_path, {"odd": 4},
                          rank_pattern={"model.layers.1.mlp.down_proj": 2})[0]
    with pytest.raises(LoraflowError, match="decoder layer 1 has targets/ranks"):
        export_model_folder(tmp_path / "a", str(base), [str(loras[0]), str(odd)], gate=gate)
    # an architecture the engines do not have
    other = tmp_path / "gpt2"
    other.mkdir()
    config = json.loads((base / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(LoraflowError, match="architectures is"):
        export_model_folder(tmp_path / "b", str(other), [str(p) for p in loras], gate=gate)
    # a gate for another k
    with pytest.raises(LoraflowError, match="layers/k/hidden"):
        export_model_folder(tmp_path / "c", str(base), [str(loras[0])], gate=gate)
    # not a folder from export
    with pytest.raises(LoraflowError, match="not a LoRA-Flow model folder"):
        FlowModel.from_pretrained(base)


def test_serve_command_checks_the_folder(parts, tmp_path):
    from loraflow.vllm.serve import server_command

    base, loras, gate = parts
    out = export_model_folder(tmp_path / "zh_math", str(base), [str(p) for p in loras], gate=gate)
    cmd = server_command(out, port=8123, max_model_len=256, dtype="float32", extra=["--max-num-seqs", "4"])
    assert cmd[cmd.index("--model") + 1] == str(out) and cmd[cmd.index("--served-model-name") + 1] == "zh_math"
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[-2:] == ["--max-num-seqs", "4"]
    # without a GPU the engine is eager unless --compile asks for vLLM's torch.compile mode
    assert ("--enforce-eager" in cmd) == (not torch.cuda.is_available())
    assert "--enforce-eager" not in server_command(out, compiled=True)
    with pytest.raises(LoraflowError, match="not a LoRA-Flow model folder"):
        server_command(base)


def test_a_stale_loraflow_metadata_that_hides_the_vllm_entry_point_is_named(tmp_path, monkeypatch):
    """Python reads the first `loraflow` metadata on sys.path: an old `loraflow.egg-info` without the
    `vllm.general_plugins` entry point hides the installed one, and the error says which file to delete."""
    from loraflow.vllm.serve import entry_point_installed, missing_entry_point_hint

    stale = tmp_path / "loraflow.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: loraflow\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not entry_point_installed()
    hint = missing_entry_point_hint()
    assert str(stale) in hint and "delete it" in hint
