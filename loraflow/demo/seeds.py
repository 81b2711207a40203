"""The demo over several seeds, and the report over them: mean ± spread per method and the claim sentence.

Each seed is a whole pipeline run (`run_pipeline`) in `OUT/seed-{s}/`: its own world (lexicon), data, base model,
LoRAs, gate and LoRA-Hub search. Seeds run as parallel processes, each on one torch thread (`fix_threads`), so the
numbers do not depend on how many run at once. Then `OUT/report/` gets:

    table.md      mean ± sd over the seeds per method and metric, then the composite accuracy of every seed
    results.json  every seed's results, the statistics, the claim (its numbers and its sentence), the timings
    claim.txt     the claim sentence, as `claim_of` wrote it from the numbers

The claim is the paper's: LoRA-Flow beats every other method (each single LoRA, the base, average fusion, LoRA-Hub)
on the composite task. It is stated only if it holds in every seed, and with a smallest margin larger than the
largest spread (sd) between seeds of any method; otherwise the sentence says where it fails.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loraflow.demo.pipeline import METHOD_LABELS, METHODS, DemoConfig, run_pipeline
from loraflow.errors import LoraflowError
from loraflow.files import atomic_write_json, atomic_write_text, read_json

COMPOSITE = "composite_accuracy"
# (results key, column title, as a percentage share of words rather than an accuracy)
COLUMNS = (
    (COMPOSITE, "Composite: L math, answer in L (acc.)", False),
    ("composite_correct_in_l", "correct and in L", False),
    ("composite_digit_accuracy", "L math, MGSM scorer (any last number)", False),
    ("english_accuracy", "English math (acc.)", False),
    ("composite_l_word_share", "L words in L answers", True),
)


def seed_dir(out: str | os.PathLike, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def run_seeds(size: str, seeds: list[int], out: str | os.PathLike, jobs: int = 1, plots: bool = True,
              assets: Path | None = None, report: bool = True) -> dict:
    """Run (or resume) the pipeline for every seed, `jobs` processes at a time, then write the report.

    Plots are drawn for the first seed only (and it alone is copied to `assets`). With `jobs` 1 the seeds run in
    this process, one after the other."""
    out = Path(out)
    t0 = time.time()
    if jobs <= 1 or len(seeds) == 1:
        for i, seed in enumerate(seeds):
            run_pipeline(DemoConfig.of_size(size, seed=seed), seed_dir(out, seed), assets=assets if i == 0 else None,
                         plots=plots and i == 0)
    else:
        _run_processes(size, seeds, out, jobs, plots, assets)
    if not report:
        return {}
    return write_report(out, seeds, seconds=round(time.time() - t0, 1))


def _run_processes(size: str, seeds: list[int], out: Path, jobs: int, plots: bool, assets: Path | None) -> None:
    """One `loraflow demo --seeds 1` process per seed, its output in `OUT/seed-{s}/demo.log`."""
    import loraflow

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(loraflow.__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    todo, running = list(enumerate(seeds)), []
    print(f"== {len(seeds)} seeds ({', '.join(map(str, seeds))}), {min(jobs, len(seeds))} at a time, one torch "
          f"thread each; logs in {out}/seed-N/demo.log", flush=True)
    while todo or running:
        while todo and len(running) < jobs:
            i, seed = todo.pop(0)
            cmd = [sys.executable, "-m", "loraflow.cli", "demo", "--size", size, "--seed", str(seed), "--seeds", "1",
                   "--out-dir", str(out), "--no-report"]
            if not (plots and i == 0):
                cmd.append("--no-plots")
            if assets is not None and i == 0:
                cmd += ["--update-assets", str(assets)]
            log = seed_dir(out, seed) / "demo.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                running.append((seed, log, time.time(), subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                                         env=env)))
        time.sleep(0.5)
        for item in list(running):
            seed, log, start, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                for _, _, _, other in running:
                    other.terminate()
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise LoraflowError(f"demo seed {seed} failed (exit {proc.returncode}; log {log}): {tail[0]}")
            print(f"   seed {seed} done in {time.time() - start:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------------- report
def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def claim_of(per_seed: dict[int, dict[str, dict]]) -> dict:
    """The paper's claim checked on the composite accuracy of every seed: {"holds", "sentence", margins, spread}.

    margin of a seed = LoRA-Flow minus the best other method of that seed; spread = the largest sd over seeds of
    any method. It holds when every margin is positive and the smallest is larger than the spread."""
    seeds = sorted(per_seed)
    rivals = [m for m in METHODS if m != "flow"]
    margins = {}
    for s in seeds:
        acc = {m: 100 * per_seed[s][m][COMPOSITE] for m in METHODS}
        best = max(rivals, key=acc.__getitem__)
        margins[s] = {"best_other": best, "margin": acc["flow"] - acc[best]}
    spread = max(_stats([100 * per_seed[s][m][COMPOSITE] for s in seeds])["sd"] for m in METHODS)
    smallest = min(v["margin"] for v in margins.values())
    mean = statistics.fmean(v["margin"] for v in margins.values())
    n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    holds = smallest > 0 and smallest > spread
    if holds:
        sentence = (f"LoRA-Flow beats every other method on the composite task in each of the {n}: by "
                    f"{smallest:.1f} points at least and {mean:.1f} on average over the best other method of each "
                    f"seed, more than the largest spread between seeds ({spread:.1f} points sd).")
    else:
        losses = [f"seed {s}: {METHOD_LABELS[v['best_other']]} "
                  f"{100 * per_seed[s][v['best_other']][COMPOSITE]:.1f} against LoRA-Flow "
                  f"{100 * per_seed[s]['flow'][COMPOSITE]:.1f}" for s, v in margins.items() if v["margin"] <= 0]
        why = ("; ".join(losses) if losses else
               f"its smallest margin ({smallest:.1f} points) is not larger than the largest spread between seeds "
               f"({spread:.1f} points sd)")
        sentence = f"The paper's claim does not hold here: LoRA-Flow does not clearly beat every other method on " \
                   f"the composite task in each of the {n} ({why})."
    return {"holds": holds, "sentence": sentence, "margins": margins, "smallest_margin": smallest,
            "mean_margin": mean, "spread": spread, "seeds": seeds}


def format_table(per_seed: dict[int, dict[str, dict]]) -> str:
    seeds = sorted(per_seed)
    sign = " ± " if len(seeds) > 1 else ""
    lines = ["| Method | " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|---" * (1 + len(COLUMNS)) + "|"]
    for m in METHODS:
        cells = []
        for key, _, share in COLUMNS:
            st = _stats([100 * per_seed[s][m][key] for s in seeds])
            spread = f"{sign}{st['sd']:.{0 if share else 1}f}" if sign else ""
            cells.append(f"{st['mean']:.{0 if share else 1}f}{'%' if share else ''}{spread}")
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
    lines += ["", "| Composite (acc.) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---" * (1 + len(seeds)) + "|"]
    lines += [f"| {METHOD_LABELS[m]} | " + " | ".join(f"{100 * per_seed[s][m][COMPOSITE]:.1f}" for s in seeds) + " |"
              for m in METHODS]
    return "\n".join(lines) + "\n"


def write_report(out: str | os.PathLike, seeds: list[int], seconds: float | None = None) -> dict:
    """`OUT/report/{table.md, results.json, claim.txt}` from every seed's `report/results.json`."""
    out = Path(out)
    per_seed, seed_runs = {}, {}
    for s in seeds:
        path = seed_dir(out, s) / "report" / "results.json"
        if not path.is_file():
            raise LoraflowError(f"{path}: missing; seed {s} has not finished (rerun `loraflow demo`)")
        run = read_json(path)
        per_seed[s] = run["results"]
        seed_runs[s] = {"seconds": run.get("seconds"), "stage_seconds": run.get("stage_seconds")}
    table, claim = format_table(per_seed), claim_of(per_seed)
    stats = {m: {key: _stats([per_seed[s][m][key] for s in seeds]) for key, _, _ in COLUMNS} for m in METHODS}
    report = out / "report"
    atomic_write_text(report / "table.md", table)
    atomic_write_text(report / "claim.txt", claim["sentence"] + "\n")
    atomic_write_json(report / "results.json", {"seeds": seeds, "per_seed": {str(s): per_seed[s] for s in seeds},
                                                "stats": stats, "claim": claim, "seed_runs": seed_runs,
                                                "seconds": seconds})
    n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    print(f"\nLoRA-Flow demo, {n} (mean ± sd){f', {seconds:.0f} s' if seconds is not None else ''}:\n\n{table}\n"
          f"{claim['sentence']}\n\n  report  {report}/table.md, results.json, claim.txt", flush=True)
    return {"table": table, "claim": claim, "per_seed": per_seed}
