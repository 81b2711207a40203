"""Every file loraflow writes gets the mode the umask gives a plainly created file (0644 under umask 022), although
it is written to a private temporary file (or folder) first and then renamed."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from loraflow.cli import main
from loraflow.files import atomic_write_json, current_umask, save_tensors


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Run the test under a given umask, restored afterwards."""
    saved = os.umask(0o022)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


def test_current_umask_reads_without_changing_it(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027


def test_gate_results_scored_predictions_and_plot_are_0644_under_umask_022(umask, tiny_pair, loraflow_data,
                                                                             tmp_path):
    pytest.importorskip("matplotlib")
    from loraflow import FlowModel
    from loraflow.plots import layer_bars
    from loraflow.train.state import export_gate

    umask(0o022)
    base, loras = tiny_pair
    flow = FlowModel.from_pretrained(str(base), loras=[str(p) for p in loras])
    flow.save_gate(tmp_path / "gate")
    export_gate(tmp_path / "gate", tmp_path / "best.safetensors")
    gate_files = [tmp_path / "gate" / "gate.safetensors", tmp_path / "gate" / "gate.json",
                  tmp_path / "best.safetensors", tmp_path / "best.json"]

    data = loraflow_data / "test" / "ru_math_test.jsonl"
    preds = tmp_path / "run" / "predictions.jsonl"
    preds.parent.mkdir()
    preds.write_text(json.dumps({"id": 0, "generation": "The answer is: 1"}) + "\n", encoding="utf-8")
    assert main(["score", "--task", "mgsm", "--predictions", str(preds), "--data", str(data)]) == 0
    result_files = [tmp_path / "run" / name for name in ("results.json", "predictions.scored.jsonl")]

    plot = layer_bars(torch.rand(flow.num_layers, flow.k), ["a", "b"], tmp_path / "plots" / "layers.png")
    for path in [*gate_files, *result_files, plot]:
        assert path.is_file() and mode(path) == 0o644, f"{path}: mode {oct(mode(path))}"


def test_the_mode_follows_the_umask_and_staged_folders_too(umask, tmp_path):
    from loraflow.convert.shards import staged_output

    umask(0o077)
    atomic_write_json(tmp_path / "private.json", {})
    assert mode(tmp_path / "private.json") == 0o600
    umask(0o002)
    save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    assert mode(tmp_path / "t.safetensors") == 0o664
    umask(0o022)
    with staged_output(tmp_path / "converted") as stage:
        (stage.path / "a.txt").write_text("a")
    assert mode(tmp_path / "converted") == 0o755 and mode(tmp_path / "converted" / "a.txt") == 0o644
