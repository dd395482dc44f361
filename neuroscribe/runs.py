"""Run folders: stage configs, atomic writes, and the guard against mixing two runs.

Every stage writes plain files under one run folder and saves the config that made them
(``record.json``, ``explain.json``, ``score.json``), so any stage can be rerun alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
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


def opt(default: Any, help: str, identity: bool = True, scope: bool = False,
        **kw: Any) -> Any:
    """A config field documented for ``--help``: the doc lives next to the default.

    ``identity=False``: the field does not change results (concurrency, endpoints, timeouts),
    so a run folder accepts any value of it. ``scope=True``: the field picks which units this
    process works on (``--units``, ``--shard``); it is not part of the identity either, and
    another scope adds its units to a finished stage without ``--resume``.
    """
    meta = {"help": help, **kw}
    if not identity or scope:
        meta["identity"] = False
    if scope:
        meta["scope"] = True
    return dataclasses.field(default=default, metadata=meta)


def identity(config: Any) -> dict[str, Any]:
    """The fields of ``config`` that decide its results: what two runs must agree on."""
    skip = {f.name for f in dataclasses.fields(config) if f.metadata.get("identity") is False}
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}


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
    Only identity fields are compared (see ``opt``): a resume may change the concurrency or
    the endpoints, and several processes may share the folder with other ``--units`` or
    ``--shard``s. A finished stage is refused without ``--resume`` only for the same scope.
    """
    path = run_dir / f"{stage}.json"
    want = identity(config)
    if path.exists():
        have = json.loads(path.read_text())
        there = have.get("config", {})
        loose = {f.name for f in dataclasses.fields(config)} - set(want)
        diff = sorted(k for k in (set(want) | set(there)) - loose if there.get(k) != want.get(k))
        if diff:
            k = diff[0]
            raise UserError(
                f"{run_dir} already holds a different run ({stage} {k}: "
                f"{there.get(k)!r} there, {want.get(k)!r} now); "
                "use a new --out folder"
            )
        same_scope = all(there.get(f.name, f.default) == getattr(config, f.name)
                         for f in dataclasses.fields(config) if f.metadata.get("scope"))
        if not resume and have.get("complete") and same_scope:
            raise UserError(f"{run_dir} already holds this {stage} stage; --resume reuses it")
        return bool(have.get("complete")) and same_scope
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


SHARD_HELP = ("i/n: work only on the units whose stable hash falls in shard i of n (0 <= i "
              "< n), so n processes or machines share the units of one run folder")


def parse_shard(spec: str) -> tuple[int, int]:
    """``i/n`` (0 <= i < n): this process takes the units whose hash falls in shard i."""
    i, sep, n = spec.strip().partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise UserError(f"--shard {spec!r} not understood: use i/n with 0 <= i < n, e.g. 0/2 "
                        "and 1/2 on two machines")
    return shard


def in_shard(hookpoint: str, unit: int, shard: tuple[int, int]) -> bool:
    """Whether ``hookpoint/unit`` belongs to ``shard``: by sha256, so the split is the same on
    every machine and Python version, and a unit's shard does not depend on the others."""
    i, n = shard
    if n == 1:
        return True
    h = int.from_bytes(hashlib.sha256(f"{hookpoint}/{unit}".encode()).digest()[:8], "big")
    return h % n == i
