"""The sandbox: hostile programs are contained and scored as fails, the evaluator survives, nothing is left behind.

Where a guarantee depends on the kernel (namespaces, read-only filesystem), the test asks the sandbox what it
enforced for that run and skips, saying so, where it could not be enforced; everything else holds everywhere.
"""

from __future__ import annotations

import os
import socket
import textwrap

import pytest

from loraflow.errors import LoraflowError
from loraflow.eval.sandbox import forkserver
from loraflow.eval.sandbox.forkserver import shutdown_fork_server
from loraflow.eval.sandbox.runner import (
    SandboxLimits,
    check_program,
    group_members,
    run_many,
    run_sandboxed,
)


def run(program: str, timeout: float = 2.0, fork_server: bool = True, **limits) -> dict:
    outcome = run_sandboxed(textwrap.dedent(program), timeout, allow_code_execution=True,
                            limits=SandboxLimits(grace=0.5, **limits), fork_server=fork_server)
    assert group_members(outcome["pid"]) == [], "processes of the run are still alive"
    return outcome


GOOD = """
def add(a, b):
    return a + b

def check(candidate):
    assert candidate(2, 3) == 5

check(add)
"""


def test_code_execution_needs_opt_in():
    for call in (lambda: run_sandboxed("pass"), lambda: run_many(["pass"]), lambda: check_program("pass")):
        with pytest.raises(LoraflowError, match="--allow-code-execution"):
            call()


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "fresh-interpreter"])
def test_pass_and_fail(fork_server):
    assert run(GOOD, fork_server=fork_server)["status"] == "passed"
    bad = run(GOOD.replace("a + b", "a - b"), fork_server=fork_server)
    assert bad["status"] == "failed" and bad["detail"] == "failed: AssertionError"
    assert run("def f(:\n", fork_server=fork_server)["detail"].startswith("failed: SyntaxError")
    result = check_program(GOOD, 2.0, allow_code_execution=True)
    assert result["passed"] is True and result["result"] == "passed"


def test_run_many_keeps_order():
    programs = [GOOD, "assert False", GOOD, "raise ValueError('x')"]
    outcomes = run_many(programs, 2.0, workers=2, allow_code_execution=True)
    assert [o["status"] for o in outcomes] == ["passed", "failed", "passed", "failed"]
    assert outcomes[3]["detail"] == "failed: ValueError: x"


# name -> (program, expected status, expected start of the detail). Every one must leave no process behind.
HOSTILE = {
    "infinite loop": ("while True:\n    pass\n", "timed out", "timed out"),
    "ignores SIGALRM": ("import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n",
                        "timed out", "timed out: still running"),
    "sleeps in C": ("import time\ntime.sleep(60)\n", "timed out", "timed out"),
    "huge allocation": ("x = bytearray(64 * 1024 ** 3)\n", "failed", "failed: MemoryError"),
    "exit(0) before the asserts": ("import sys\nsys.exit(0)\n" + GOOD, "failed", "failed: SystemExit"),
    "os._exit(0) before the asserts": ("import os\nos._exit(0)\n" + GOOD, "failed", "failed: exited with status 0"),
    "exit(0) inside check": (GOOD.replace("assert candidate", "import os; os._exit(0)\n    assert candidate"),
                             "failed", "failed"),
    "patched AssertionError": ("import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
                               + GOOD.replace("a + b", "a - b"), "failed", "failed: AssertionError"),
    "completion defines check": ("def check(candidate):\n    pass\n" + GOOD.replace("a + b", "a - b"),
                                 "failed", "failed: AssertionError"),
    "patched print and stdout, right solution": ("import builtins, io, sys\nbuiltins.print = lambda *a, **k: None\n"
                                                 "sys.stdout = sys.__stdout__ = io.StringIO()\n" + GOOD,
                                                 "passed", "passed"),
    "forged sentinel": ("""
        import os, sys
        found = []
        for fd in range(3, 64):
            try:
                os.set_blocking(fd, False)
                found.append(os.read(fd, 1 << 16))
            except OSError:
                pass
        for path in ("/proc/self/cmdline", "/proc/self/environ", f"/proc/{os.getppid()}/cmdline"):
            try:
                found.append(open(path, "rb").read())
            except OSError:
                pass
        for blob in found:
            for fd in (1, 2) + tuple(range(3, 64)):
                try:
                    os.write(fd, blob + b":passed\\n")
                except OSError:
                    pass
        print(":passed")
        sys.stdout.flush()
        os._exit(0)
        """, "failed", "failed: exited with status 0"),
    # As root the program runs as uid 65534 and cannot signal the supervisor: it then sleeps into the timeout.
    "kills its parent": ("import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(5)\n" + GOOD,
                         ("failed", "timed out"), ("failed: killed by SIGKILL", "timed out")),
    "100 MB of output": ("import sys\nsys.stdout.write('x' * 100_000_000)\n", "failed", "failed: output limit"),
    "100 MB file": ("open('big', 'wb').write(b'x' * 100_000_000)\n", "failed", "failed"),
    "fork bomb": ("""
        import os, time
        for _ in range(8):  # up to 256 processes without a limit; each one outlives the timeout
            try:
                os.fork()
            except OSError:
                pass
        time.sleep(30)
        """, "timed out", "timed out"),
    "thread outlives the run": (textwrap.dedent("""
        import threading, time
        def spin():
            while True:
                time.sleep(0.01)
        threading.Thread(target=spin).start()
        """) + GOOD, "passed", "passed"),
    "daemon thread outlives the timeout": (textwrap.dedent("""
        import os, threading, time
        def later():
            time.sleep(5)  # past the timeout: the run must be over (and its processes gone) by then
            print(":passed")
            os._exit(0)
        threading.Thread(target=later, daemon=True).start()
        """) + GOOD.replace("a + b", "a - b"), "failed", "failed: AssertionError"),
}


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "fresh-interpreter"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(name, fork_server):
    program, status, detail = HOSTILE[name]
    outcome = run(program, timeout=1.5, fork_server=fork_server)
    assert outcome["status"] in ((status,) if isinstance(status, str) else status), outcome
    assert outcome["detail"].startswith(detail), outcome


