"""torchrun with loraflow's error contract: `python -m loraflow.launch [torchrun flags] -m loraflow.cli train ...`.

A worker that stops on bad input (a `LoraflowError`) prints `error: ...` and exits 2, and torchrun would then print
a ChildFailedError report of some 30 lines below it. Here every worker writes its message to one file (its path in
`$LORAFLOW_ERROR_FILE`, see `cli.main`); when the workers fail, the first message is printed as the last line and the
exit status is 2, as in a single process. Other failures (a crash, a signal) keep torchrun's own report.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ERROR_FILE_ENV = "LORAFLOW_ERROR_FILE"


def launch(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    fd, path = tempfile.mkstemp(prefix="loraflow-error-", suffix=".txt")
    os.close(fd)
    os.environ[ERROR_FILE_ENV] = path  # the workers inherit it
    try:
        run(parse_args(argv))
        return 0
    except ChildFailedError:
        messages = Path(path).read_text(encoding="utf-8").splitlines()
        if not messages:
            raise
        print(f"error: {messages[0]}", file=sys.stderr)
        return 2
    finally:
        Path(path).unlink(missing_ok=True)


def report_error(message: str) -> None:
    """In a worker started by `launch`: record the one-line message for the launcher to print."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(" ".join(message.splitlines()) + "\n")


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
