"""Run untrusted code (agent-written or a benchmark function) in a confined subprocess.

The boundary is the kernel's: each process runs under bubblewrap with its own namespaces, no
network, a read-only system and a private working folder (``isolation.py``). Inside it, in
depth, each reported when it trips:

- a wall-clock timeout, after which the whole process group is killed (``timeout``);
- ``setrlimit``: address space (``memory``), CPU seconds (``cpu``), processes (when not root,
  since Linux does not apply RLIMIT_NPROC to root), file size, open files, no core dumps;
- an audit hook (``sandbox_child.py``) that refuses sockets, new processes, ctypes, writes
  outside the working folder and reads of the user's home (``blocked``). A hook is not a
  boundary (code can switch it off); it reports honest mistakes early.

``isolation="none"`` (``--sandbox none``) is an explicit opt-out, logged and recorded in the
run's config: the limits and the hook only, in a temporary folder, with a fresh network
namespace and a drop to uid ``nobody`` where root may make them.

``run_code`` runs one job in a fresh process; ``Worker`` keeps one process serving many jobs
(restarted after a crash or a hang), for functions that are slow to start.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import neuroscribe.isolation as isolation
from neuroscribe.runs import opt

CHILD = str(Path(__file__).with_name("sandbox_child.py"))
FENCED = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)
CLONE_NEWNET = 0x40000000
NOBODY = 65534
log = logging.getLogger("neuroscribe")


@dataclass
class SandboxConfig:
    """Limits of the sandbox that runs agent-written code and benchmark functions."""

    timeout: float = opt(10.0, "wall-clock seconds per sandboxed job")
    memory_mb: int = opt(1024, "address-space limit of a sandboxed process in MiB (0: none)")
    cpu_seconds: int = opt(20, "CPU-time limit of a sandboxed process in seconds")
    max_procs: int = opt(32, "process limit (RLIMIT_NPROC; not applied by Linux to root)")
    file_mb: int = opt(16, "largest file a sandboxed process may write, in MiB")
    isolate_network: bool = opt(True, "with isolation none: a new network namespace when "
                                "permitted")
    isolation: str = opt("bwrap", "bwrap (kernel namespaces: the boundary) or none (explicit "
                         "opt-out: resource limits and an audit hook only; not safe)")


@dataclass
class SandboxResult:
    status: str  # ok, error, timeout, memory, cpu, blocked, crashed
    outputs: list[Any] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.lru_cache(maxsize=1)
def _warn_unconfined() -> None:
    log.warning("sandbox none: untrusted code runs without isolation (resource limits and an "
                "audit hook only)")


@functools.lru_cache(maxsize=1)
def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="neuroscribe-sandbox")


def _reachable_by_others(path: str) -> bool:
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & 0o001 for d in [*reversed(p.parents), p.parent])


def drop_uid() -> int | None:
    """``nobody`` when running as root and the interpreter is usable by it, else None."""
    if os.geteuid() != 0:
        return None
    return NOBODY if _reachable_by_others(sys.executable) and _reachable_by_others(CHILD) \
        else None


def _preexec(cfg: SandboxConfig, uid: int | None, cgroup: Path | None = None,
             new_net: bool = True) -> Any:
    import resource

    def limit(kind: int, value: int, slack: int = 0) -> None:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(kind, (value, value + slack))

    def run() -> None:
        os.setsid()
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        if new_net and cfg.isolate_network and os.geteuid() == 0:
            import ctypes

            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)  # best effort
        if cfg.memory_mb:
            limit(resource.RLIMIT_AS, cfg.memory_mb << 20)
        limit(resource.RLIMIT_CPU, cfg.cpu_seconds, 1)  # SIGXCPU first, SIGKILL 1 s later
        limit(resource.RLIMIT_FSIZE, cfg.file_mb << 20)
        limit(resource.RLIMIT_NOFILE, 256)
        limit(resource.RLIMIT_CORE, 0)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        limit(resource.RLIMIT_NPROC, cfg.max_procs)

    return run


def _env(root: str, extra: dict[str, str]) -> dict[str, str]:
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            **threads, **extra}


def _allowed_reads() -> list[str]:
    """Where the interpreter and its packages live: readable even inside the home folder."""
    return sorted({sys.prefix, sys.base_prefix, sys.exec_prefix,
                   *(p for p in sys.path if p and Path(p).is_dir())})


def _died(rc: int, stderr: str, cfg: SandboxConfig) -> tuple[str, str]:
    """The status and reason of a child that gave no answer."""
    if rc == -signal.SIGXCPU:
        return "cpu", f"killed by the CPU limit ({cfg.cpu_seconds} s)"
    if rc == -signal.SIGXFSZ:
        return "blocked", f"killed by the file-size limit ({cfg.file_mb} MiB)"
    tail = stderr.strip().splitlines()[-1:] or [""]
    if "MemoryError" in stderr:
        return "memory", "MemoryError: the memory limit was reached"
    if rc == -signal.SIGKILL:
        return "crashed", "killed by SIGKILL (a hard CPU limit or the kernel's OOM killer)"
    return "crashed", f"the process exited with status {rc}: {tail[0][:200]}"


class Worker:
    """A sandboxed process that serves jobs one after another; ``call`` never raises for what
    the code does (a hang or a crash is a result, and the next call starts a new process)."""

    def __init__(self, cfg: SandboxConfig, extra_env: dict[str, str] | None = None,
                 startup_timeout: float = 0.0, ro_binds: tuple[str, ...] = ()) -> None:
        isolation.check(cfg.isolation)
        if cfg.isolation == "none":
            _warn_unconfined()
        self.cfg, self.extra_env, self.ro_binds = cfg, dict(extra_env or {}), ro_binds
        self.cgroup: Path | None = None
        self.inner_root = ""
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.root = ""
        self.buf = b""
        self.restarts = 0
        self._reaper: weakref.finalize | None = None

    def _start(self) -> None:
        self.root = tempfile.mkdtemp(prefix="neuroscribe-sandbox-")
        if self.cfg.isolation == "bwrap":
            self.inner_root = isolation.WORK
            self.cgroup = isolation.pids_cgroup(os.path.basename(self.root), self.cfg.max_procs)
            argv = isolation.bwrap_argv(CHILD, _env(isolation.WORK, self.extra_env),
                                        self.ro_binds, tmpfs_mb=max(64, 4 * self.cfg.file_mb))
            env, uid = {"PATH": "/usr/bin:/bin"}, None
        else:
            self.inner_root = self.root
            uid = drop_uid()
            if uid is not None:
                os.chown(self.root, uid, uid)
            argv, env = [sys.executable, "-I", CHILD], _env(self.root, self.extra_env)
        # Started from one long-lived thread: bwrap's --die-with-parent follows the thread
        # that forked it, and an executor thread that exits would take the sandbox with it.
        self.proc = _spawner().submit(
            subprocess.Popen, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=self.root, env=env, close_fds=True,
            preexec_fn=_preexec(self.cfg, uid, self.cgroup,  # noqa: PLW1509
                                new_net=self.cfg.isolation == "none")).result()
        self.buf = b""
        # An owner that never calls close (or dies of an exception) still leaves no process
        # and no folder behind: this runs when the Worker is collected or Python exits.
        self._reaper = weakref.finalize(self, _reap, self.proc, self.root, self.cgroup)

    def _read_line(self, deadline: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return b""
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def call(self, code: str, inputs: list[Any], entry: str = "f",
             timeout: float | None = None) -> SandboxResult:
        t0 = time.monotonic()
        first = self.proc is None
        if first:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        job: dict[str, Any] = {"code": code, "entry": entry, "inputs": inputs}
        if first:
            job.update(root=self.inner_root, home=os.path.expanduser("~"),
                       allow=_allowed_reads() + list(self.ro_binds), serve=True,
                       kernel_boundary=self.cfg.isolation == "bwrap")
        wait = (timeout or self.cfg.timeout) + (self.startup_timeout if first else 0.0)
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            line = self._read_line(t0 + wait)
        except (BrokenPipeError, OSError):
            line = b""
        seconds = time.monotonic() - t0
        if line:
            try:
                d = json.loads(line)
                return SandboxResult(d["status"], d.get("outputs", []), d.get("errors", []),
                                     d.get("reason", ""), seconds)
            except (ValueError, KeyError):
                line = b""
        timed_out = line is None
        rc, stderr = self.close()
        if timed_out:
            return SandboxResult("timeout", reason=f"no answer within {wait:g} s (wall clock);"
                                 " the process group was killed", seconds=seconds)
        status, reason = _died(rc, stderr, self.cfg)
        return SandboxResult(status, reason=reason, seconds=seconds)

    def close(self) -> tuple[int, str]:
        """Kill the process group, remove the folder; the exit status and stderr."""
        rc, stderr = 0, ""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            try:
                _, err = self.proc.communicate(timeout=10)
                stderr = err.decode("utf-8", "replace")[-2000:]
            except subprocess.TimeoutExpired:
                pass
            rc = self.proc.returncode if self.proc.returncode is not None else -9
            if self.cfg.isolation == "bwrap" and rc > 128:  # bwrap exits 128 + the signal
                rc = 128 - rc  # that killed the sandboxed process: report it as Popen would
            self.proc, self.restarts = None, self.restarts + 1
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""
        isolation.remove_cgroup(self.cgroup)
        self.cgroup = None
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None
        return rc, stderr

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _reap(proc: subprocess.Popen[bytes], root: str, cgroup: Path | None = None) -> None:
    """What ``Worker.close`` does, for a Worker nobody closed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    shutil.rmtree(root, ignore_errors=True)
    isolation.remove_cgroup(cgroup)


def fenced_code(text: str) -> str | None:
    """The first fenced code block of an LLM reply, stripped (a block cut off by the token
    limit is kept), or None when the reply has none."""
    m = FENCED.search(text)
    return m.group(1).strip() if m else None


def run_code(code: str, inputs: list[Any], cfg: SandboxConfig | None = None,
             entry: str = "f") -> SandboxResult:
    """Run ``code``'s ``entry`` on each input in a fresh sandboxed process."""
    with Worker(cfg or SandboxConfig()) as w:
        return w.call(code, inputs, entry)
