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
    "kills its parent": ("import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(5)\n" + GOOD,
                         "failed", "failed: killed by SIGKILL"),
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
    assert outcome["status"] == status, outcome
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


def test_run_fails_cleanly_when_the_fork_server_dies_during_it():
    import threading

    result = {}
    worker = threading.Thread(target=lambda: result.update(run("import time\ntime.sleep(20)\n" + GOOD, timeout=30)))
    worker.start()
    server = None
    for _ in range(200):  # wait until the run has started
        server = forkserver._SERVER
        if server is not None and any(group_members(pid) for pid in _children(server.pid)):
            break
        threading.Event().wait(0.05)
    os.kill(server.pid, 9)
    worker.join(timeout=20)
    assert not worker.is_alive()
    assert result["status"] == "failed" and "fork server was lost" in result["detail"], result


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_a_server_that_does_not_answer_in_time_is_replaced():
    """A reply that timed out would answer the next request: the server is marked broken and a new one started."""
    import threading

    shutdown_fork_server()
    result = {}
    worker = threading.Thread(target=lambda: result.update(run("import time\ntime.sleep(20)\n", timeout=1.5)))
    worker.start()
    server, child = None, []
    for _ in range(200):
        server = forkserver._SERVER
        child = _children(server.pid) if server is not None else []
        if child:
            break
        threading.Event().wait(0.05)
    server.sock.settimeout(0.2)
    assert server.reap(child[0]) is None  # the child still runs: no reply in time
    assert not server.alive()
    worker.join(timeout=20)
    assert result["status"] == "failed" and "fork server was lost" in result["detail"], result
    assert run(GOOD)["status"] == "passed" and forkserver._SERVER is not server
