"""`loraflow <command> ...`: one console script, one row per command.

Each command lives in the module that does its job; that module exposes `add_arguments(parser)` and
`run(args) -> int`. Only the chosen command's module is imported, so `loraflow --help` is instant and one
command's optional dependencies never break another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loraflow.errors import LoraflowError

# name -> (module, one-line help). Add a row when a command lands; keep the order of a typical workflow.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-models": ("loraflow.convert.release", "download, check and convert the released LoRAs and gates"),
    "data": ("loraflow.data.cli", "validate data files; build data/ from the release and MGSM (check, prepare)"),
    "convert": ("loraflow.convert.cli", "convert LoRAs, base models and gates to/from the original formats"),
    "train": ("loraflow.train.recipe", "train the LoRA-Flow gates of a language–task pair (torchrun for several GPUs)"),
    "demo": ("loraflow.demo", "run the self-contained demo (tiny model built on the spot, no downloads)"),
    "export": ("loraflow.export", "write a LoRA-Flow model folder (base, LoRAs, gate, mode) for vLLM"),
    "serve": ("loraflow.vllm.serve", "vLLM's OpenAI-compatible server for a LoRA-Flow model folder"),
    "eval": ("loraflow.eval.run", "generate and score one benchmark with one fusion method (base ... flow)"),
    "eval-table": ("loraflow.eval.table", "the paper's results table from results.json files, beside its numbers"),
    "plot-gates": ("loraflow.plots", "plot a FlowModel's gate weights: per layer × token heatmap, per-layer bars"),
    "bench": ("loraflow.bench.cli", "benchmarks, side by side in one process: fused layer vs per-LoRA loop, ..."),
    "lm-eval": ("loraflow.lmeval.cli", "lm-evaluation-harness's CLI with the `loraflow` model (a model folder)"),
    "lm-eval-task": ("loraflow.lmeval.tasks", "a local lm-eval task (YAML + JSONL): MGSM with loraflow's prompts"),
    "score": ("loraflow.eval.score", "score a predictions.jsonl (MGSM, HumanEval, dev sets) and write results.json"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraflow",
        description="LoRA-Flow: dynamic per-token fusion of LoRA modules. Run `loraflow <command> --help`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<12} {h}" for n, (_, h) in COMMANDS.items()),
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of the commands below")
    p.add_argument("--version", action="version", version=f"loraflow {_version()}")
    return p


def _version() -> str:
    from loraflow import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    run_argv = getattr(module, "run_argv", None)  # a command that hands all its arguments to another CLI (lm-eval)
    if run_argv is None:
        parser = argparse.ArgumentParser(
            prog=f"loraflow {name}",
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        args = parser.parse_args(rest)
    try:
        return int((module.run(args) if run_argv is None else run_argv(rest)) or 0)
    except LoraflowError as e:
        print(f"error: {e}", file=sys.stderr)
        from loraflow.launch import report_error

        report_error(str(e))  # under `python -m loraflow.launch` (scripts/train.sh): the launcher prints it last
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
