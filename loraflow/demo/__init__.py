"""`loraflow demo`: LoRA-Flow's main job end to end on an embedded, self-contained default -- no GPU, no model hub.

A seeded synthetic world with two skills (a made-up language, English word problems) and a composite task that needs
both (word problems posed and solved in the made-up language); a tiny Llama pretrained on the spot, a language LoRA
and a task LoRA (PEFT), a LoRA-Flow gate trained with `loraflow train` on 200 composite examples, LoRA-Hub weights
searched with `loraflow.train.lorahub`; every method (base, each LoRA, average, LoRA-Hub, LoRA-Flow) evaluated on 250
held-out composite problems (the answer must be an L number word), over several seeds, printed as the paper's table
with mean ± sd and a claim sentence written from the numbers, plus gate-weight plots.

    loraflow demo                      # full size, 3 seeds at once, into outputs/demo/seed-{0,1,2}/ + report/
    loraflow demo --size small         # the CI-sized run (2 seeds, a minute or two; the numbers mean nothing)

A rerun skips every finished stage (see loraflow/demo/pipeline.py for the layout of a seed's folder and
loraflow/demo/seeds.py for the report over the seeds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loraflow.demo.pipeline import SIZES, DemoConfig, run_pipeline
from loraflow.errors import LoraflowError

DEFAULT_SEEDS = {"full": 3, "small": 2}

__all__ = ["DemoConfig", "add_arguments", "run", "run_pipeline"]


def add_arguments(p) -> None:
    p.add_argument("--size", default="full", choices=sorted(SIZES), help="full (the README's numbers) or small (CI)")
    p.add_argument("--out-dir", dest="out", default=None,
                   help="output folder [outputs/demo, or outputs/demo-small for --size small]")
    p.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the old spelling, for one release
    p.add_argument("--seed", type=int, default=0, help="the first seed of the world, the models and the data order [0]")
    p.add_argument("--seeds", type=int, default=None,
                   help="how many seeds (SEED, SEED+1, ...), each a whole run in OUT/seed-N/ [3; small: 2]")
    p.add_argument("--jobs", type=int, default=None,
                   help="seeds run at once, as processes of one torch thread each [all of them]")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # a seed's own process
    p.add_argument("--update-assets", nargs="?", const="assets", default=None, metavar="DIR",
                   help="also copy the gate heatmap to DIR/demo_gate_heatmap.png [assets]: only when refreshing the "
                        "README; without it the run writes under --out-dir only")
    p.add_argument("--no-plots", action="store_true", help="skip the gate-weight plots (no matplotlib needed)")


THREADS = 1  # the demo's CPU thread count: fixed, so the numbers do not depend on the machine's OMP_NUM_THREADS


def fix_threads(n: int = THREADS) -> None:
    """Run torch's CPU kernels on `n` threads whatever OMP_NUM_THREADS says: a different thread count splits the
    matmul reductions differently, the rounding changes, and training amplifies it into a different table."""
    import contextlib

    import torch

    torch.set_num_threads(n)
    # only settable before the first parallel work; the intra-op count is what rounds
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)


def run(args) -> int:
    import warnings

    fix_threads()
    # raised inside transformers/peft on every LoRA model; nothing a demo user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    from loraflow.demo.seeds import run_seeds

    DemoConfig.of_size(args.size, seed=args.seed)  # a bad size fails here
    n = args.seeds if args.seeds is not None else DEFAULT_SEEDS[args.size]
    if n < 1 or (args.jobs is not None and args.jobs < 1):
        raise LoraflowError(f"--seeds and --jobs must be >= 1, got {n} and {args.jobs}")
    out = args.out or ("outputs/demo" if args.size == "full" else f"outputs/demo-{args.size}")
    if not args.no_plots:
        from loraflow.plots import _pyplot

        _pyplot()  # fail now, not after the training, when matplotlib is missing
    run_seeds(args.size, list(range(args.seed, args.seed + n)), out, jobs=args.jobs or n, plots=not args.no_plots,
              assets=Path(args.update_assets) if args.update_assets else None, report=not args.no_report)
    return 0
