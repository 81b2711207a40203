"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, tied embeddings, a real BPE
tokenizer and chat template), from the `smollm2` fixture. Every FlowModel here is used as loaded, without `.eval()`,
with two LoRAs as the release makes them (ranks 8 and 16, lora_dropout 0.1, all seven projections) and an
original-format fp16 gate at T = 1.1.

Kept small for 2 CPU cores: short prompts, a few new tokens, a few items per script run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from loraflow import FlowModel
from loraflow.eval.generate import DecodeConfig, eos_ids, generate_texts
from loraflow.tiny import tiny_lora, tiny_original_gate

# the first test also converts the GGUF (once per machine: 282 s measured on the shared 2-core machine)
pytestmark = [pytest.mark.slow, pytest.mark.realmodel, pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[1]
TEMPERATURE = 1.1
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


def _base(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def real(smollm2, tmp_path_factory):
    """LORA_ROOT with zh_lora (r 8), math_lora (r 16) and code_lora (= math_lora's weights), a released-layout gate
    `zh_math.pt`, and the tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    root = tmp_path_factory.mktemp("smollm2")
    config = AutoConfig.from_pretrained(smollm2)
    for name, r, seed in (("zh_lora", 8, 1), ("math_lora", 16, 2)):
        tiny_lora(_base(smollm2), root / "LoRAs" / name, r=r, alpha=2.0 * r, seed=seed, dropout=0.1, std=0.02)
    (root / "LoRAs" / "code_lora").symlink_to(root / "LoRAs" / "math_lora", target_is_directory=True)
    gate = tiny_original_gate(layers=config.num_hidden_layers, k=2, hidden=config.hidden_size, seed=3, std=0.05)
    torch.save(gate, root / "zh_math.pt")
    return {"base": smollm2, "lora_root": root / "LoRAs", "loras": [root / "LoRAs" / "zh_lora",
            root / "LoRAs" / "math_lora"], "gate": root / "zh_math.pt", "gate_tensors": gate,
            "tokenizer": AutoTokenizer.from_pretrained(smollm2), "root": root}


@pytest.fixture(scope="module")
def flow(real):
    """The LoRA-Flow model exactly as `from_pretrained` returns it."""
    return FlowModel.from_pretrained(real["base"], real["loras"], gate=real["gate"], temperature=TEMPERATURE)


def _ids(real, texts=PROMPTS[:1]):
    return real["tokenizer"](list(texts), return_tensors="pt", padding=True)["input_ids"]


# ------------------------------------------------------------------------------------------------- equivalence
def test_loaded_as_inference_model(flow):
    assert not flow.training and not any(m.training for m in flow.modules())
    assert flow.k == 2 and flow.num_layers == 30 and flow.hidden_size == 576 and flow.temperature == TEMPERATURE


@pytest.mark.parametrize("mode", ["single", "static"])
def test_single_and_static_equal_peft(real, mode):
    from peft import PeftModel

    zh, math = real["loras"]
    weights = [0.4, 0.9]
    flow = FlowModel.from_pretrained(real["base"], real["loras"], mode=mode, lora=1,
                                     static_weights=weights if mode == "static" else None)
    peft_model = PeftModel.from_pretrained(_base(real["base"]), str(math if mode == "single" else zh),
                                           adapter_name="a")
    if mode == "static":
        peft_model.load_adapter(str(math), adapter_name="b")
        peft_model.add_weighted_adapter(["a", "b"], weights, "mix", combination_type="cat")
        peft_model.set_adapter("mix")
    ids = _ids(real)
    with torch.no_grad():
        got, again = flow(input_ids=ids).logits, flow(input_ids=ids).logits
        expected = peft_model.eval()(input_ids=ids).logits
        base = _base(real["base"])(input_ids=ids).logits
    assert torch.equal(got, again)
    assert (got - base).abs().max() > 0.1  # the LoRAs change the output
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


class _PerLoRALinear(nn.Module):
    """y = base(x) + sum_i w_i * (alpha_i / r_i) * B_i A_i x, one LoRA at a time; w from the layer's gate."""

    def __init__(self, base: nn.Linear, loras: list[tuple[int, torch.Tensor, torch.Tensor, float]], weights):
        super().__init__()
        self.base, self.loras, self.weights = base, loras, weights

    def forward(self, x):
        w = self.weights()  # (batch, seq, k)
        y = self.base(x)
        for i, a, b, scale in self.loras:
            y = y + w[..., i:i + 1] * scale * (x @ a.T @ b.T)
        return y


def _reference_flow(real) -> nn.Module:
    """The plain base with the paper's fusion written out: the gate of layer l reads the decoder layer's input,
    w_l = softmax(W_l x / T) + b_l, from the released fp16 tensors; the LoRAs read straight from the PEFT files."""
    from safetensors.torch import load_file

    model = _base(real["base"])
    loras = []
    for folder in real["loras"]:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        scale = config["lora_alpha"] / config["r"]
        modules = {}
        for key, t in tensors.items():
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            modules.setdefault(module, {})["A" if ".lora_A." in key else "B"] = t
        loras.append((modules, scale))
    weights = {}
    for li, layer in enumerate(model.model.layers):
        w_gate = real["gate_tensors"][f"encoder.layers.{li}.lora_fusion_gate.weight"].float()
        b_gate = real["gate_tensors"][f"encoder.layers.{li}.weight_bias"].float()[0]

        def gate(module, args, kwargs, li=li, w_gate=w_gate, b_gate=b_gate):
            x = args[0] if args else kwargs["hidden_states"]
            weights[li] = torch.softmax(x @ w_gate.T / TEMPERATURE, dim=-1) + b_gate

        layer.register_forward_pre_hook(gate, with_kwargs=True)
        for name, mod in list(layer.named_modules()):
            full = f"model.layers.{li}.{name}"
            present = [(i, m[full]["A"], m[full]["B"], s) for i, (m, s) in enumerate(loras) if full in m]
            if isinstance(mod, nn.Linear) and present:
                parent, attr = name.rsplit(".", 1)
                setattr(layer.get_submodule(parent), attr, _PerLoRALinear(mod, present, lambda li=li: weights[li]))
    return model.eval()


def test_flow_equals_a_plain_per_lora_reference(real, flow):
    ids = _ids(real, PROMPTS)
    mask = real["tokenizer"](PROMPTS, return_tensors="pt", padding=True)["attention_mask"]
    with torch.no_grad():
        got = flow(input_ids=ids, attention_mask=mask).logits
        expected = _reference_flow(real)(input_ids=ids, attention_mask=mask).logits
        with flow.record_gates() as rec:
            flow(input_ids=ids[:1])
    spread = rec.weights(row=0)[..., 0]  # (layers, tokens): the zh LoRA's weight varies across tokens
    assert spread.std() > 0.01
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=2e-4, rtol=1e-4)


# -------------------------------------------------------------------------------------------------- generation
def test_cached_greedy_equals_recompute(real, flow):
    ids = _ids(real)
    with torch.no_grad():
        cached = flow.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True)
        recomputed = flow.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] == ids.shape[1] + 6
    assert torch.equal(cached, recomputed)


