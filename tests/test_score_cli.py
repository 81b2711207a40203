"""`loraflow score` end to end on small predictions files built from the real data."""

from __future__ import annotations

import json

import pytest

from loraflow.cli import main


def write_predictions(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mgsm(tmp_path, loraflow_data, capsys):
    data = loraflow_data / "test" / "ru_math_test.jsonl"
    golds = [json.loads(line)["answer"] for line in data.open(encoding="utf-8")]
    comma = golds.index("2,125")
    rows = [
        {"id": 0, "generation": f"... The answer is: {golds[0]}"},  # right in both modes
        {"id": "1", "generation": f"#### {golds[1]}.00"},  # faithful "...00" is wrong, strict is right
        {"id": "2", "generation": "The answer is: 123456789"},  # wrong
        {"id": str(comma), "generation": "The answer is: 2,125"},  # the comma bug: only strict can be right
    ]
    rows = [{**r, "task": "mgsm", "language": "ru", "split": "test", "method": "flow", "prompt": "..."} for r in rows]
    preds = write_predictions(tmp_path / "ru_mgsm.jsonl", rows)
    assert main(["score", "--task", "mgsm", "--predictions", str(preds), "--data", str(data)]) == 0
    assert "accuracy 0.2500" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"] == {"accuracy": 0.25, "accuracy_strict": 0.75}
    assert (results["task"], results["language"], results["split"], results["method"]) == ("mgsm", "ru", "test",
                                                                                          "flow")
    assert results["counts"] | {"gold_not_numeric": 0} == {
        "predictions": 4, "scored": 4, "items": 250, "ids_scored": 4, "missing_ids": 246, "extra_ids": 0,
        "gold_not_numeric": 0}
    assert results["versions"]["loraflow"]
    scored = read_lines(tmp_path / "ru_mgsm.scored.jsonl")
    assert [s["correct"] for s in scored] == [True, False, False, False]
    assert [s["correct_strict"] for s in scored] == [True, True, False, True]
    assert scored[3]["extracted"] == "2125" and scored[3]["extracted_strict"] == "2125"
    assert all(s["prompt"] == "..." and s["method"] == "flow" for s in scored)  # the input lines are kept


def test_mgsm_tsv_and_data_root(tmp_path, shared_data):
    tsv = shared_data / "mgsm" / "mgsm_es.tsv"
    if not tsv.is_file():
        pytest.skip("no MGSM TSV files in the shared data")
    gold = tsv.read_text(encoding="utf-8").splitlines()[2].rsplit("\t", 1)[1]
    preds = write_predictions(tmp_path / "p.jsonl", [{"id": "2", "generation": f"The answer is: {gold}"}])
    assert main(["score", "--task", "mgsm", "--predictions", str(preds), "--data", str(tsv)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["accuracy"] == 1.0


def test_unknown_id_names_file_and_line(tmp_path, loraflow_data, capsys):
    preds = write_predictions(tmp_path / "p.jsonl", [{"id": "0", "generation": "1"}, {"id": "0", "generation": "2"},
                                                     {"id": "250", "generation": "3"}])
    data = loraflow_data / "test" / "zh_math_test.jsonl"
    assert main(["score", "--task", "mgsm", "--predictions", str(preds), "--data", str(data)]) == 2
    assert f"{preds}:3: id '250' is not in the data" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_math_dev(tmp_path, loraflow_data):
    """Math dev records carry an `id` (MetaMathQA's): predictions are matched by it, as `loraflow eval` writes them."""
    data = loraflow_data / "dev" / "zh_math_dev.jsonl"
    ids = [str(json.loads(line)["id"]) for line in data.open(encoding="utf-8")][:2]
    preds = write_predictions(tmp_path / "p.jsonl", [
        {"id": ids[0], "generation": "The answer is: 3", "language": "zh"},  # item 0's answer is 3
        {"id": ids[1], "generation": "The answer is: 4", "language": "zh"}])  # item 1's is 4
    assert main(["score", "--task", "math-dev", "--predictions", str(preds), "--data-root",
                 str(loraflow_data)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data"] == str(data) and results["split"] == "dev"
    scored = read_lines(tmp_path / "p.scored.jsonl")
    # SPEC §3: the faithful gold is GSM8KPost of the whole answer; item 0's ends "... x=3$。" after its last "=",
    # so it is "3$。" and can never be matched; strict reads the English "The answer is: 3"
    assert [s["gold"] for s in scored] == ["3$。", "4"] and [s["gold_strict"] for s in scored] == ["3", "4"]
    assert [s["correct"] for s in scored] == [False, True] and [s["correct_strict"] for s in scored] == [True, True]
    assert results["metrics"] == {"accuracy": 0.5, "accuracy_strict": 1.0}


def humaneval_rows(loraflow_data, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (loraflow_data / "test" / "zh_code_test.jsonl").open(encoding="utf-8")][:n]
    out = []
    for i, r in enumerate(rows):
        solution = r["canonical_solution"] if i % 2 == 0 else "    return None\n"  # every other one is wrong
        code = (r["prompt"].rstrip("\n") + "\n" + solution).replace("    ", "\t")
        out.append({"id": r["task_id"], "generation": f"```python\n{code}\n```", "language": "zh",
                    "task": "humaneval"})
    return out


def test_humaneval_needs_opt_in(tmp_path, loraflow_data, capsys):
    preds = write_predictions(tmp_path / "he.jsonl", humaneval_rows(loraflow_data, 2))
    assert main(["score", "--task", "humaneval", "--predictions", str(preds)]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["he.jsonl"]  # nothing written


def test_humaneval(tmp_path, loraflow_data):
    rows = humaneval_rows(loraflow_data, 4)
    preds = write_predictions(tmp_path / "he.jsonl", rows + rows[:2])  # two samples for the first two ids
    assert main(["score", "--task", "humaneval", "--predictions", str(preds), "--data-root", str(loraflow_data),
                 "--allow-code-execution", "--workers", "2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"] == {"pass@1": 0.5, "pass@1_strict": 0.5}
    assert results["counts"]["missing_ids"] == 160 and results["counts"]["samples_per_id_min"] == 1
    assert results["config"]["timeout"] == 3.0 and isinstance(results["config"]["sandbox"], list)
    scored = read_lines(tmp_path / "he.scored.jsonl")
    assert [s["correct"] for s in scored] == [True, False, True, False, True, False]
    assert scored[1]["detail"].startswith("failed") and scored[0]["extracted"].startswith("from typing import")


def test_code_dev(tmp_path, loraflow_data):
    data = loraflow_data / "dev" / "es_code_dev.jsonl"
    items = [json.loads(line) for line in data.open(encoding="utf-8")][:2]
    preds = write_predictions(tmp_path / "p.jsonl", [
        {"id": items[0]["task_id"], "generation": f"Aquí está:\n\n{items[0]['code']}\n\nFunciona."},
        {"id": items[1]["task_id"], "generation": f"```python\n{items[1]['code']}\n```"}])
    assert main(["score", "--task", "code-dev", "--predictions", str(preds), "--data", str(data),
                 "--allow-code-execution", "--workers", "2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    # faithful: split("\n\n")[1] is item 0's code; item 1 has no blank line (the original's IndexError)
    assert results["metrics"] == {"pass@1": 0.5, "pass@1_strict": 1.0}
    scored = read_lines(tmp_path / "p.scored.jsonl")
    assert scored[1]["detail"].startswith("failed: IndexError") and results["counts"]["no_blank_line"] == 1
    # 20 lines but 19 ids: task 599 appears twice in the es file (a duplicate record)
    assert results["counts"]["items"] == 19 and results["counts"]["missing_ids"] == 17


def test_code_programs_cannot_read_the_predictions_or_the_data(tmp_path, loraflow_data, capsys, monkeypatch):
    """`loraflow score` covers the predictions' folder and the data's: a right solution that first checks that it
    cannot see either passes only if both are hidden (where the machine has mount namespaces)."""
    import functools

    from loraflow.eval.sandbox import runner as sandbox

    # programs keep the evaluator's uid here, so that only hiding (not uid 65534's permissions) can pass the probe
    monkeypatch.setattr(sandbox, "SandboxLimits", functools.partial(sandbox.SandboxLimits, run_as=None))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = data_dir / "es_code_dev.jsonl"
    data.write_text((loraflow_data / "dev" / "es_code_dev.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    item = json.loads(data.read_text(encoding="utf-8").splitlines()[0])
    preds = tmp_path / "run" / "p.jsonl"
    preds.parent.mkdir()
    probe = "\n".join(f"assert not os.path.exists({str(p)!r})" for p in (preds, data))
    # the text before the blank line, then the program: what both the faithful (split("\n\n")[1]) and the strict
    # completion cut keep
    generation = f"Here is the program:\n\nimport os\n{probe}\n{item['code']}"
    write_predictions(preds, [{"id": item["task_id"], "generation": generation}])
    assert main(["score", "--task", "code-dev", "--predictions", str(preds), "--data", str(data),
                 "--allow-code-execution", "--workers", "1"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    if "hidden-files" not in results["config"]["sandbox"]:
        assert "hidden-files:" in capsys.readouterr().err  # says which protection is off
        pytest.skip("no mount namespace here: programs can read the user's files (documented)")
    assert results["metrics"] == {"pass@1": 1.0, "pass@1_strict": 1.0}, read_lines(tmp_path / "run" / "p.scored.jsonl")


def test_missing_protections_are_named():
    from loraflow.eval.sandbox.runner import PROTECTIONS, missing_protections

    everything = list(PROTECTIONS)
    assert missing_protections(everything) == []
    off = missing_protections([m for m in everything if m not in ("net", "hidden-files")])
    assert off == ["net", "hidden-files"]
