"""The process side of the sandbox: runs as ``python -I sandbox_child.py`` (standard library
only, never imported by the parent).

It reads one JSON job from stdin, installs an audit hook that confines the job (writes and
deletes only inside its temporary folder, no reads of the user's home, no sockets, no new
processes, no ctypes), then runs the job's code and writes one JSON line to stdout.

Job: ``{"code", "entry", "inputs", "root", "home", "allow": [...], "serve": bool,
"kernel_boundary": bool}``. The entry
function is called once per input; an input that raises gives ``null`` and its error. With
``serve`` it keeps reading ``{"code", "entry", "inputs"}`` lines and answers each one, so a
slow-to-start function (e.g. one that loads an embedding model) starts once.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from typing import Any

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BLOCKED = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
           "subprocess.Popen", "os.kill", "os.killpg", "socket.__new__", "socket.connect",
           "socket.bind", "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym",
           "ctypes.cdata", "ctypes.call_function", "os.chroot",
           "sys.remote_exec"}
PATH_WRITE = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown",
              "os.truncate", "os.symlink", "os.link", "os.utime", "shutil.rmtree",
              "shutil.copyfile", "shutil.move", "os.chflags", "os.setxattr", "os.removexattr"}
PATH_LIST = {"os.listdir", "os.scandir", "glob.glob", "os.walk", "os.fwalk"}
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "pty", "socket", "_socket",
                   "multiprocessing"}


class Blocked(PermissionError):
    """The sandbox refused an operation."""


class BlockedImport(ImportError):
    """The sandbox refused an import (an ImportError, so optional imports degrade)."""


def _inside(path: Any, root: str) -> bool:
    if isinstance(path, int) or path is None:
        return True  # an already-open descriptor: its open was checked
    p = os.path.realpath(os.fsdecode(path))
    return p == root or p.startswith(root + os.sep)


def make_hook(root: str, home: str, allow: list[str]) -> Any:
    def denied_read(path: Any) -> bool:
        if isinstance(path, int) or path is None or not home:
            return False
        p = os.path.realpath(os.fsdecode(path))
        if not (p == home or p.startswith(home + os.sep)):
            return False
        return not any(p == a or p.startswith(a + os.sep) for a in allow + [root])

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in BLOCKED:
            raise Blocked(f"sandbox: {event} is not allowed")
        if event == "import" and args and str(args[0]).split(".")[0] in BLOCKED_IMPORTS:
            raise BlockedImport(f"sandbox: import of {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS and mode is None)
            if writes and not (_inside(path, root) or path == "/dev/null"):
                raise Blocked(f"sandbox: writing {path} (outside its folder) is not allowed")
            if denied_read(path):
                raise Blocked(f"sandbox: reading {path} (the user's home) is not allowed")
        elif event in PATH_WRITE:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not _inside(path, root):
                    raise Blocked(f"sandbox: {event} on {os.fsdecode(path)} (outside its "
                                  "folder) is not allowed")
        elif event in PATH_LIST and args and denied_read(args[0]):
            raise Blocked(f"sandbox: listing {args[0]} (the user's home) is not allowed")

    return hook


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item"):  # numpy scalars
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def run_job(job: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Compile the code (cached per text), call the entry on each input."""
    out = io.StringIO()
    real_stdout, sys.stdout = sys.stdout, out
    try:
        key = job["code"]
        if key not in env["_compiled"]:
            ns: dict[str, Any] = {"__name__": "__sandbox__", **env["helpers"]}
            exec(compile(job["code"], "<sandboxed>", "exec"), ns)  # noqa: S102 - the purpose
            env["_compiled"][key] = ns
        ns = env["_compiled"][key]
        func = ns.get(job.get("entry", "f"))
        if not callable(func):
            return {"status": "error", "reason": f"the code defines no function "
                    f"{job.get('entry', 'f')!r}"}
        outputs, errors = [], []
        for x in job.get("inputs", []):
            try:
                outputs.append(_jsonable(func(x)))
                errors.append(None)
            except (MemoryError, Blocked, BlockedImport):
                raise
            except Exception as e:  # noqa: BLE001 - per-input failure is data
                outputs.append(None)
                errors.append(f"{type(e).__name__}: {e}"[:200])
        return {"status": "ok", "outputs": outputs, "errors": errors}
    except MemoryError:
        return {"status": "memory", "reason": "MemoryError: the memory limit was reached"}
    except (Blocked, BlockedImport) as e:
        return {"status": "blocked", "reason": str(e)}
    except SyntaxError as e:
        return {"status": "error", "reason": f"SyntaxError: {e}"}
    except BaseException as e:  # noqa: BLE001 - SystemExit etc. from untrusted code
        return {"status": "error", "reason": f"{type(e).__name__}: {e}"[:300]}
    finally:
        sys.stdout = real_stdout


def _embed_helper(path: str) -> Any:
    """``embed(texts)`` with all-MiniLM-L6-v2 (entity neurons), loaded before the audit hook
    is installed, since torch needs ctypes and writes caches while it loads."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    model.encode(["warm up"])

    def embed(texts: list[str]) -> Any:
        return model.encode(list(texts), normalize_embeddings=True)

    return embed


def _cpu_torch_load() -> None:
    """FIND saved its MLPs' weights from a GPU; without one, ``torch.load`` refuses them
    unless told to map them to the CPU. Their code stays as it is; the default changes."""
    import functools

    import torch

    if torch.cuda.is_available():
        return
    load = torch.load

    @functools.wraps(load)
    def cpu_load(*args: Any, **kw: Any) -> Any:
        kw.setdefault("map_location", "cpu")
        return load(*args, **kw)

    torch.load = cpu_load


def main() -> None:
    job = json.loads(sys.stdin.readline())
    root = os.path.realpath(job["root"])
    os.chdir(root)
    helpers: dict[str, Any] = {}
    for name in filter(None, os.environ.get("NEUROSCRIBE_PRELOAD", "").split(",")):
        __import__(name)  # e.g. torch for FIND's MLP functions: it needs ctypes to load
        if name == "torch":
            _cpu_torch_load()
    if os.environ.get("NEUROSCRIBE_EMBED_PATH"):
        helpers["embed"] = _embed_helper(os.environ["NEUROSCRIBE_EMBED_PATH"])
    env: dict[str, Any] = {"helpers": helpers, "_compiled": {}}
    home = os.path.realpath(job["home"]) if job.get("home") else ""
    if job.get("kernel_boundary"):  # the kernel confines the process, so the libraries
        # that import ctypes, socket or a subprocess module (scipy, torch) import; starting a
        # process and opening a socket stay refused here too
        BLOCKED_IMPORTS.clear()  # the events below still refuse their use
        BLOCKED.difference_update({e for e in BLOCKED if e.startswith("ctypes.")})
    sys.addaudithook(make_hook(root, home, [os.path.realpath(a) for a in job.get("allow", [])]))
    write = sys.__stdout__.write
    write(json.dumps(run_job(job, env)) + "\n")
    sys.__stdout__.flush()
    while job.get("serve"):
        line = sys.stdin.readline()
        if not line:
            break
        write(json.dumps(run_job(json.loads(line), env)) + "\n")
        sys.__stdout__.flush()


if __name__ == "__main__":
    main()
