"""Reading PEFT adapters: key styles, scaling rules, validation against the base, refusals."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraflow import FlowModel, LoraflowError
from loraflow.fusion.adapters import load_adapter, parse_source
from loraflow.tiny import tiny_lora, tiny_model


def _to_bin_with_adapter_names(src, dst, style):
    """Copy a saved PEFT adapter, rewriting its keys to `style` and its weights to a `.bin` pickle."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "adapter_model.safetensors")
    (dst / "adapter_model.safetensors").unlink()
    if style == "with-adapter-name":
        sd = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"):
              v for k, v in sd.items()}
    torch.save(sd, dst / "adapter_model.bin")
    return sd


@pytest.mark.parametrize("style", ["released", "with-adapter-name"])
def test_both_key_styles_and_bin_files_load(tiny_pair, tmp_path, style):
    _, (lang, _) = tiny_pair
    sd = _to_bin_with_adapter_names(lang, tmp_path / "copy", style)
    if style == "released":
        assert all(".default." not in k for k in sd)
    a = load_adapter(lang)
    b = load_adapter(tmp_path / "copy")
    assert a.weights.keys() == b.weights.keys()
    assert len(a.weights) == 2 * 7
    for m in a.weights:
        assert all(torch.equal(x, y) for x, y in zip(a.weights[m], b.weights[m]))


@pytest.mark.parametrize("use_rslora,alpha_pattern", [(True, None), (False, {"v_proj": 3.0})])
def test_scaling_rules_match_peft(tmp_path, use_rslora, alpha_pattern):
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=use_rslora, alpha_pattern=alpha_pattern or {},
                        rank_pattern={"q_proj": 2}, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(tiny_model("llama"), config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "lora").eval()
    flow = FlowModel.from_pretrained(tiny_model("llama"), [tmp_path / "lora"], mode="single")
    assert flow.model.model.layers[0].self_attn.q_proj.lora_A.shape[0] == 2
    ids = torch.randint(4, 250, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(flow(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_lora_for_another_base_names_adapter_key_and_shapes(tiny_pair, tmp_path):
    tiny_lora(tiny_model("llama", hidden=32), tmp_path / "small", r=4)
    with pytest.raises(LoraflowError) as err:
        FlowModel.from_pretrained(tiny_model("llama"), [tiny_pair[1][0], tmp_path / "small"])
    assert re.fullmatch(r"LoRA small: model\.layers\.0\.\w+\.\w+_proj\.lora_[AB] has shape \(\d+, \d+\), but the base "
                        r"module needs \(\d+, \d+\) \(base hidden_size 64\)\. Is this LoRA for another base model\?",
                        str(err.value)), str(err.value)


def test_lora_with_more_layers_than_the_base_is_refused(tmp_path):
    tiny_lora(tiny_model("llama", layers=3), tmp_path / "deep", r=2)
    with pytest.raises(LoraflowError, match=r"model.layers.2.* no matching module .* 2 decoder layers"):
        FlowModel.from_pretrained(tiny_model("llama"), [tmp_path / "deep"])


def test_rank_disagreeing_with_config_is_refused(tiny_pair, tmp_path):
    shutil.copytree(tiny_pair[1][0], tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    cfg["r"] = 16
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraflowError, match="has rank 4 but .* says r=16"):
        load_adapter(tmp_path / "bad")


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1"])
def test_lora_dropout_outside_0_1_is_refused(tiny_pair, tmp_path, value):
    shutil.copytree(tiny_pair[1][0], tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    cfg["lora_dropout"] = value
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraflowError, match=r"bad/adapter_config.json: lora_dropout=.* must be a number in \[0, 1\)"):
        load_adapter(tmp_path / "bad")


def test_unfusable_keys_and_incomplete_pairs_are_refused(tiny_pair, tmp_path):
    for name, edit, match in [
        ("dora", lambda sd: sd.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                       torch.ones(64)}), "DoRA"),
        ("half", lambda sd: sd.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
         "has no lora_B"),
    ]:
        shutil.copytree(tiny_pair[1][0], tmp_path / name)
        sd = load_file(tmp_path / name / "adapter_model.safetensors")
        edit(sd)
        save_file(sd, tmp_path / name / "adapter_model.safetensors")
        with pytest.raises(LoraflowError, match=match):
            load_adapter(tmp_path / name)


def test_malicious_adapter_bin_is_refused(tiny_pair, tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    shutil.copytree(tiny_pair[1][0], tmp_path / "evil")
    (tmp_path / "evil" / "adapter_model.safetensors").unlink()
    torch.save({"x": Evil()}, tmp_path / "evil" / "adapter_model.bin")
    with pytest.raises(LoraflowError, match="refused to load"):
        load_adapter(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()


def test_hub_ids_parse_and_fail_fast_offline(monkeypatch, tmp_path):
    assert parse_source("Bowen232/LoRA-Flow/LoRAs/zh_lora@abc") == ("Bowen232/LoRA-Flow", "LoRAs/zh_lora", "abc")
    assert parse_source("owner/repo") == ("owner/repo", None, None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoraflowError, match="not in the hub cache"):
        load_adapter("Bowen232/LoRA-Flow/LoRAs/zh_lora")
