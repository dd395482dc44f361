"""The sandbox's boundary in the kernel: bubblewrap (``bwrap``) namespaces, and a pids cgroup.

Each sandboxed process starts under ``bwrap`` with new user, PID, IPC, UTS, cgroup and network
namespaces (no network at all, not even loopback), an unprivileged uid inside (65534, with
every capability dropped), a read-only view of the system (``/usr``, the libraries, a few
files of ``/etc``) and of the Python installation, a private tmpfs as its working folder,
nothing of the user's home or the run folder except the read-only binds a job names, and
``--die-with-parent``: when the process that started it dies, so does everything inside.

Linux does not apply RLIMIT_NPROC to root, so when neuroscribe runs as root and the cgroup v1
``pids`` controller is writable, each sandbox also gets a pids cgroup of its own.

A machine without ``bwrap`` or without user namespaces refuses to run untrusted code, with the
way to install it; ``--sandbox none`` is the explicit opt-out (the audit hook and resource
limits only, which are not a boundary).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from neuroscribe.errors import UserError

WORK = "/sandbox"  # the private tmpfs, the job's working folder
CHILD_INSIDE = "/opt/neuroscribe/sandbox_child.py"
INSIDE_UID = 65534
ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives", "nsswitch.conf",
       "passwd", "group")
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
PIDS_ROOT = Path("/sys/fs/cgroup/pids")
INSTALL = ("bubblewrap is not installed: install it (Debian/Ubuntu: apt-get install bubblewrap; "
           "Fedora: dnf install bubblewrap), or pass --sandbox none to run untrusted code "
           "without isolation (not safe)")
ISOLATIONS = ("bwrap", "none")


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str:
    """Why bwrap cannot isolate here ('' when it can): not Linux, not installed, or user
    namespaces disabled."""
    if not sys.platform.startswith("linux"):
        return (f"the sandbox needs Linux namespaces (bubblewrap); {sys.platform} has none. Run "
                "on Linux, or pass --sandbox none to run untrusted code without isolation "
                "(not safe)")
    exe = shutil.which("bwrap")
    if exe is None:
        return INSTALL
    try:
        r = subprocess.run([exe, "--unshare-all", "--ro-bind", "/", "/", "true"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed to start ({e})"
    if r.returncode != 0:
        return (f"bwrap cannot create namespaces here ({r.stderr.strip()[:200]}): enable "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1), or "
                "pass --sandbox none to run untrusted code without isolation (not safe)")
    return ""


def check(isolation: str) -> None:
    """Refuse an unknown isolation, or bwrap where it cannot work."""
    if isolation not in ISOLATIONS:
        raise UserError(f"unknown --sandbox {isolation!r}; have {list(ISOLATIONS)}")
    if isolation == "bwrap" and (problem := bwrap_problem()):
        raise UserError(f"cannot sandbox untrusted code: {problem}")


def python_paths() -> list[str]:
    """The interpreter's installation and its package folders, outermost first."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths |= {os.path.realpath(p) for p in sys.path if p and Path(p).is_dir()}
    paths.discard(os.path.realpath(os.getcwd()))  # '' on sys.path: the caller's folder
    out: list[str] = []
    for p in sorted(paths, key=len):
        if not any(p == q or p.startswith(q + os.sep) for q in out):
            out.append(p)
    return out


def bwrap_argv(child: str, env: dict[str, str], ro_binds: Sequence[str] = (),
               tmpfs_mb: int = 256) -> list[str]:
    """The ``bwrap`` command that runs ``python -I child`` confined."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-user", "--unshare-pid",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--unshare-net",
            "--die-with-parent", "--new-session", "--uid", str(INSIDE_UID),
            "--gid", str(INSIDE_UID), "--hostname", "sandbox", "--cap-drop", "ALL"]
    for d in SYSTEM:
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for name in ETC:
        if os.path.exists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmpfs_mb << 20),
             "--tmpfs", "/tmp", "--size", str(tmpfs_mb << 20), "--tmpfs", WORK]
    for p in [*python_paths(), *ro_binds]:  # after the tmpfs mounts, which would hide them
        argv += ["--ro-bind", p, p]
    argv += ["--ro-bind", child, CHILD_INSIDE, "--chdir", WORK, "--clearenv"]
    for k, v in env.items():
        argv += ["--setenv", k, v]
    return [*argv, "--", sys.executable, "-I", CHILD_INSIDE]


def pids_cgroup(name: str, max_procs: int) -> Path | None:
    """A pids cgroup limited to ``max_procs`` (root only, cgroup v1 pids controller); None
    where it cannot be made. Its name starts with this process's pid, so that cgroups left
    by a killed parent are found (their pid is gone) and another live process's, still
    empty between ``mkdir`` and its child joining, are left alone."""
    if os.geteuid() != 0 or not (PIDS_ROOT / "cgroup.procs").exists():
        return None
    path = PIDS_ROOT / "neuroscribe" / f"{os.getpid()}-{name}"
    for stale in (PIDS_ROOT / "neuroscribe").glob("*"):
        if stale.is_dir() and not _owner_alive(stale.name):
            with contextlib.suppress(OSError):  # a cgroup with processes is not removed
                stale.rmdir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "pids.max").write_text(str(max_procs))
    except OSError:
        return None
    return path


def _owner_alive(cgroup_name: str) -> bool:
    """Whether the process that made the cgroup ``<pid>-...`` still runs (names in the old
    form, without a pid, count as stale)."""
    head = cgroup_name.split("-", 1)[0]
    if not head.isdigit():
        return False
    try:
        os.kill(int(head), 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_cgroup(path: Path | None, wait: float = 5.0) -> None:
    """Kill whatever is left in the cgroup, then remove it (a cgroup with processes cannot
    be removed, and the kernel reaps a dying namespace asynchronously)."""
    if path is None:
        return
    deadline = time.monotonic() + wait
    while True:
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            path.rmdir()
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