def _processes_with(marker: bytes) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker in f.read():
                    found.append(int(name))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to look for survivors")
def test_process_that_leaves_the_group_dies_with_the_run():
    """A child that calls setsid() escapes the process-group kill; a PID namespace still takes it down."""
    marker = f"{os.getpid() % 1000 + 30}.{os.urandom(3).hex().translate(str.maketrans('abcdef', '123456'))}"
    outcome = run(textwrap.dedent(f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            os.execv("/bin/sleep", ["sleep", "{marker}"])
        time.sleep(0.5)
        """) + GOOD)
    survivors = _processes_with(b"sleep\0" + marker.encode())
    for pid in survivors:  # clean up before asserting anything
        os.kill(pid, 9)
    if "pid" not in outcome["isolation"]:
        pytest.skip("no PID namespace here: a process that calls setsid() can outlive the run (documented)")
    assert outcome["status"] == "passed", outcome
    assert survivors == []


def test_memory_grows_until_the_limit():
    outcome = run("blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n", timeout=5,
                  memory_bytes=256 << 20)
    assert outcome["status"] == "failed" and outcome["detail"] == "failed: MemoryError"


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "fresh-interpreter"])
def test_environment_is_scrubbed(monkeypatch, fork_server):
    secret = "do-not-leak-" + os.urandom(8).hex()
    monkeypatch.setenv("LORAFLOW_TEST_SECRET", secret)
    shutdown_fork_server()  # a server started now sees the secret in the evaluator's environment
    outcome = run("""
        import os
        print(dict(os.environ))
        for path in ("/proc/self/environ", f"/proc/{os.getppid()}/environ", "/proc/1/environ"):
            try:
                print(open(path, "rb").read())
            except OSError:
                pass
        assert "LORAFLOW_TEST_SECRET" not in os.environ
        assert set(os.environ) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}
        assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd() != "/"  # this run's temp dir
        assert sorted(int(fd) for fd in os.listdir("/proc/self/fd")) == [0, 1, 2, 3, 4, 5]  # + 2 dups, listdir
        """, fork_server=fork_server)
    assert outcome["status"] == "passed", outcome
    assert secret not in outcome["stdout"] + outcome["stderr"]


def test_files_outside_the_temp_dir_are_protected(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("intact")
    outcome = run(f"""
        import os, shutil
        for attempt in (lambda: open({str(canary)!r}, "w").write("pwned"), lambda: os.remove({str(canary)!r}),
                        lambda: shutil.rmtree({str(tmp_path)!r}), lambda: open({str(tmp_path / "new")!r}, "w")):
            try:
                attempt()
            except OSError:
                pass
        open("inside.txt", "w").write("the temp dir is writable")
        print(os.getcwd())
        """)
    assert outcome["status"] == "passed", outcome
    assert not os.path.exists(outcome["stdout"].strip()), "the run's temp dir was not removed"
    if "readonly-fs" not in outcome["isolation"]:
        pytest.skip("no mount namespace here: the program could write wherever the user can (documented)")
    assert canary.read_text() == "intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        port = server.getsockname()[1]
        outcome = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    finally:
        server.close()
    if "net" not in outcome["isolation"]:
        pytest.skip("no network namespace here: the program has the user's network (documented)")
    assert outcome["status"] == "failed" and "OSError" in outcome["detail"]


def test_cannot_signal_outside_processes():
    """In a PID namespace the evaluator is invisible: the program's kill of it fails."""
    outcome = run(f"""
        import os, signal
        try:
            os.kill({os.getpid()}, 0)
            visible = True
        except ProcessLookupError:
            visible = False
        assert not visible
        """)
    if "pid" not in outcome["isolation"]:
        pytest.skip("no PID namespace here: the program can signal the user's processes (documented)")
    assert outcome["status"] == "passed", outcome


def test_fork_server_is_reused_restarted_when_killed_and_optional():
    shutdown_fork_server()
    assert run(GOOD, fork_server=False)["status"] == "passed" and forkserver._SERVER is None
    assert run(GOOD)["status"] == "passed"
    server = forkserver._SERVER
    assert server is not None and server.alive()
    assert run(GOOD)["status"] == "passed" and forkserver._SERVER is server  # one server for many runs
    os.kill(server.pid, 9)
    server.proc.wait()
    assert run(GOOD)["status"] == "passed"  # a new one
    assert forkserver._SERVER is not server and forkserver._SERVER.alive()


def _wait_for_a_run(server_before=None):
    """The fork server once it has a supervisor running (a new server if `server_before` is given)."""
    import threading

    for _ in range(400):
        server = forkserver._SERVER
        if server is not None and server is not server_before and _children(server.pid):
            return server
        threading.Event().wait(0.025)
    raise AssertionError("no run started")


def test_a_server_killed_mid_run_is_replaced_and_the_program_rerun():
    import threading

    result = {}
    program = "import time\ntime.sleep(1)\n" + GOOD
    worker = threading.Thread(target=lambda: result.update(run(program, timeout=10)))
    worker.start()
    server = _wait_for_a_run()
    os.kill(server.pid, 9)
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert result["status"] == "passed", result  # rerun on a new server, not "failed"
    assert forkserver._SERVER is not server and forkserver._SERVER.alive()


def test_run_many_survives_a_server_killed_while_it_runs():
    import threading

    shutdown_fork_server()
    outcomes = []
    programs = ["import time\ntime.sleep(0.3)\n" + GOOD] * 6
    worker = threading.Thread(target=lambda: outcomes.extend(run_many(programs, 10, workers=2,
                                                                      allow_code_execution=True)))
    worker.start()
    os.kill(_wait_for_a_run().pid, 9)
    worker.join(timeout=60)
    assert [o["status"] for o in outcomes] == ["passed"] * 6, outcomes


def test_fifty_run_many_calls_in_one_process_all_pass_on_one_server():
    """The server outlives the pool thread that started it (PR_SET_PDEATHSIG would tie it to that thread)."""
    shutdown_fork_server()
    servers = set()
    for _ in range(50):
        outcomes = run_many([GOOD, GOOD], 5, workers=2, allow_code_execution=True)
        assert [o["status"] for o in outcomes] == ["passed", "passed"], outcomes
        servers.add(id(forkserver._SERVER))
    assert len(servers) == 1 and forkserver._SERVER.alive()


def test_a_server_that_keeps_failing_falls_back_to_a_fresh_interpreter(monkeypatch):
    calls = []

    def gone(self, fds):
        calls.append(fds)
        raise forkserver.ForkServerGone("the sandbox's fork server is gone (test)")

    monkeypatch.setattr(forkserver.ForkServer, "spawn", gone)
    outcome = run(GOOD)
    assert outcome["status"] == "passed", outcome
    from loraflow.eval.sandbox.runner import SERVER_ATTEMPTS

    assert len(calls) == SERVER_ATTEMPTS


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_a_server_that_does_not_answer_in_time_is_replaced():
    """A reply that timed out would answer the next request: the server is marked broken, a new one started and
    the program rerun on it (here: it times out, its true verdict)."""
    import threading

    shutdown_fork_server()
    result = {}
    worker = threading.Thread(target=lambda: result.update(run("import time\ntime.sleep(20)\n", timeout=1.5)))
    worker.start()
    server = _wait_for_a_run()
    child = _children(server.pid)
    server.sock.settimeout(0.2)
    assert server.reap(child[0]) is None  # the child still runs: no reply in time
    assert not server.alive()
    worker.join(timeout=20)
    assert result["status"] == "timed out", result
    assert run(GOOD)["status"] == "passed" and forkserver._SERVER is not server


# ---------------------------------------------------------------------------- the evaluator's files, forgery

@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "fresh-interpreter"])
def test_the_evaluators_files_cannot_be_read(tmp_path, monkeypatch, fork_server):
    """A 0600 token in $HOME, a world-readable file there, the predictions file in the working directory and the
    evaluator's /proc environ: every read fails, and the program's own home and working directory are empty."""
    home, work = tmp_path / "home", tmp_path / "work"
    (home / ".cache" / "huggingface").mkdir(parents=True)
    token = home / ".cache" / "huggingface" / "token"
    token.write_text("hf_secret")
    token.chmod(0o600)
    (home / "notes.txt").write_text("public but private")
    work.mkdir()
    predictions = work / "predictions.jsonl"
    predictions.write_text('{"id": "x", "generation": "..."}\n')
    predictions.chmod(0o644)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LORAFLOW_TEST_SECRET", "x")
    monkeypatch.chdir(work)
    shutdown_fork_server()
    outcome = run(f"""
        import os
        readable = []
        for path in ({str(token)!r}, {str(home / "notes.txt")!r}, {str(predictions)!r}, "predictions.jsonl",
                     "/proc/{os.getpid()}/environ"):
            try:
                with open(path, "rb") as f:
                    f.read()
                readable.append(path)
            except OSError:
                pass
        assert readable == [], readable
        assert os.listdir(os.environ["HOME"]) == [] and os.listdir(".") == []
        for folder in ({str(home)!r}, {str(work)!r}):
            assert not os.path.exists(folder) or os.listdir(folder) == [], folder
        """, fork_server=fork_server)
    if "hidden-files" not in outcome["isolation"]:
        pytest.skip("no mount namespace here: programs can read what the user can (documented)")
    assert outcome["status"] == "passed", outcome
    if os.geteuid() == 0:
        assert "unprivileged-uid" in outcome["isolation"]


