"""Converters (loraflow/convert/tables.py) and their I/O + CLI (convert/formats.py, convert/cli.py, convert/shards.py).

Round trips are exact (torch.equal, same dtype); refusals name the key and write nothing; pickles are only ever
loaded with weights_only.
"""

from __future__ import annotations

import json

import pytest
import torch

from loraflow import cli
from loraflow.convert import tables as C
from loraflow.convert.formats import convert_base, convert_gate, convert_lora
from loraflow.convert.shards import ShardWriter, TensorSource, parse_size
from loraflow.errors import LoraflowError
from loraflow.files import load_tensors
from loraflow.tiny import tiny_lora, tiny_model, tiny_original_gate

TOKENS = torch.tensor([[1, 70, 71, 72, 90, 100, 5], [1, 8, 9, 10, 11, 12, 13]])


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def base_config(base):
    return base.config.to_dict()


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A saved PEFT adapter (ranks differ per module through rank_pattern) and its in-memory state dict."""
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model = tiny_lora(tiny_model("llama", seed=0), path, r=4, rank_pattern={"down_proj": 6}, seed=3)
    named = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return path, named


@pytest.fixture(scope="module")
def hf_dir(base, tmp_path_factory):
    """The tiny base saved as several safetensors shards + index."""
    path = tmp_path_factory.mktemp("hf") / "base"
    base.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("style", ["saved", "named"])
def test_lora_round_trip_peft_bmtrain_peft_is_exact(style, peft_dir, base_config, tmp_path):
    src, named = peft_dir
    saved = load_tensors(src / "adapter_model.safetensors")
    if style == "named":  # current in-memory style: `lora_A.default.weight`
        src = tmp_path / "named"
        src.mkdir()
        torch.save(named, src / "adapter_model.bin")
        (src / "adapter_config.json").write_text((peft_dir[0] / "adapter_config.json").read_text())
        assert any(".default.weight" in k for k in named)
    convert_lora(src, tmp_path / "bmt", "bmtrain", base_config=base_config)
    bmt = load_tensors(tmp_path / "bmt" / "lora.pt")
    assert "encoder.layers.1.ffn.ffn.w_in.w_0_lora.lora_A.weight" in bmt  # gate_proj (SPEC §5)
    assert bmt["encoder.layers.0.ffn.ffn.w_out_lora.lora_B.weight"].shape == (64, 6)  # down_proj at rank 6
    sidecar = json.loads((tmp_path / "bmt" / "lora_config.json").read_text())
    assert (sidecar["r"], sidecar["lora_alpha"], sidecar["num_layers"]) == (4, 16.0, 2)
    convert_lora(tmp_path / "bmt", tmp_path / "back", "peft", base_config=base_config)
    _assert_same(load_tensors(tmp_path / "back" / "adapter_model.safetensors"), saved)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == \
        json.loads((peft_dir[0] / "adapter_config.json").read_text())


def test_converted_peft_adapter_loads_and_gives_the_same_outputs(peft_dir, tmp_path):
    from peft import PeftModel

    convert_lora(peft_dir[0], tmp_path / "bmt", "bmtrain")
    convert_lora(tmp_path / "bmt", tmp_path / "back", "peft")
    original = PeftModel.from_pretrained(tiny_model("llama", seed=0), str(peft_dir[0])).eval()
    converted = PeftModel.from_pretrained(tiny_model("llama", seed=0), str(tmp_path / "back")).eval()
    with torch.no_grad():
        want, got = original(TOKENS).logits, converted(TOKENS).logits
    assert torch.equal(want, got)
    with torch.no_grad():
        assert not torch.equal(want, tiny_model("llama", seed=0)(TOKENS).logits)  # the LoRA does something


def test_bmtrain_lora_without_sidecar_needs_alpha(peft_dir, tmp_path):
    convert_lora(peft_dir[0], tmp_path / "bmt", "bmtrain")
    (tmp_path / "bmt" / "lora_config.json").unlink()
    with pytest.raises(LoraflowError, match="--lora-alpha"):
        convert_lora(tmp_path / "bmt", tmp_path / "out", "peft")
    assert not (tmp_path / "out").exists()
    tensors = C.lora_peft_to_bmtrain(load_tensors(peft_dir[0] / "adapter_model.safetensors"))
    uniform = {k: v for k, v in tensors.items() if "w_out" not in k}  # drop down_proj (rank 6): one rank left
    torch.save(uniform, tmp_path / "bmt" / "lora.pt")
    convert_lora(tmp_path / "bmt" / "lora.pt", tmp_path / "out", "peft", lora_alpha=16)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]


def test_lora_checks_against_the_base_config(peft_dir, base_config):
    state = load_tensors(peft_dir[0] / "adapter_model.safetensors")
    bigger = {**base_config, "hidden_size": 128, "head_dim": 32}
    with pytest.raises(LoraflowError, match=r"gate_proj\.lora_A\.weight has shape \(4, 64\), expected \(4, 128\)"):
        C.lora_peft_to_bmtrain(state, base_config=bigger)
    with pytest.raises(LoraflowError, match=r"layer 1 >= num_layers 1"):
        C.lora_peft_to_bmtrain(state, base_config={**base_config, "num_hidden_layers": 1})
    config = json.loads((peft_dir[0] / "adapter_config.json").read_text())
    with pytest.raises(LoraflowError, match="down_proj.lora_A.weight has shape"):  # rank_pattern ignored -> r = 4
        C.lora_peft_to_bmtrain(state, {**config, "rank_pattern": {}})


# ----------------------------------------------------------------------------------------------- base model
def test_base_round_trip_hf_modelcenter_hf_same_logits(base, hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    convert_base(hf_dir, tmp_path / "mc", "modelcenter")
    mc_config = json.loads((tmp_path / "mc" / "config.json").read_text())
    assert mc_config == {"dim_model": 64, "dim_ff": 160, "num_layers": 2, "num_heads": 4, "num_heads_kv": 2,
                         "dim_head": 16, "norm_eps": 1e-6, "vocab_size": 260, "tied": False}
    mc = load_tensors(tmp_path / "mc" / "pytorch_model.pt")
    assert torch.equal(mc["encoder.layers.1.self_att.self_attention.attention_out.weight"],
                       base.model.layers[1].self_attn.o_proj.weight)
    assert torch.equal(mc["output_projection.weight"], base.lm_head.weight)
    convert_base(tmp_path / "mc", tmp_path / "hf", "hf", max_shard_size="50KB")
    assert len(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) == 21
    _assert_same(TensorSource(tmp_path / "hf", ["model.safetensors"]).load_all(), base.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, base(TOKENS).logits)


@pytest.mark.parametrize("index", [True, False], ids=["bin-index", "bin-no-index"])
def test_sharded_pickle_input(index, base, base_config, tmp_path):
    """pytorch_model-0000i-of-0000n.bin shards (as Llama-2-7b-hf ships them, rotary inv_freq buffers included)."""
    src = tmp_path / "hf"
    src.mkdir()
    state = dict(base.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry it: dropped
    keys = list(state)
    parts = [keys[:7], keys[7:15], keys[15:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"pytorch_model-{i:05d}-of-00003.bin"
        torch.save({k: state[k] for k in part}, src / name)
        weight_map.update(dict.fromkeys(part, name))
    if index:
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(base_config))
    convert_base(src, tmp_path / "mc", "modelcenter", max_shard_size="60KB")
    mc = TensorSource(tmp_path / "mc", ["pytorch_model.pt"])
    assert len(mc.shards) > 1
    _assert_same(mc.load_all(), C.base_hf_to_modelcenter(base.state_dict(), base_config))


def test_tied_embeddings_are_explicit(base_config):
    tied = {**base_config, "tie_word_embeddings": True}
    state = tiny_model("llama", seed=1).state_dict()
    head = state.pop("lm_head.weight")
    mc = C.base_hf_to_modelcenter(state, tied)
    assert "output_projection.weight" not in mc and C.base_config_hf_to_modelcenter(tied)["tied"] is True
    _assert_same(C.base_modelcenter_to_hf(mc, C.base_config_hf_to_modelcenter(tied)), state)
    with pytest.raises(LoraflowError, match="ties the output layer.*lm_head.weight"):
        C.base_hf_to_modelcenter({**state, "lm_head.weight": head}, tied)
    with pytest.raises(LoraflowError, match="missing keys.*lm_head.weight"):
        C.base_hf_to_modelcenter(state, base_config)


def test_unrepresentable_hf_configs_are_refused(base_config):
    with pytest.raises(LoraflowError, match="rope_theta"):
        C.base_config_hf_to_modelcenter({**base_config, "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 500000.0}})
    with pytest.raises(LoraflowError, match="attention_bias"):
        C.base_config_hf_to_modelcenter({**base_config, "attention_bias": True})
    mc = C.base_config_hf_to_modelcenter(base_config)
    with pytest.raises(LoraflowError, match="disagrees.*hidden_size"):
        C.base_config_modelcenter_to_hf(mc, {**base_config, "hidden_size": 128})
    assert C.base_config_modelcenter_to_hf(mc, base_config) == base_config
    llama2 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "vocab_size": 32000,
              "rope_scaling": None, "tie_word_embeddings": False, "max_position_embeddings": 4096}
    mc = C.base_config_hf_to_modelcenter(llama2)
    assert (mc["dim_head"], mc["num_heads_kv"], mc["norm_eps"]) == (128, 32, 1e-5)
    assert C.base_config_modelcenter_to_hf(mc, llama2) == llama2
    original = {k: mc[k] for k in ("dim_model", "dim_ff", "num_layers", "num_heads", "num_heads_kv", "dim_head",
                                   "norm_eps")}  # what the original's transform script wrote
    assert C.hf_dims(C.base_config_modelcenter_to_hf(original)) == C.hf_dims(llama2)


# ----------------------------------------------------------------------------------------------- gates
@pytest.mark.parametrize("form", ["folder", "file"])
def test_gate_round_trip_original_loraflow_original(form, tmp_path):
    original = tiny_original_gate(seed=4)
    torch.save(original, tmp_path / "ru_math.pt")
    out = tmp_path / ("ru_math" if form == "folder" else "ru_math.safetensors")
    convert_gate(tmp_path / "ru_math.pt", out, "loraflow")
    meta = json.loads((out / "gate.json" if form == "folder" else tmp_path / "ru_math.json").read_text())
    assert meta["format"] == "loraflow-gate" and meta["lora_names"] == ["ru_lora", "math_lora"]
    assert (meta["k"], meta["hidden_size"], meta["num_layers"], meta["temperature"]) == (2, 64, 2, 1.1)
    convert_gate(out, tmp_path / "back.pt", "original")
    _assert_same(load_tensors(tmp_path / "back.pt"), original)


# ----------------------------------------------------------------------------------------------- refusals
def _lora_input(tmp_path, peft_dir):
    src = tmp_path / "in"
    src.mkdir()
    (src / "adapter_config.json").write_text((peft_dir[0] / "adapter_config.json").read_text())
    return src, load_tensors(peft_dir[0] / "adapter_model.safetensors"), "adapter_model.bin"


MUTATIONS = {
    "extra": (lambda sd, key: {**sd, "encoder.layers.0.surprise.weight": torch.zeros(2)},
              "unknown keys.*surprise"),
    "missing layer": (lambda sd, key: {k: v for k, v in sd.items() if ".layers.1." not in k}, "missing keys.*layers.1"),
    "wrong shape": (lambda sd, key: {**sd, key: torch.zeros(3, 5, dtype=sd[key].dtype)}, "wrong shapes.*{key}"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("kind", ["lora", "base", "gate"])
def test_bad_inputs_are_refused_naming_the_key_and_nothing_is_written(kind, mutation, peft_dir, base, base_config,
                                                                      tmp_path):
    mutate, pattern = MUTATIONS[mutation]
    if kind == "lora":
        src, state, name = _lora_input(tmp_path, peft_dir)
        key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
        run = lambda out: convert_lora(src, out, "bmtrain", base_config=base_config)  # noqa: E731
    elif kind == "base":
        src, state, name = tmp_path / "in", dict(base.state_dict()), "pytorch_model.bin"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(base_config))
        key = "model.layers.0.mlp.down_proj.weight"
        run = lambda out: convert_base(src, out, "modelcenter")  # noqa: E731
    else:
        src, state, name = tmp_path / "in", tiny_original_gate(layers=3), "zh_code.pt"  # layer 1 of 3 can go missing
        src.mkdir()
        key = "encoder.layers.1.lora_fusion_gate.weight"
        run = lambda out: convert_gate(src / name, out, "loraflow")  # noqa: E731
    torch.save(mutate(state, key), src / name)
    with pytest.raises(LoraflowError, match=pattern.format(key=key.replace(".", r"\."))):
        run(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


class _Evil:
    """Unpickling this would create `marker` (pickle calls open(marker, "w") to rebuild it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("what", ["gate", "lora", "base"])
def test_malicious_pickle_is_refused_and_never_executed(what, base_config, tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "in"
    src.mkdir()
    payload = {"encoder.layers.0.weight_bias": torch.zeros(1, 2), "x": _Evil(marker)}
    if what == "gate":
        torch.save(payload, src / "zh_math.pt")
        run = lambda: convert_gate(src / "zh_math.pt", tmp_path / "out", "loraflow")  # noqa: E731
    elif what == "lora":
        torch.save(payload, src / "lora.pt")
        run = lambda: convert_lora(src, tmp_path / "out", "peft", lora_alpha=16)  # noqa: E731
    else:
        (src / "config.json").write_text(json.dumps(base_config))
        torch.save(payload, src / "pytorch_model.bin")
        run = lambda: convert_base(src, tmp_path / "out", "modelcenter")  # noqa: E731
    with pytest.raises(LoraflowError, match="refused to load"):
        run()
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(next(src.glob("*.pt")) if what != "base" else src / "pytorch_model.bin", weights_only=False)
    assert marker.exists()  # the payload is real: an unrestricted load runs it


# ----------------------------------------------------------------------------------------------- outputs, CLI
def test_existing_output_identical_is_kept_different_needs_force(tmp_path, capsys):
    torch.save(tiny_original_gate(seed=1), tmp_path / "a.pt")
    torch.save(tiny_original_gate(seed=2), tmp_path / "b.pt")
    out = tmp_path / "gate"
    assert convert_gate(tmp_path / "a.pt", out, "loraflow", lora_names=["x", "y"]) == "written"
    assert convert_gate(tmp_path / "a.pt", out, "loraflow", lora_names=["x", "y"]) == "unchanged"
    with pytest.raises(LoraflowError, match="already exists and differs.*--force"):
        convert_gate(tmp_path / "b.pt", out, "loraflow", lora_names=["x", "y"])
    _assert_same(load_tensors(out / "gate.safetensors"), C.gate_original_to_loraflow(tiny_original_gate(seed=1)))
    assert convert_gate(tmp_path / "b.pt", out, "loraflow", lora_names=["x", "y"], force=True) == "replaced"
    _assert_same(load_tensors(out / "gate.safetensors"), C.gate_original_to_loraflow(tiny_original_gate(seed=2)))
    assert not _leftovers(tmp_path)


def test_cli_convert_and_errors(tmp_path, capsys):
    torch.save(tiny_original_gate(), tmp_path / "es_code.pt")
    assert cli.main(["convert", "gate", "--to", "loraflow", str(tmp_path / "es_code.pt"), str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "g" / "gate.json").read_text())["lora_names"] == ["es_lora", "code_lora"]
    assert cli.main(["convert", "gate", "--to", "original", str(tmp_path / "g"), str(tmp_path / "o.pt")]) == 0
    assert cli.main(["convert", "base", "--to", "hf", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err
    for what in ("lora", "base", "gate"):
        with pytest.raises(SystemExit) as e:
            cli.main(["convert", what, "--help"])
        assert e.value.code == 0
        assert "--to" in capsys.readouterr().out


def test_shard_writer_holds_at_most_one_shard_and_indexes_them(tmp_path):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size("0") is None
    with pytest.raises(LoraflowError):
        parse_size("lots")
    writer = ShardWriter(tmp_path, "model.safetensors", max_shard_bytes=4000)
    tensors = {f"t{i}": torch.full((300,), float(i)) for i in range(10)}  # 1200 bytes each
    for key, tensor in tensors.items():
        writer.add(key, tensor[:])  # a view: written as its own tensor, not its whole storage
        assert writer.buffer_bytes <= 4000
    names = writer.close()
    assert names[-1] == "model.safetensors.index.json" and names[0] == "model-00001-of-00004.safetensors"
    _assert_same(TensorSource(tmp_path, ["model.safetensors"]).load_all(), tensors)


def test_bad_shape_in_a_late_pickle_shard_writes_nothing(base, base_config, tmp_path):
    """Indexed .bin shards are only read one by one, so a late bad shape is found mid-conversion: still no output."""
    src = tmp_path / "hf"
    src.mkdir()
    state = dict(base.state_dict())
    state["model.norm.weight"] = torch.ones(65)
    keys = sorted(state, key=lambda k: k == "model.norm.weight")  # the bad tensor in the last shard
    weight_map = {k: ("pytorch_model-00001-of-00002.bin" if i < 10 else "pytorch_model-00002-of-00002.bin")
                  for i, k in enumerate(keys)}
    for name in set(weight_map.values()):
        torch.save({k: state[k] for k, f in weight_map.items() if f == name}, src / name)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(base_config))
    with pytest.raises(LoraflowError, match=r"model\.norm\.weight has shape \(65,\), expected \(64,\)"):
        convert_base(src, tmp_path / "mc", "modelcenter", max_shard_size="10KB")
    assert not (tmp_path / "mc").exists() and not _leftovers(tmp_path)


def test_convert_base_from_gguf_checks_its_arguments(tmp_path, capsys):
    from loraflow.cli import main

    assert main(["convert", "base", "--from", "gguf", "--to", "modelcenter", "x.gguf", str(tmp_path / "o")]) == 2
    assert "writes a Hugging Face folder, not --to modelcenter" in capsys.readouterr().err
    assert main(["convert", "base", "--from", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 2
    assert f"error: {tmp_path / 'missing.gguf'}: no such GGUF file" in capsys.readouterr().err
    assert main(["convert", "base", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "give --to modelcenter or --to hf (or --from gguf)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
