"""`loraflow eval-table` and `scripts/eval_table.sh`: the paper's table from results.json files, published beside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loraflow.cli import main
from loraflow.eval.table import PUBLISHED

ROOT = Path(__file__).resolve().parents[1]


def _result(out: Path, task: str, lang: str, method: str, value: float, name: str | None = None, split="test",
            strict: float | None = None, variant: str | None = None):
    metric = "accuracy" if task == "mgsm" else "pass@1"
    folder = out / f"{task}_{lang}" / (name or method) / (variant or "")
    folder.mkdir(parents=True)
    metrics = {metric: value, **({f"{metric}_strict": strict} if strict is not None else {})}
    (folder / "results.json").write_text(json.dumps(
        {"task": task, "language": lang, "split": split, "method": method, "name": name or method,
         "metrics": metrics, "counts": {"ids_scored": 250}, **({"variant": variant} if variant else {})}))


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_table_from_results_files(tmp_path, capsys):
    for lang, v in (("zh", 0.332), ("ru", 0.40), ("es", 0.44)):
        _result(tmp_path, "mgsm", lang, "flow", v, strict=v + 0.01)
    _result(tmp_path, "humaneval", "zh", "flow", 0.207, strict=0.25)
    _result(tmp_path, "humaneval", "es", "flow", 0.10, strict=0.30, variant="repaired")
    _result(tmp_path, "mgsm", "zh", "task", 0.25)
    _result(tmp_path, "mgsm", "zh", "flow", 0.30, name="flow-epoch2")
    _result(tmp_path, "mgsm", "zh", "flow", 0.99, name="dev-run", split="dev")  # not in the test table
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("{not json")
    out = tmp_path / "table.md"
    assert main(["eval-table", str(tmp_path), "--out", str(out)]) == 0
    table = out.read_text(encoding="utf-8")
    assert table == capsys.readouterr().out
    assert table.splitlines()[0].startswith("| Method | MGSM zh | MGSM ru | MGSM es | MGSM avg | HumanEval zh |")
    flow = _row(table, "Fusion: LoRA-Flow")
    # faithful / strict (published)
    assert flow[:4] == ["33.2 / 34.2 (33.2)", "40.0 / 41.0 (37.6)", "44.0 / 45.0 (42.0)", "39.1 / 40.1 (37.6)"]
    assert flow[4:] == ["20.7 / 25.0 (20.7)", "– (23.8)", "– (23.2)", "– (22.6)"]  # no average of a partial row
    repaired = _row(table, "Fusion: LoRA-Flow (flow, repaired prompts)")
    assert repaired[4:] == ["– (20.7)", "– (23.8)", "10.0 / 30.0 (23.2)", "– (22.6)"]
    assert _row(table, "Fusion: LoRA-Flow (flow-epoch2)")[0] == "30.0 (33.2)"
    assert _row(table, "Single LoRA: task")[:2] == ["25.0 (26.8)", "– (32.8)"]
    assert _row(table, "Base model") == [f"– ({v:.1f})" for t in ("mgsm", "humaneval") for v in PUBLISHED["base"][t]]
    labels = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert labels == ["Base model", "Single LoRA: language", "Single LoRA: task", "Fusion: average",
                      "Fusion: LoRA-Hub", "Fusion: LoRA-Flow", "Fusion: LoRA-Flow (flow, repaired prompts)",
                      "Fusion: LoRA-Flow (flow-epoch2)"]


def test_eval_table_sh_runs_every_pair_and_method(tmp_path):
    """The loop and the gate lookup, with PYTHON replaced by a recorder (only eval-table really runs)."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [ "$3" = eval-table ]; then exec {sys.executable} "$@"; fi
""")
    fake.chmod(0o755)
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "zh_math.pt").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": str(fake), "OUT_DIR": str(tmp_path / "out"),
           "PAIRS": "zh_math ru_code", "METHODS": "task flow", "GATE_DIR": str(gates)}
    proc = subprocess.run(["bash", str(ROOT / "scripts/eval_table.sh"), "3"], env=env, capture_output=True,
                          text=True, timeout=120)
    calls = log.read_text().splitlines()
    evals = [c for c in calls if " eval " in f" {c} "]
    assert len(evals) == 3  # ru_code has no gate: its flow run is skipped and reported
    assert "--language zh --split test --method flow" in evals[1] and f"--gate {gates / 'zh_math.pt'}" in evals[1]
    assert "--allow-code-execution" in evals[2] and "--allow-code-execution" not in evals[0]
    assert proc.returncode == 1 and "not done: ru_code/flow" in proc.stderr
    assert (tmp_path / "out" / "table.md").is_file() and "Fusion: LoRA-Flow" in proc.stdout
