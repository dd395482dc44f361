"""Run folders: stage configs, atomic writes, and the guard against mixing two runs.

Every stage writes plain files under one run folder and saves the config that made them
(``record.json``, ``explain.json``, ``score.json``), so any stage can be rerun alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from neuroscribe.errors import UserError

T = TypeVar("T")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field documented for ``--help``: the doc lives next to the default."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write a file to (e.g. with a library's save); renamed on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def environment() -> dict[str, str]:
    import numpy

    env = {"python": platform.python_version(), "numpy": numpy.__version__}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    from neuroscribe import __version__

    env["neuroscribe"] = __version__
    return env


def claim_stage(run_dir: Path, stage: str, config: Any, resume: bool) -> bool:
    """Check ``run_dir/<stage>.json`` against ``config`` before a stage writes anything.

    Returns True when this stage already completed with the same config (so ``--resume`` can
    skip it). A folder holding a different run is refused, whatever ``--resume`` says.
    """
    path = run_dir / f"{stage}.json"
    want = dataclasses.asdict(config)
    if path.exists():
        have = json.loads(path.read_text())
        diff = sorted(k for k in set(want) | set(have.get("config", {}))
                      if have.get("config", {}).get(k) != want.get(k))
        if diff:
            k = diff[0]
            raise UserError(
                f"{run_dir} already holds a different run ({stage} {k}: "
                f"{have.get('config', {}).get(k)!r} there, {want.get(k)!r} now); "
                "use a new --out folder"
            )
        if not resume and have.get("complete"):
            raise UserError(f"{run_dir} already holds this {stage} stage; --resume reuses it")
        return bool(have.get("complete"))
    return False


def save_stage(run_dir: Path, stage: str, config: Any, complete: bool, **extra: Any) -> None:
    write_json(run_dir / f"{stage}.json", {"config": dataclasses.asdict(config),
                                           "complete": complete, "environment": environment(),
                                           **extra})


def load_stage(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / f"{stage}.json"
    if not path.exists():
        raise UserError(f"{run_dir} has no {stage} stage (missing {path.name}); run it first")
    return json.loads(path.read_text())


def parse_units(spec: str, n_units: int) -> list[int]:
    """``all``, ``first:N``, ``random:N[:SEED]``, or ranges like ``0-49,100``."""
    import random

    spec = spec.strip()
    if spec == "all":
        return list(range(n_units))
    kind, _, arg = spec.partition(":")
    units: list[int] = []
    try:
        if kind == "first":
            return list(range(min(int(arg), n_units)))
        if kind == "random":
            n, _, seed = arg.partition(":")
            return sorted(random.Random(int(seed or 0)).sample(range(n_units),
                                                               min(int(n), n_units)))
        for part in spec.split(","):
            a, _, b = part.partition("-")
            units += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise UserError(f"--units {spec!r} not understood: use all, first:N, random:N[:SEED] "
                        "or ranges like 0-49,100") from None
    bad = [u for u in units if not 0 <= u < n_units]
    if bad:
        raise UserError(f"unit {bad[0]} out of range: the hookpoint has {n_units} units")
    return units
