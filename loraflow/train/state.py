"""What a training run leaves on disk, written so that a crash never leaves something that looks complete.

    OUT_DIR/RUN_NAME/
      config.json              the resolved TrainConfig (+ versions, trainable parameter count)
      metrics.jsonl            one line per logged step: step, epoch, lr, loss (mean over the step's response
                               tokens), grad_norm (before clipping), tokens (non-padding, all processes),
                               response_tokens, tokens_per_s; and one per epoch: step, epoch, dev_loss
      state/                   the latest training state: trainer.pt (step, data position, optimizer, gates,
                               dev history, config) + rng_rank{r}.pt (each process's RNG states)
      epoch_{n}/               gate.safetensors + gate.json after epoch n
      final/                   the gate when training stopped
      summary.json             written last: the run is complete
    OUT_DIR/RUN_NAME.safetensors + .json   the best epoch's gate (lowest dev loss; the last epoch without a dev set)

Folders are written under a temporary name and renamed into place; files are written to a temporary file and
renamed (`files.atomic_path`). State files are `torch.save` dicts of tensors and plain values, read back with
`weights_only=True` (nothing is unpickled beyond that).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from loraflow.errors import LoraflowError
from loraflow.files import atomic_path
from loraflow.train.distributed import barrier

STATE = "state"
TRAINER_FILE = "trainer.pt"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator, and the GPU's on CUDA. (Training's LoRA dropout does not draw
    from them: its masks are keyed by seed, step and example position; they are kept for anything else random.)"""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`; an older `final` is renamed aside first and then removed, so
    at every moment either the old or the new folder is complete under `final` or `final.old`."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_training_state(run_dir: Path, trainer: dict, rank: int, world_size: int, device: torch.device) -> None:
    """Collective: every process writes its RNG states, rank 0 the trainer state; then rank 0 renames the folder
    into place. Needs `run_dir` on a file system all processes share (as torchrun runs on one node, or NFS)."""
    tmp = run_dir / f"{STATE}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(device), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save({**trainer, "world_size": world_size}, tmp / TRAINER_FILE)
    barrier()
    if rank == 0:
        _replace_dir(tmp, run_dir / STATE)
    barrier()


def find_state(run_dir: Path) -> Path | None:
    for name in (STATE, f"{STATE}.old"):  # `.old` only survives a crash in the middle of `_replace_dir`
        if (run_dir / name / TRAINER_FILE).is_file():
            return run_dir / name
    return None


def load_training_state(run_dir: Path, rank: int, world_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer state, this process's RNG states) of the run in `run_dir`; refuses another number of processes."""
    folder = find_state(run_dir)
    if folder is None:
        raise LoraflowError(f"--resume: no training state in {run_dir} (looked for {run_dir / STATE / TRAINER_FILE}); "
                            "run without --resume to start afresh")
    trainer = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True)
    if trainer.get("world_size") != world_size:
        raise LoraflowError(f"--resume: the run in {run_dir} was trained with {trainer.get('world_size')} "
                            f"process(es), this one has {world_size}; resume with the same number so that the data "
                            "split continues exactly")
    rng_file = folder / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise LoraflowError(f"--resume: {rng_file} is missing")
    return trainer, torch.load(rng_file, map_location="cpu", weights_only=True)


def save_gate_folder(flow, path: Path, **metadata) -> None:
    """Write a gate folder (gate.safetensors + gate.json) under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    flow.save_gate(tmp, **metadata)
    _replace_dir(tmp, path)


def export_gate(src: Path, dst: Path) -> None:
    """Copy the gate folder `src` to `dst` = `X.safetensors` (+ `X.json` beside it), each file atomically."""
    for name, suffix in (("gate.safetensors", ".safetensors"), ("gate.json", ".json")):
        with atomic_path(dst.with_suffix(suffix)) as tmp:
            shutil.copyfile(src / name, tmp)


class MetricsLog:
    """`metrics.jsonl`, appended by rank 0. On resume, lines after the resumed step are dropped first, so the
    file reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, **row) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
