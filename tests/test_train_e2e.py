"""Gate training across processes, all with LoRA dropout 0.1 on (the release's setting): scripts/train.sh under
torchrun (2 gloo processes × batch 2), one process × batch 2 × FREQ 2, FSDP2, and a run killed with SIGKILL (by the
test, at a step it sees in metrics.jsonl) and resumed. Each compares its final gate with a one-process run of the
same optimizer steps: the dropout masks are keyed by the example's place in the step, not by the process."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_world import assert_same_gate, build_world, read_metrics

from loraflow.train.recipe import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("train_e2e"))


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One process, batch 4, LoRA dropout on: the gate the split runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    train(world.config(out, batch_per_device=4, total_batch=None, lora_dropout=True))
    return out / "zh_math"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def test_train_sh_two_processes_equal_one_process(world, reference, tmp_path):
    out = tmp_path / "gates"
    env = subprocess_env(NPROC="2", EPOCHS="3", MAX_LEN="256", BASE_MODEL=str(world.base),
                         LORA_ROOT=str(world.lora_root), DATA_ROOT=str(world.data_root), OUT_DIR=str(out),
                         PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts/train.sh"), "zh", "math", "5e-2", "2", str(free_port()),
                           "--select", "dev-metric", "--dev-max-new-tokens", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    echoed = next(line for line in proc.stderr.splitlines() if line.startswith("+ "))
    assert "-m loraflow.launch" in echoed and "--nproc_per_node 2" in echoed and "--batch-per-device 2" in echoed
    run = out / "zh_math"
    for name in ("config.json", "summary.json", "metrics.jsonl", "epoch_1/gate.safetensors",
                 "epoch_3/gate.json", "final/gate.safetensors", "state/rng_rank1.pt"):
        assert (run / name).is_file(), name
    assert (out / "zh_math.safetensors").is_file() and (out / "zh_math.json").is_file()
    # --dev-metric: each process generated its share of the 3 dev items; rank 0 gathered and scored them
    dev = [json.loads(line) for line in (run / "dev" / "epoch_3" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in dev] == ["0", "1", "2"]
    assert json.loads((run / "dev" / "epoch_3" / "results.json").read_text())["counts"]["ids_scored"] == 3
    config = json.loads((run / "config.json").read_text())
    assert (config["world_size"], config["batch_per_device"], config["total_batch"]) == (2, 2, 4)
    assert config["loras"] is None and config["lora_root"] == str(world.lora_root) and config["lora_dropout"]
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert sum(r["loss"] for r in steps[-2:]) < sum(r["loss"] for r in steps[:2])  # last epoch vs first
    # 2 processes × batch 2 (gloo, torchrun) = 1 process × batch 4: the same examples per step, loss / global tokens,
    # the same dropout masks per example
    assert_same_gate(run / "final", reference / "final")


def test_gradient_accumulation_equals_one_batch_with_dropout_on(world, reference, tmp_path):
    """1 process × batch 2 × FREQ 2 = 1 × batch 4; and the dropout matters (without it the gates differ)."""
    train(world.config(tmp_path / "accum", batch_per_device=2, grad_accum=2, total_batch=None, lora_dropout=True))
    assert_same_gate(tmp_path / "accum" / "zh_math" / "final", reference / "final")
    train(world.config(tmp_path / "nodrop", batch_per_device=4, total_batch=None, lora_dropout=False))
    with pytest.raises(AssertionError):
        assert_same_gate(tmp_path / "nodrop" / "zh_math" / "final", reference / "final", atol=1e-4, rtol=0)


def _fsdp_worker(rank: int, world_size: int, port: int, cfg) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(cfg)


def test_fsdp_two_processes_equal_one_process(world, reference, tmp_path):
    """FSDP2 (fully_shard per decoder layer, then the root) over gloo on CPU; forked workers skip re-importing."""
    cfg = world.config(tmp_path, batch_per_device=2, total_batch=None, fsdp=True, lora_dropout=True)
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_fsdp_worker, args=(rank, 2, port, cfg)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    config = json.loads((tmp_path / "zh_math" / "config.json").read_text())
    assert config["fsdp"] and config["world_size"] == 2
    assert_same_gate(tmp_path / "zh_math" / "final", reference / "final")


def kill_when_logged(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> int:
    """SIGKILL `proc` as soon as metrics.jsonl shows optimizer step >= `step`; returns the last step seen then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        steps = [json.loads(line)["step"] for line in lines if line.strip() and '"loss"' in line]
        if steps and steps[-1] >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return steps[-1]
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=60)
    raise AssertionError(f"the run ended (exit {proc.returncode}) before logging step {step}: "
                         f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")


def test_killed_run_resumes_to_the_same_gate(world, tmp_path):
    """With LoRA dropout on: resuming restores the gates, AdamW moments, lr step, data position and RNG states."""
    flags = world.flags(tmp_path / "killed", "--total-batch", "2", "--save-every", "3", "--lora-dropout")
    # 4 steps per epoch, 12 in all; states are saved after steps 3, 4 (epoch end), 6, 8, 9; killed from step 5 on
    proc = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "train", *flags], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    run = tmp_path / "killed" / "zh_math"
    seen = kill_when_logged(proc, run / "metrics.jsonl", step=5)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(run / "state" / "trainer.pt", weights_only=True)
    assert 4 <= state["step"] <= seen < 12 and [h["epoch"] for h in state["history"]][:1] == [1]
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert [r["step"] for r in read_metrics(run) if "loss" in r][:seen] == list(range(1, seen + 1))

    cfg = dict(total_batch=2, save_every=3, lora_dropout=True)
    train(world.config(tmp_path / "killed", resume=True, **cfg))
    train(world.config(tmp_path / "straight", **cfg))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 13))  # each step once
    straight = tmp_path / "straight" / "zh_math"
    assert_same_gate(run / "final", straight / "final")
    assert_same_gate(tmp_path / "killed" / "zh_math.safetensors", tmp_path / "straight" / "zh_math.safetensors")
    history = [json.loads((r / "summary.json").read_text())["history"] for r in (run, straight)]
    assert [h["dev_loss"] for h in history[0]] == pytest.approx([h["dev_loss"] for h in history[1]], rel=1e-6)


