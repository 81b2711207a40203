"""scripts/gpu_check.sh: its CPU-safe parts run on the CPU with --dry-run (the CUDA run is for machines with a GPU),
it prints one table, and a failed check makes it exit non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraflow import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_cpu_safe_check(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| check | result | seconds | detail |" in proc.stdout
    results = {r["check"]: r for r in json.loads(out.read_text())["results"]}
    assert [results[c]["status"] for c in ("gate_step", "generate", "fsdp", "bench")] == ["ok"] * 4, results
    assert results["vllm"] == {**results["vllm"], "status": "skip", "detail": "needs CUDA"}
    assert "top-1 agreement" in results["generate"]["detail"] and "world size 1" in results["fsdp"]["detail"]


def test_a_failed_check_is_reported_and_the_exit_status_is_1(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise AssertionError("top-1 agreement 0.100 (needs >= 0.9)")

    monkeypatch.setattr(gpu_check, "check_generate", broken)
    assert gpu_check.main(["--dry-run", "--skip", "gate_step,fsdp,bench"]) == 1
    out = capsys.readouterr().out
    assert "| generate | FAIL |" in out and "top-1 agreement 0.100" in out
    assert "| gate_step | skip |" in out and "| vllm | skip |" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_to_use_dry_run(capsys):
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
