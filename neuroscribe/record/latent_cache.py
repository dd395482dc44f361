"""The sparse latent cache on disk: spill files per latent range while ``record`` runs, then
delphi's layout (its ``save_splits``): ``latents/<hookpoint>/<start>_<end>.safetensors``, one
file per latent range, ``end`` inclusive, holding ``locations`` [N, 3] = (context, position,
latent - start) as uint16 (uint32 where a value does not fit), ``activations`` [N] float16 and
the ``tokens`` [contexts, ctx_len] int64 of the whole corpus; and a ``config.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.runs import atomic_path, write_json

SPILL = np.dtype([("ctx", "<i4"), ("pos", "<i4"), ("latent", "<i4"), ("value", "<f4")])
BLOCK = 1 << 20  # spill rows read at a time (16 MiB)
_CODES = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
          "uint16": "U16", "uint32": "U32"}


class TensorFile:
    """A safetensors file written piecewise: all shapes are fixed up front, then rows of any
    tensor can be written at any time (the file is pre-sized and written in place)."""

    def __init__(self, path: Path, specs: dict[str, tuple[Any, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        self.where: dict[str, tuple[int, np.dtype[Any], tuple[int, ...]]] = {}
        offset = 0
        # Widest dtypes first, so that every tensor starts aligned (as safetensors orders them).
        for name in sorted(specs, key=lambda n: (-np.dtype(specs[n][0]).itemsize, n)):
            dtype, shape = np.dtype(specs[name][0]), tuple(specs[name][1])
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype.name], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self.where[name] = (offset, dtype, shape)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close or __exit__)
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.file.truncate(self.base + offset)

    def write(self, name: str, row: int, array: Any) -> None:
        """Rows ``row, row + 1, ...`` (along the first axis) of tensor ``name``."""
        offset, dtype, shape = self.where[name]
        a = np.ascontiguousarray(array, dtype=dtype)
        if a.shape[1:] != shape[1:] or not 0 <= row <= shape[0] - len(a):
            raise ValueError(f"{name}: rows {row}+{a.shape} do not fit {shape}")
        self.file.seek(self.base + offset + row * dtype.itemsize * math.prod(shape[1:]))
        self.file.write(a.data)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def truncate(snapshot: dict[str, Any]) -> None:
    """A killed attempt's spill files, cut back to a checkpoint's ``snapshot``."""
    for name, size in snapshot["sizes"].items():
        os.truncate(Path(snapshot["folder"]) / name, size)


def split_bounds(n_latents: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's latent ranges ``(start, end)``, end inclusive, from the same linspace."""
    import torch

    edges = torch.linspace(0, n_latents, max(1, min(n_splits, n_latents)) + 1).long().tolist()
    return [(a, b - 1) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class LatentCache:
    """The non-zero latents of one hookpoint: spill files per latent range during the pass,
    delphi's split files at the end."""

    def __init__(self, folder: Path, n_latents: int, ctx_len: int, n_splits: int) -> None:
        shutil.rmtree(folder, ignore_errors=True)  # a previous attempt's files
        folder.mkdir(parents=True)
        self.folder, self.ctx_len = folder, ctx_len
        self.splits = split_bounds(n_latents, n_splits)
        self.starts = np.array([a for a, _ in self.splits])
        self.spills = [open(self._spill(i), "wb") for i in range(len(self.splits))]  # noqa: SIM115
        self.token_file = open(folder / ".tokens.spill", "wb")  # noqa: SIM115
        self.ctx_file = open(folder / ".ctx.spill", "wb")  # noqa: SIM115 (context id per row)
        self.n_ctx = 0
        self.max_ctx = np.zeros(len(self.splits), np.int64)  # per split, for delphi's dtype
        self.max_latent = np.zeros(len(self.splits), np.int64)

    def _spill(self, i: int) -> Path:
        return self.folder / f".{self.splits[i][0]}_{self.splits[i][1]}.spill"

    def add(self, ctx: Any, pos: Any, latent: Any, value: Any, tokens: Any,
            batch_ctx: Any) -> None:
        """One batch: non-zeros at (global context, position, latent), and the batch's tokens
        [B, T] and global context ids [B]."""
        rec = np.empty(len(value), SPILL)
        for name, col in zip(SPILL.names, (ctx, pos, latent, value)):
            rec[name] = np.asarray(col)
        which = np.searchsorted(self.starts, rec["latent"], side="right") - 1
        order = np.argsort(which, kind="stable")  # keeps (context, position, latent) order
        cuts = np.searchsorted(which[order], np.arange(1, len(self.splits)))
        for i, part in enumerate(np.split(rec[order], cuts)):
            if len(part):
                self.spills[i].write(part.tobytes())
                self.max_ctx[i] = max(self.max_ctx[i], part["ctx"].max())
                self.max_latent[i] = max(self.max_latent[i],
                                         part["latent"].max() - self.splits[i][0])
        self.token_file.write(np.ascontiguousarray(tokens, np.int32).tobytes())
        self.ctx_file.write(np.ascontiguousarray(batch_ctx, np.int64).tobytes())
        self.n_ctx += len(tokens)

    def close(self) -> None:
        for f in [*self.spills, self.token_file, self.ctx_file]:
            f.close()

    def snapshot(self) -> dict[str, Any]:
        """Flush, and where the spills are and how long, for a checkpoint (``truncate``
        cuts a killed attempt's files back to it on resume)."""
        files = [*self.spills, self.token_file, self.ctx_file]
        for f in files:
            f.flush()
        return {"folder": str(self.folder), "n_ctx": self.n_ctx,
                "max_ctx": self.max_ctx.tolist(), "max_latent": self.max_latent.tolist(),
                "sizes": {Path(f.name).name: f.tell() for f in files}}

    def spill_files(self) -> dict[str, Any]:
        """Where this rank's spills are, for rank 0's ``adopt``."""
        self.close()
        return {"folder": str(self.folder), "n_ctx": self.n_ctx,
                "max_ctx": self.max_ctx.tolist(), "max_latent": self.max_latent.tolist()}

    def adopt(self, others: list[dict[str, Any]], folder: Path, n_ctx: int) -> None:
        """Rank 0: fold the other ranks' spills into one cache in ``folder``, rows in global
        context order (each rank's spill is in its own context order, so a merge by context
        id), as one process would have written them; then drop the ranks' folders."""
        self.close()
        if not others:  # one process, nothing resumed: the spills move as they are
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.folder), folder)
            self.folder = folder
            return
        parts = [{"folder": str(self.folder), "n_ctx": self.n_ctx}, *others]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i in range(len(self.splits)):
            name = self._spill(i).name
            rows = np.concatenate([np.fromfile(Path(p["folder"]) / name, SPILL) for p in parts])
            rows = rows[np.argsort(rows["ctx"], kind="stable")]  # (ctx, pos, latent) order kept
            rows.tofile(folder / name)
        tokens = np.zeros((n_ctx, self.ctx_len), np.int32)
        for p in parts:
            src = Path(p["folder"])
            ctx = np.fromfile(src / ".ctx.spill", np.int64)
            tokens[ctx] = np.fromfile(src / ".tokens.spill", np.int32).reshape(-1, self.ctx_len)
        tokens.tofile(folder / ".tokens.spill")
        self.max_ctx = np.max([self.max_ctx, *[np.array(p["max_ctx"]) for p in others]], 0)
        self.max_latent = np.max([self.max_latent, *[np.array(p["max_latent"]) for p in others]],
                                 0)
        for p in parts:
            shutil.rmtree(p["folder"], ignore_errors=True)
        self.folder, self.n_ctx = folder, n_ctx

    def blocks(self, i: int) -> Iterator[np.ndarray]:
        """Split i's spill, BLOCK rows at a time (read, not mapped: RSS stays small)."""
        with open(self._spill(i), "rb") as f:
            while len(block := np.fromfile(f, SPILL, count=BLOCK)):
                yield block

    def tokens(self) -> np.ndarray:
        """All contexts' tokens [contexts, ctx_len], mapped from disk."""
        if self.n_ctx == 0:
            return np.zeros((0, self.ctx_len), np.int32)
        return np.memmap(self.folder / ".tokens.spill", np.int32, "r",
                         shape=(self.n_ctx, self.ctx_len))

    def chunks(self, size: int) -> Iterator[tuple[int, int, int]]:
        """(split, first latent, end latent exclusive): ranges of at most size, within splits."""
        for i, (a, b) in enumerate(self.splits):
            for lo in range(a, b + 1, size):
                yield i, lo, min(lo + size, b + 1)

    def exemplar_acts(self, split: int, lo: int, hi: int,
                      ctx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Activations [hi - lo, k, ctx_len] of latents lo..hi-1 in the contexts ctx[kind]
        [hi - lo, k] (-1: none; unique per row), from one pass over the split's spill."""
        tables = {}
        for kind, c in ctx.items():
            key = np.where(c >= 0, np.arange(hi - lo)[:, None] * self.n_ctx + c, -1).ravel()
            order = np.argsort(key)
            tables[kind] = (key[order], order, np.zeros((key.size, self.ctx_len), np.float32))
        for blk in self.blocks(split):
            blk = blk[(blk["latent"] >= lo) & (blk["latent"] < hi)]
            q = (blk["latent"] - lo).astype(np.int64) * self.n_ctx + blk["ctx"]
            for keys, order, out in tables.values():
                if keys.size:
                    i = np.searchsorted(keys, q).clip(max=keys.size - 1)
                    hit = keys[i] == q
                    out[order[i[hit]], blk["pos"][hit]] = blk["value"][hit]
        return {kind: t[2].reshape(*ctx[kind].shape, self.ctx_len) for kind, t in tables.items()}

    def write_splits(self, config: dict[str, Any]) -> None:
        """delphi's files, one per split, streamed from the spills; then the spills go."""
        tokens = self.tokens()
        for i, (a, b) in enumerate(self.splits):
            n = self._spill(i).stat().st_size // SPILL.itemsize
            small = max(self.max_ctx[i], self.max_latent[i]) < 1 << 16
            specs = {"locations": (np.uint16 if small else np.uint32, (n, 3)),
                     "activations": (np.float16, (n,)), "tokens": (np.int64, tokens.shape)}
            with atomic_path(self.folder / f"{a}_{b}.safetensors") as tmp, \
                    TensorFile(tmp, specs) as out:
                row = 0
                for blk in self.blocks(i):
                    loc = np.stack([blk["ctx"], blk["pos"], blk["latent"] - a], axis=1)
                    out.write("locations", row, loc)
                    out.write("activations", row, blk["value"])
                    row += len(blk)
                for start in range(0, len(tokens), BLOCK // self.ctx_len):
                    out.write("tokens", start, tokens[start:start + BLOCK // self.ctx_len])
            self._spill(i).unlink()
        del tokens
        (self.folder / ".tokens.spill").unlink()
        (self.folder / ".ctx.spill").unlink(missing_ok=True)
        write_json(self.folder / "config.json", {**config, "n_splits": len(self.splits)})