PLANT = '''import os
from loraflow.eval import score as scoring
planted, real, calls = [float(v) for v in os.environ["PLANTED_DEV_METRICS"].split(",")], scoring.score_predictions, []
def score(*args, **kwargs):
    results = real(*args, **kwargs)
    calls.append(results)
    return {**results, "metrics": {**results["metrics"], "accuracy": planted[len(calls) - 1]}}
scoring.score_predictions = score
'''


def test_train_sh_defaults_to_the_original_recipe(world, tmp_path):
    """scripts/train.sh with no recipe flags: the CoT phrase after [/INST] in every training example's tokens, and
    the exported gate is the epoch with the best faithful dev metric (planted: a random tiny model scores 0), not
    the lowest dev loss."""
    from train_world import read_gate

    from loraflow.data.prompts import COT_SUFFIX
    from loraflow.data.records import load_split, training_example
    from loraflow.train.config import TrainConfig
    from loraflow.train.recipe import data_fingerprint, load_tokenizer

    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(PLANT)  # imported by every Python the script starts
    out = tmp_path / "gates"
    env = subprocess_env(EPOCHS="3", MAX_LEN="256", BASE_MODEL=str(world.base), LORA_ROOT=str(world.lora_root),
                         DATA_ROOT=str(world.data_root), OUT_DIR=str(out), PYTHON=sys.executable,
                         PYTHONPATH=f"{ROOT}:{plant}", PLANTED_DEV_METRICS="0.0,1.0,0.5")
    proc = subprocess.run(["bash", str(ROOT / "scripts/train.sh"), "zh", "math", "5e-2", "4", str(free_port()),
                           "--dev-max-new-tokens", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = out / "zh_math"
    config, summary = (json.loads((run / name).read_text()) for name in ("config.json", "summary.json"))
    assert config["cot_suffix"] is True and config["select"] == "dev-metric"
    # the tokens trained on: every prompt ends with the phrase right after [/INST]
    tok = load_tokenizer(TrainConfig(**{**world.config(tmp_path).to_dict(), "select": "dev-loss"}))
    records = load_split(world.data_root, "zh", "math", "train")
    with_cot = [training_example(tok, r, records.kind, "你是中文助手。", cot_suffix=True) for r in records]
    without = [training_example(tok, r, records.kind, "你是中文助手。", cot_suffix=False) for r in records]
    assert config["data_fingerprint"] == data_fingerprint(with_cot) != data_fingerprint(without)
    for ex in with_cot:
        prompt = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label == -100])
        assert prompt.endswith("[/INST]" + COT_SUFFIX)
    # the epoch with the best (planted) faithful dev accuracy is the exported gate
    assert [h["dev_metric"] for h in summary["history"]] == [0.0, 1.0, 0.5] and summary["best_epoch"] == 2
    assert summary["selected_by"] == "dev accuracy (ties: dev loss)"
    assert_same_gate(out / "zh_math.safetensors", run / "epoch_2", atol=0, rtol=0)
    assert any(not torch.equal(v, read_gate(run / "epoch_3")[k]) for k, v in read_gate(run / "epoch_2").items())
