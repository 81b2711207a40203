"""Running model-written programs: the evaluator side (runner), the child process (bootstrap, stdlib only) and the
fork server (forkserver). Defence in depth, not a security boundary: see `runner`'s docstring."""
