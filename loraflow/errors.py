"""The one exception type for problems a user can fix (bad input, mismatched checkpoints, missing files).

The CLI prints these as `error: <message>` and exits with status 2; anything else is a bug and keeps its traceback.
"""


class LoraflowError(Exception):
    """A user-facing error whose message says what was wrong, where (file, line, key) and what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a one-line error quotes."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
