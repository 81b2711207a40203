"""`ForkServer`: forks each sandboxed run's supervisor from one small, already-initialised interpreter.

Used by `loraflow.eval.sandbox.runner.run_sandboxed` (its docstring says what the sandbox enforces); the server side is
`serve()` in `bootstrap.py`. Linux only (file descriptors passed over a Unix socket, /proc to watch children).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from loraflow.errors import LoraflowError

BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/",
              "TMPDIR": "/"}  # the server's own; each child gets its run's (sandbox._clean_env)

FORK_SERVER_SUPPORTED = sys.platform.startswith("linux") and hasattr(socket, "send_fds") and os.path.isdir("/proc")


class ForkServerGone(LoraflowError):
    """The fork server died, stopped answering or did not start; `run_sandboxed` then replaces it and reruns."""


class ForkServer:
    """A `python -I -S bootstrap.py --serve` process that forks each run's supervisor from itself.

    Starting a fresh interpreter and importing what the bootstrap and typical programs need is most of a run's cost
    (~25 ms of ~50 ms); a fork of this small, already-initialised interpreter costs ~1 ms. It is started once per
    evaluator process (scrubbed environment, own session, cwd /), never runs program code, and holds nothing but
    the bootstrap and `PRELOAD`'s stdlib modules. Each forked child gets exactly what a freshly started bootstrap
    gets (new session, stdin /dev/null, its own stdout/stderr pipes, no other file descriptor, the scrubbed
    environment of its run), then runs the same `main()`. Its pid is reported back and it is reaped only when the
    evaluator asks (`reap`), after the group kill, as with a direct child. Thread-safe (one request at a time).
    It lives as long as this process holds the socket, whichever thread started it: it exits on the socket's EOF
    (no PR_SET_PDEATHSIG, which is tied to the starting thread, e.g. a `run_many` pool worker).
    """

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(BOOTSTRAP), "--serve", str(theirs.fileno())], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env=SERVER_ENV,
                pass_fds=(theirs.fileno(),), start_new_session=True)
        finally:
            theirs.close()
        self.sock, self.owner, self.lock, self.broken = ours, os.getpid(), threading.Lock(), False
        ours.settimeout(30.0)
        if self._recv() != b"R":
            self.close()
            raise ForkServerGone("the sandbox's fork server did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.broken and self.owner == os.getpid() and self.proc.poll() is None

    def _recv(self) -> bytes:
        try:
            reply = self.sock.recv(64)
        except OSError:  # a timeout too: a late reply would answer the next request, so this server is done
            reply = b""
        if not reply:
            self.broken = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # the server sees EOF and exits; its children die with it
        return reply

    def spawn(self, fds: tuple[int, int, int]) -> int:
        with self.lock:
            try:
                socket.send_fds(self.sock, [b"F"], list(fds))
            except OSError as e:
                raise ForkServerGone(f"the sandbox's fork server is gone ({e})") from None
            reply = self._recv()
        if not reply.startswith(b"P"):
            raise ForkServerGone("the sandbox's fork server did not fork")
        return int(reply[1:])

    def reap(self, pid: int) -> int | None:
        """The child's exit code (negative: killed by that signal); None if the server died meanwhile."""
        with self.lock:
            try:
                self.sock.send(b"W%d" % pid)
            except OSError:
                return None
            reply = self._recv()
        if not reply.startswith(b"S") or reply == b"S-9999":
            return None
        return int(reply[1:])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.owner == os.getpid():
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SERVER: ForkServer | None = None
_SERVER_LOCK = threading.Lock()


def get_fork_server() -> ForkServer:
    """This process's fork server, started on first use and again if it died (a program may kill it where there
    are no namespaces: it runs as the same user)."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None or not _SERVER.alive():
            if _SERVER is not None:
                _SERVER.close()
            _SERVER = ForkServer()
        return _SERVER


def shutdown_fork_server() -> None:
    """Stop this process's fork server, if any (also done at exit)."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is not None:
            _SERVER.close()
            _SERVER = None


def _forget_server_in_child() -> None:
    """A forked evaluator must not share its parent's server, nor keep its socket open: the server exits when the
    socket reaches EOF, which a child holding a copy would delay past the parent's death."""
    global _SERVER, _SERVER_LOCK
    if _SERVER is not None:
        with contextlib.suppress(OSError):
            _SERVER.sock.close()
    _SERVER, _SERVER_LOCK = None, threading.Lock()


atexit.register(shutdown_fork_server)
os.register_at_fork(after_in_child=_forget_server_in_child)
