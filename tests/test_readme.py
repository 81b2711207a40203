"""The README's Python API example runs as written: on a tiny model, with only the model id, dtype, device and
generation length substituted, from a folder laid out like the release (checkpoints/LoRAs, checkpoints/Gates)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

from loraflow.tiny import tiny_original_gate, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def python_api_snippet() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs(tiny_pair, tmp_path, monkeypatch, capsys):
    base, (lang, task) = tiny_pair
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    for f in base.iterdir():
        (tmp_path / "base" / f.name).symlink_to(f)
    loras = tmp_path / "checkpoints" / "LoRAs"
    loras.mkdir(parents=True)
    (loras / "zh_lora").symlink_to(lang, target_is_directory=True)
    (loras / "math_lora").symlink_to(task, target_is_directory=True)
    (tmp_path / "checkpoints" / "Gates").mkdir()
    torch.save(tiny_original_gate(layers=2, k=2, hidden=64, seed=1), tmp_path / "checkpoints" / "Gates" / "zh_math.pt")
    code = python_api_snippet()
    for old, new in (('"meta-llama/Llama-2-7b-hf"', repr(str(tmp_path / "base"))), ("torch.bfloat16", "torch.float32"),
                     ('device="cuda"', 'device="cpu"'), ("max_new_tokens=512", "max_new_tokens=6"),
                     ("max_new_tokens=64", "max_new_tokens=4")):
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    assert namespace["tokenizer"].padding_side == "left"
    prompt_width = namespace["inputs"]["input_ids"].shape[1]
    assert namespace["out"].shape[0] == 2 and prompt_width < namespace["out"].shape[1] <= prompt_width + 6
    assert namespace["weights"].shape[0] == 2 and namespace["weights"].shape[-1] == 2  # (layers, tokens, k)
    assert (tmp_path / "checkpoints" / "gates" / "zh_math" / "gate.safetensors").is_file()
    assert namespace["model"].training  # the snippet ends with .train()
    assert len(ast.literal_eval(capsys.readouterr().out.strip())) == 2  # the two decoded generations