def test_hide_also_covers_the_folders_passed_in(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dev.jsonl").write_text("{}\n")
    program = f"import os\nassert not os.path.exists({str(data / 'dev.jsonl')!r})\n"
    as_root = SandboxLimits(run_as=None)  # so that only hiding, not the uid, keeps the file from the program
    outcome = run_sandboxed(program, 5, allow_code_execution=True, limits=as_root, hide=[data])
    if "hidden-files" not in outcome["isolation"]:
        pytest.skip("no mount namespace here (documented)")
    assert outcome["status"] == "passed", outcome
    assert run_sandboxed(program, 5, allow_code_execution=True, limits=as_root)["status"] == "failed"  # visible


FORGERIES = {
    "the runner's frame locals": """
        import os, sys
        frame = sys._getframe(1)
        while frame is not None:
            for value in list(frame.f_locals.values()):
                for item in (value if isinstance(value, (tuple, list)) else (value,)):
                    if isinstance(item, bytes) and item.endswith(b":passed\\n"):
                        os.write(1, item)
                    if isinstance(item, str) and len(item) == 32:
                        os.write(1, f"\\n{item}:passed\\n".encode())
            frame = frame.f_back
        os._exit(0)
        """,
    "every object the gc knows": """
        import gc, os, sys
        for obj in gc.get_objects() + gc.get_referents(sys._getframe(1)):
            for item in gc.get_referents(obj) + [obj]:
                if isinstance(item, bytes) and item.endswith(b":passed\\n"):
                    os.write(1, item)
        os._exit(0)
        """,
    "the descriptors and /proc": """
        import os
        found = []
        for fd in range(3, 256):
            try:
                os.set_blocking(fd, False)
                found.append(os.read(fd, 4096))
            except OSError:
                pass
        for blob in found:
            os.write(1, blob)
        os._exit(0)
        """,
}


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "fresh-interpreter"])
@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_pass_cannot_be_forged_from_what_the_program_can_reach(name, fork_server):
    """The pass line is never referenced by a frame, an object or a descriptor while program code runs."""
    outcome = run(textwrap.dedent(FORGERIES[name]) + GOOD.replace("a + b", "a - b"), fork_server=fork_server)
    assert outcome["status"] == "failed" and outcome["detail"].startswith("failed: exited with status 0"), outcome
