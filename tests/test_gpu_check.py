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


@pytest.mark.parametrize("gpus", [1, 2])
def test_the_vllm_commands_parse_with_their_own_parsers(gpus, tmp_path):
    # the CUDA-only check cannot run here: at least its command lines must be ones the modules accept
    import argparse

    from loraflow.vllm.bench import add_bench_arguments
    from loraflow.vllm.check import build_parser

    commands = gpu_check.vllm_commands(tmp_path, gpus)
    assert list(commands) == (["TP=1", "TP=2"] if gpus == 2 else ["TP=1"]) + ["bench"]
    for name in ("TP=1", "TP=2")[:gpus]:
        assert commands[name][1:3] == ["-m", "loraflow.vllm.check"]
        args = build_parser().parse_args(commands[name][3:])
        assert args.command == "selftest" and args.tensor_parallel_size == (2 if name == "TP=2" else 1)
    assert commands["bench"][1:3] == ["-m", "loraflow.vllm.bench"]
    bench = argparse.ArgumentParser()
    add_bench_arguments(bench)
    args = bench.parse_args(commands["bench"][3:])
    assert args.random_shape == {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "vocab": 32000}
    assert args.batches == "1,16" and args.json == str(tmp_path / "vllm-bench.json") and not args.no_hf


def test_bench_vllm_refuses_a_bad_random_shape(capsys):
    import argparse

    from loraflow.vllm.bench import add_bench_arguments

    bench = argparse.ArgumentParser()
    add_bench_arguments(bench)
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--random-shape", "hidden=512,depth=4"])
    assert exit_info.value.code == 2 and "'depth=4': expected key=integer" in capsys.readouterr().err
