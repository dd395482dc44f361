"""The sandbox's boundary is the kernel's (bubblewrap namespaces), not the audit hook: code
that switches the hook off is still contained."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

import neuroscribe.isolation as isolation
from neuroscribe.errors import UserError
from neuroscribe.sandbox import SandboxConfig, Worker, run_code

pytestmark = pytest.mark.skipif(bool(isolation.bwrap_problem()),
                                reason=f"no kernel sandbox here: {isolation.bwrap_problem()}")
CFG = SandboxConfig(timeout=10.0, cpu_seconds=5, memory_mb=1024)

# Reach the child's module globals and switch the audit hook off: its block lists emptied,
# its path check replaced, and realpath lied to so that no path looks like the home folder.
DISARM = """
import os, sys
m = sys.modules["__main__"]
m.BLOCKED.clear(); m.BLOCKED_IMPORTS.clear(); m.PATH_WRITE.clear(); m.PATH_LIST.clear()
m._inside = lambda path, root: True
os.path.realpath = lambda p, *a, **k: "/nowhere"
"""

ATTACK = DISARM + """
def attempt(fn):
    try:
        return "done: " + repr(fn())
    except BaseException as e:
        return "failed: " + type(e).__name__

def f(x):
    import ctypes, socket
    out = {}
    def write():
        with open(x["outside"], "w") as fh:
            fh.write("pwned")
    out["write"] = attempt(write)
    out["home"] = attempt(lambda: open(x["home_file"]).read())
    def connect():
        s = socket.create_connection(("127.0.0.1", x["port"]), timeout=3)
        s.sendall(b"pwned")
        return "connected"
    out["net"] = attempt(connect)
    libc = ctypes.CDLL(None)
    out["libc_getpid"] = libc.getpid()
    out["uid"] = os.getuid()
    return [[k, v] for k, v in out.items()]  # a dict would come back as its repr
"""


class Listener:
    """A TCP listener on 127.0.0.1 that records every connection it gets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                self.seen.append(conn.recv(100) or b"<connected>")
            except OSError:
                self.seen.append(b"<connected>")
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def planted(tmp_path: Path):  # type: ignore[no-untyped-def]
    home_file = Path.home() / f".neuroscribe-sandbox-test-{uuid.uuid4().hex}"
    home_file.write_text("a secret in the home folder")
    listener = Listener()
    yield {"outside": str(tmp_path / "outside.txt"), "home_file": str(home_file),
           "port": listener.port}, listener
    home_file.unlink()
    listener.close()


