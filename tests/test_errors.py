"""Bad input stays one line and exit status 2: under torchrun (scripts/train.sh), a --base that is neither a folder nor
a hub id, and a mistyped local LoRA folder (reported at once, the hub never asked)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow import FlowModel, LoraflowError
from loraflow.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub request fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.mark.slow
def test_train_sh_error_under_torchrun_is_the_last_line(tmp_path, loraflow_data):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "NPROC": "1",
           "BASE_MODEL": str(tmp_path / "no_such_model"), "LORA_ROOT": str(tmp_path), "DATA_ROOT": str(loraflow_data),
           "OUT_DIR": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "scripts/train.sh"), "zh", "math", "1e-3", "2", port], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"error: base model {tmp_path / 'no_such_model'}: no such folder ({tmp_path} exists and " \
                        "holds: nothing)", lines[-5:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("base,message", [
    ("/no/such/base", "base model /no/such/base: no such folder"),
    ("owner/repo/extra/parts", "base model 'owner/repo/extra/parts': neither a folder nor a valid hub id"),
    ("bad id!", "base model 'bad id!': neither a folder nor a valid hub id"),
])
def test_bad_base_is_one_line(tiny_pair, capsys, no_hub, base, message, tmp_path):
    args = ["eval", "--task", "math", "--language", "zh", "--method", "task", "--base", base,
            "--task-lora", str(tiny_pair[1][1]), "--data-root", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
            "--out-dir", str(tmp_path / "out")]
    (tmp_path / "x.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n')
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    with pytest.raises(LoraflowError, match=message.split(":")[0]):
        FlowModel.from_pretrained(base, tiny_pair[1])


@pytest.mark.parametrize("lora", ["./zh_lroa", "~/no_such_lora_here", "LoRAs/zh_lroa", "/abs/missing"])
def test_missing_local_lora_is_reported_at_once(tiny_pair, tmp_path, monkeypatch, no_hub, lora):
    (tmp_path / "LoRAs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraflowError, match=rf"^LoRA {lora}: no such folder"):
        FlowModel.from_pretrained(str(tiny_pair[0]), [lora, tiny_pair[1][1]])


def test_missing_lora_names_what_is_there(tiny_pair, tmp_path, monkeypatch, no_hub):
    for name in ("zh_lora", "math_lora"):
        (tmp_path / "LoRAs" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraflowError, match=r"LoRAs exists and holds: math_lora, zh_lora"):
        FlowModel.from_pretrained(str(tiny_pair[0]), ["LoRAs/zh_lroa"])