def test_left_padded_batch_equals_each_row_alone_even_without_a_pad_token(real, flow):
    from transformers import AutoTokenizer

    tok = real["tokenizer"]
    config = DecodeConfig(max_new_tokens=6, batch_size=2)
    batched = generate_texts(flow, tok, PROMPTS, config)
    alone = [generate_texts(flow, tok, [p], config)[0] for p in PROMPTS]
    assert batched == alone and all(batched)
    no_pad = AutoTokenizer.from_pretrained(real["base"])
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    assert generate_texts(flow, no_pad, PROMPTS, config) == batched


def test_chat_template_eos_ends_generation(real, flow):
    from loraflow.data.prompts import chat_prompt

    tok = real["tokenizer"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in eos_ids(tok, flow)
    prompt = chat_prompt(tok, None, "What is 2 + 3? Answer with the number only.")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    flow.set_mode("base")
    try:
        with torch.no_grad():
            out = flow.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=eos_ids(tok, flow))
        text = generate_texts(flow, tok, [prompt], DecodeConfig(max_new_tokens=24, add_special_tokens=False))[0]
    finally:
        flow.set_mode("flow")
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == im_end and len(new) < 24, tok.decode(new)
    assert "5" in text and "<|im_end|>" not in text and text == tok.decode(new[:-1], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------ scripts
def _env(real, out: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHRUN",)}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "BASE_MODEL": str(real["base"]), "LORA_ROOT": str(real["lora_root"]), "OUT_DIR": str(out), **extra}


@pytest.fixture(scope="module")
def trained(real, loraflow_data):
    """scripts/train.sh zh math on SmolLM2 with the chat template: 2 steps of batch 1 on 96-token examples."""
    out = real["root"] / "gates"
    env = _env(real, out, DATA_ROOT=str(loraflow_data), PROMPT_STYLE="chat-template", MAX_STEPS="2", LIMIT="4",
               MAX_LEN="96", NPROC="1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.run(["bash", str(ROOT / "scripts/train.sh"), "zh", "math", "1e-3", "1", port], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out / "zh_math"


def test_train_sh_on_smollm2_with_the_chat_template(trained, real):
    proc, run = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--prompt-style chat-template" in proc.stderr and "--max-steps 2" in proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["prompt_style"], config["train_examples"]) == ("chat-template", 4)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and all(s["loss"] > 0 for s in steps if "loss" in s)
    gate = json.loads((run / "final" / "gate.json").read_text())
    assert (gate["k"], gate["num_layers"], gate["hidden_size"]) == (2, 30, 576)
    assert gate["lora_names"] == ["zh_lora", "math_lora"]


@pytest.mark.parametrize("task,method,style", [("math", "flow", "faithful"), ("math", "flow", "chat-template"),
                                               ("code", "average", "faithful"), ("code", "task", "chat-template")])
def test_eval_sh_on_smollm2(real, trained, loraflow_data, tmp_path, task, method, style):
    gate = trained[1] / "final" if method == "flow" else "-"
    env = _env(real, tmp_path, DATA_ROOT=str(loraflow_data), METHOD=method, PROMPT_STYLE=style, LIMIT="2",
               MAX_NEW_TOKENS="8", BATCH_SIZE="2")
    proc = subprocess.run(["bash", str(ROOT / "scripts/eval.sh"), "0", "0", "zh", task, str(gate)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / f"{'mgsm' if task == 'math' else 'humaneval'}_zh" / method
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["generation"] for r in rows)
    if style == "chat-template":
        assert all(r["prompt"].startswith("<|im_start|>system\n") for r in rows)
    else:
        assert all("[INST]" in r["prompt"] for r in rows)
    results = json.loads((folder / "results.json").read_text())
    assert results["counts"]["ids_scored"] == 2 and results["config"]["prompt_style"] == style


# ---------------------------------------------------------------------------------------------------------- GGUF
def test_the_converted_folder_is_a_plain_hf_model(smollm2):
    from safetensors import safe_open

    from loraflow.convert.gguf import SOURCE_FILE, smollm2_gguf
    from loraflow.files import sha256_file

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    source = json.loads((smollm2 / SOURCE_FILE).read_text())
    assert source["sha256"] == sha256_file(smollm2_gguf()) and source["dtype"] == "float32"
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys and len(keys) == 2 + 30 * 9
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()


def test_eval_on_the_gguf_file_equals_eval_on_the_converted_folder(real, trained, loraflow_data, tmp_path):
    """`--base FOLDER --gguf-file NAME` (tokenizer and model read from the GGUF, dequantized) generates what the
    converted folder does."""
    from loraflow.cli import main
    from loraflow.convert.gguf import smollm2_gguf

    gguf = smollm2_gguf()
    common = ["eval", "--task", "math", "--language", "zh", "--method", "flow", "--gate", str(trained[1] / "final"),
              "--lora-root", str(real["lora_root"]), "--data-root", str(loraflow_data), "--limit", "1",
              "--max-new-tokens", "4", "--prompt-style", "chat-template", "--no-progress"]
    assert main([*common, "--base", str(gguf.parent), "--gguf-file", gguf.name, "--out-dir", str(tmp_path / "g")]) == 0
    assert main([*common, "--base", str(real["base"]), "--out-dir", str(tmp_path / "hf")]) == 0
    rows = [json.loads((tmp_path / out / "mgsm_zh" / "flow" / "predictions.jsonl").read_text()) for out in ("g", "hf")]
    assert rows[0]["prompt"] == rows[1]["prompt"] and rows[0]["generation"] == rows[1]["generation"]
    assert json.loads((tmp_path / "g" / "mgsm_zh" / "flow" / "run.json").read_text())["gguf_file"] == gguf.name
