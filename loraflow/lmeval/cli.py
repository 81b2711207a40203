"""`loraflow lm-eval ARGS...`: lm-evaluation-harness's own command line, with the `loraflow` model registered.

  loraflow lm-eval-task mgsm --language zh --data-root data --out-dir tasks --limit 4
  loraflow lm-eval --model loraflow --model_args folder=OUT,engine=hf --batch_size 4 \\
      --include_path tasks --tasks loraflow_mgsm_zh --output_path results --log_samples

Every argument goes to lm-eval 0.4.13's CLI (`lm_eval.__main__.cli_evaluate`; `run` is implied, as with
`lm-eval`). `--model loraflow` takes a LoRA-Flow model folder (`loraflow export`); its `--model_args` are in
`loraflow.lmeval.model` (folder, engine=auto|hf|vllm, dtype, max_length, max_gen_toks, tensor_parallel_size;
lm-eval's --batch_size and --device reach it too). lm-eval's own models stay available (`--model hf`, `--model vllm`).
"""

from __future__ import annotations

import sys

from loraflow.errors import LoraflowError
from loraflow.lmeval import INSTALL_HINT, lm_eval_available, register


def run_argv(argv: list[str]) -> int:
    """`loraflow lm-eval`: lm-eval's CLI on `argv` (all of it), in this process, with the model registered."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nlm-eval's own help (`lm-eval run --help`):\n", flush=True)
        argv = ["run", "--help"]
    if not lm_eval_available():
        raise LoraflowError(f"`loraflow lm-eval` needs lm-eval: {INSTALL_HINT}")
    register()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's exits (--help, a bad flag) keep their status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0
