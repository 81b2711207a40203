"""The shell scripts pick their interpreter the same way: $PYTHON, else the repository's .venv/bin/python (what
scripts/setup_env.sh creates), else python3 from PATH. Checked with a recording stand-in for Python."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> its arguments (enough to reach the Python call; everything else is left at its default)
CALLS = {
    "train.sh": ["zh", "math", "1e-3", "2", "12350"],
    "eval.sh": ["0", "12350", "zh", "math", "gate"],
    "eval_table.sh": ["0"],
    "model_preparation.sh": [],
    "prepare_data.sh": [],
    "gpu_check.sh": ["--dry-run"],
}


def _recorder(path: Path, log: Path) -> Path:
    """A fake interpreter: logs how it was called; `-c` snippets (train.sh's GPU probe) print 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/usr/bin/env bash\necho "$0 $*" >> {log}\nif [ "$1" = -c ]; then echo 1; fi\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def repo(tmp_path):
    """A copy of scripts/ in an otherwise empty repository."""
    shutil.copytree(ROOT / "scripts", tmp_path / "repo" / "scripts")
    return tmp_path / "repo"


def _run(repo: Path, script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "TORCHRUN")}
    extra = {"PAIRS": "zh_math", "METHODS": "task", "OUT_DIR": str(tmp_path / "out"),
             "DATA_SRC": str(tmp_path), "MGSM_LANGS": "", "CUDA_VISIBLE_DEVICES": "0"}
    return subprocess.run(["bash", str(repo / "scripts" / script), *CALLS[script]], cwd=tmp_path,
                          env={**base, **extra, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", list(CALLS))
def test_scripts_default_to_the_venv_python_else_python3(repo, tmp_path, script):
    log = tmp_path / "calls.log"
    venv_python = _recorder(repo / ".venv" / "bin" / "python", log)
    proc = _run(repo, script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith(f"{venv_python} ") for c in calls), calls

    shutil.rmtree(repo / ".venv")
    log.unlink()
    fake_bin = tmp_path / "bin"
    _recorder(fake_bin / "python3", log)
    proc = _run(repo, script, tmp_path, PATH=f"{fake_bin}:{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith(f"{fake_bin / 'python3'} ") for c in calls), calls

    log.unlink()
    chosen = _recorder(tmp_path / "chosen" / "python", log)
    proc = _run(repo, script, tmp_path, PYTHON=str(chosen), PATH=f"{fake_bin}:{os.environ['PATH']}")
    assert proc.returncode == 0, proc.stderr
    assert all(c.startswith(f"{chosen} ") for c in log.read_text().splitlines())