def test_the_attack_is_contained_once_the_hook_is_off(planted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job, listener = planted
    r = run_code(ATTACK, [job], CFG)
    assert r.ok, r.reason
    out = dict(r.outputs[0])
    assert out["write"].startswith("failed") and not (tmp_path / "outside.txt").exists()
    assert out["home"].startswith("failed")
    assert out["net"].startswith("failed")
    assert out["libc_getpid"] < 10  # ctypes ran, inside a PID namespace of its own
    assert out["uid"] == isolation.INSIDE_UID
    time.sleep(0.5)
    assert listener.seen == []


def test_the_same_attack_succeeds_without_the_boundary(planted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The instrument check: with --sandbox none (the audit hook only) the attack gets out,
    so the test above would fail on a sandbox that relies on the hook."""
    job, listener = planted
    r = run_code(ATTACK, [job], SandboxConfig(timeout=10.0, isolation="none",
                                              isolate_network=False))
    assert r.ok, r.reason
    assert (tmp_path / "outside.txt").read_text() == "pwned"
    assert dict(r.outputs[0])["home"].startswith("done")
    time.sleep(0.5)
    assert listener.seen == [b"pwned"]


@pytest.mark.parametrize("name,body,statuses", [
    ("fork bomb", "    while True:\n        os.fork()", {"ok", "crashed", "timeout", "cpu"}),
    ("10 GB", "    return len(bytearray(10 * 2**30))", {"memory"}),
    ("infinite loop", "    while True:\n        pass", {"cpu", "timeout"}),
])
def test_resource_attacks_with_the_hook_off(name: str, body: str, statuses: set[str]) -> None:
    code = DISARM + "def f(x):\n" + body
    t0 = time.monotonic()
    r = run_code(code, [0], SandboxConfig(timeout=8.0, cpu_seconds=2, max_procs=32))
    assert r.status in statuses, (name, r)
    assert time.monotonic() - t0 < 30
    assert run_code("def f(x):\n    return x + 1", [1], CFG).outputs == [2]


def test_the_process_limit_holds_with_the_hook_off() -> None:
    """Children that stay alive: forking stops at the limit (a pids cgroup as root, where
    Linux ignores RLIMIT_NPROC; RLIMIT_NPROC otherwise), not at the machine's pid_max."""
    code = DISARM + textwrap.dedent("""
        import time
        def f(x):
            n = 0
            while n < 1000:
                try:
                    pid = os.fork()
                except OSError as e:
                    return [n, type(e).__name__]
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
            return [n, "no limit"]
        """)
    r = run_code(code, [0], SandboxConfig(timeout=20.0, cpu_seconds=5, max_procs=16))
    assert r.ok, r.reason
    n, why = r.outputs[0]
    assert n < 16 and why == "BlockingIOError", r.outputs


def test_privilege_and_proc_writes_are_refused() -> None:
    code = DISARM + textwrap.dedent("""
        def write(path, text):
            with open(path, "w") as fh:  # closed here, so a refused write raises here
                fh.write(text)

        def f(x):
            out = []
            for act in (lambda: os.setuid(0),
                        lambda: write("/proc/sys/kernel/hostname", "pwned"),
                        lambda: write("/proc/self/oom_score_adj", "-1000"),
                        lambda: write("/usr/pwned", "x")):
                try:
                    act()
                    out.append("done")
                except OSError as e:
                    out.append(type(e).__name__)
            return out
        """)
    host = socket.gethostname()
    r = run_code(code, [0], CFG)
    assert r.ok, r.reason
    setuid, hostname, oom, usr = r.outputs[0]
    assert "done" not in (setuid, oom, usr) and hostname == "done", r.outputs
    assert socket.gethostname() == host  # the sandbox renamed only its own UTS namespace
    assert not Path("/usr/pwned").exists()


def test_numpy_and_scipy_import_and_answer_right() -> None:
    code = ("import numpy as np\nimport scipy.signal\n"
            "def f(x):\n    return float(scipy.signal.square(np.array([x]))[0] + np.sin(x))")
    r = run_code(code, [0.5, 4.0], CFG)
    import math

    assert r.ok, r.reason
    assert r.outputs == pytest.approx([1 + math.sin(0.5), -1 + math.sin(4.0)])


def test_killing_the_parent_leaves_no_sandbox_process(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys, threading
        from neuroscribe.sandbox import SandboxConfig, Worker
        w = Worker(SandboxConfig(timeout=120))
        w.call("def f(x):\\n    return 0", [0])
        print(w.proc.pid, flush=True)
        w.call("import time\\ndef f(x):\\n    time.sleep(120)", [0])
        """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    bwrap_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    inside = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ancestor(int(p), bwrap_pid)]
    assert inside  # the sandboxed python runs
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in [bwrap_pid, *inside]):
        time.sleep(0.1)
    assert not any(_alive(p) for p in [bwrap_pid, *inside])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ancestor(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def test_a_missing_bwrap_is_refused_with_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    isolation.bwrap_problem.cache_clear()
    try:
        with pytest.raises(UserError, match="apt-get install bubblewrap.*--sandbox none"):
            Worker(SandboxConfig())
        with pytest.raises(UserError, match="unknown --sandbox 'docker'"):
            Worker(SandboxConfig(isolation="docker"))
        Worker(SandboxConfig(isolation="none")).close()  # the explicit opt-out still runs
    finally:
        isolation.bwrap_problem.cache_clear()


def test_other_platforms_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    isolation.bwrap_problem.cache_clear()
    try:
        with pytest.raises(UserError, match="darwin has none"):
            isolation.check("bwrap")
    finally:
        isolation.bwrap_problem.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0 or not (isolation.PIDS_ROOT / "cgroup.procs").exists(),
                    reason="pids cgroups need root and cgroup v1's pids controller")
def test_a_new_cgroup_leaves_another_live_process_s_empty_cgroup_alone() -> None:
    """Two bench-find processes: B's new worker used to remove A's cgroup while it was
    still empty (made, child not yet in it), and A's child then failed in preexec_fn."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = isolation.pids_cgroup(f"t-{uuid.uuid4().hex[:8]}", 8)
        assert mine is not None
        live = mine.parent / f"{other.pid}-neuroscribe-sandbox-live"
        dead = mine.parent / "999999999-neuroscribe-sandbox-dead"
        old = mine.parent / "neuroscribe-sandbox-oldform"
        for d in (live, dead, old):
            d.mkdir()
        again = isolation.pids_cgroup(f"t-{uuid.uuid4().hex[:8]}", 8)
        assert mine.is_dir() and live.is_dir()  # this process and `other` are alive
        assert not dead.exists() and not old.exists()  # their makers are gone
        for d in (mine, live, again):
            isolation.remove_cgroup(d)
    finally:
        other.kill()
        other.wait()
