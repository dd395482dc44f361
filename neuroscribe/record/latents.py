"""SAE latents: a delphi-style sparse cache on disk, and the records built from it.

While ``record`` runs, each batch's non-zero latents go straight to disk, one spill file per
latent range, with the batch's tokens. Per latent, only a few numbers and the context ids of
its exemplars ([latents, k] each) stay in memory. At the end two things are written:

- ``latents/<hookpoint>/<start>_<end>.safetensors``, delphi's layout (its ``save_splits``): one
  file per latent range, ``end`` inclusive, holding ``locations`` [N, 3] = (context, position,
  latent - start) as uint16 (uint32 where a value does not fit), ``activations`` [N] float16
  and the ``tokens`` [contexts, ctx_len] int64 of the whole corpus; and a ``config.json``.
- ``records/<hookpoint>.safetensors``, the tensors ``UnitRecorder`` writes, filled from the spill
  files (float32, exact) a block of latents at a time and written in place.

Memory is bounded by latents x exemplar context ids plus fixed-size blocks, never by corpus
length; the dense [latents, exemplars, ctx_len] tensors never exist whole.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from neuroscribe.errors import UserError
from neuroscribe.runs import atomic_path, write_json
from neuroscribe.stats import BIN_STREAM, QUANTILES, Moments, bin_scores, derived_generator

SPILL = np.dtype([("ctx", "<i4"), ("pos", "<i4"), ("latent", "<i4"), ("value", "<f4")])
BLOCK = 1 << 20  # spill rows read at a time (16 MiB)
EXEMPLAR_BYTES = 1 << 25  # exemplar activations and tokens filled at a time (32 MiB)
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
        self.n_ctx = 0
        self.max_ctx = np.zeros(len(self.splits), np.int64)  # per split, for delphi's dtype
        self.max_latent = np.zeros(len(self.splits), np.int64)

    def _spill(self, i: int) -> Path:
        return self.folder / f".{self.splits[i][0]}_{self.splits[i][1]}.spill"

    def add(self, ctx: Any, pos: Any, latent: Any, value: Any, tokens: Any) -> None:
        """One batch: non-zeros at (global context, position, latent), and its tokens [B, T]."""
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
        self.n_ctx += len(tokens)

    def close(self) -> None:
        for f in [*self.spills, self.token_file]:
            f.close()

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
        write_json(self.folder / "config.json", {**config, "n_splits": len(self.splits)})


class ContextTopK:
    """Per row, the k best-scoring context ids, best first (their activations stay on disk)."""

    def __init__(self, rows: int, k: int) -> None:
        import torch

        self.k = k
        self.scores = torch.full((rows, k), -math.inf)
        self.ctx = torch.full((rows, k), -1, dtype=torch.int64)

    def update(self, scores: Any, ctx: Any) -> None:
        """scores [rows, B] of the batch's contexts ctx [B]."""
        import torch

        if self.k == 0 or scores.shape[1] == 0:
            return
        # Only rows where a new score beats the k-th best change (most, for sparse latents, not).
        rows = (scores > self.scores[:, -1:]).any(1).nonzero().squeeze(1)
        merged = torch.cat([self.scores[rows], scores[rows]], dim=1)
        best = merged.topk(self.k, dim=1).indices
        self.scores[rows] = merged.gather(1, best)
        self.ctx[rows] = torch.cat([self.ctx[rows], ctx.expand(len(rows), -1)], 1).gather(1, best)

    def finished(self) -> Any:
        """Context ids [rows, k], best first; -1 for a slot never filled."""
        import torch

        return torch.where(self.scores > -math.inf, self.ctx, -1)


class _Batch(NamedTuple):
    """What the warm-up keeps of a batch until the quantile boundaries are fixed."""

    latent: Any  # [nnz] latent of each non-zero
    value: Any  # [nnz]
    n_pos: int  # positions in the batch (B x T)
    ctx_max: Any  # [B, U]
    keys: Any  # [B, U] the quantile bins' random keys
    ctx: Any  # [B]


class LatentRecorder:
    """``UnitRecorder``'s statistics and exemplars for SAE latents, from their non-zeros only.

    The same semantics, except that a latent's top records are contexts where it is active
    (fewer than n_top when it rarely is). Random keys come from ``gen`` and ``bin_gen`` in the
    same order as in ``UnitRecorder``, so both draw the same random and quantile-bin samples.
    """

    def __init__(self, hookpoint: str, n_units: int, cfg: Any, gen: Any, folder: Path,
                 bin_gen: Any = None) -> None:
        import torch

        self.hookpoint, self.n_units, self.cfg, self.gen = hookpoint, n_units, cfg, gen
        self.bin_gen = (derived_generator(gen.initial_seed(), BIN_STREAM) if bin_gen is None
                        else bin_gen)
        self.n_bins = len(QUANTILES) - 1
        self.quantiles = torch.tensor(QUANTILES, dtype=torch.float64)
        self.cache = LatentCache(folder, n_units, cfg.ctx_len, cfg.latent_splits)
        self.top = ContextTopK(n_units, cfg.n_top)
        self.random = ContextTopK(n_units, cfg.n_top + cfg.n_random)  # disjoint from top later
        self.bins = ContextTopK(self.n_bins * n_units, cfg.n_quantile)  # row g * U + u
        self.moments = Moments(n_units)
        self.hist = torch.zeros((n_units, cfg.n_hist_bins), dtype=torch.int64)
        self.warm: list[_Batch] = []
        self.n_warm = 0
        self.boundaries: Any = None  # [U, len(QUANTILES)]
        self.hist_edges: Any = None  # [U, bins + 1]

    def update(self, acts: Any, tokens: Any, ctx: Any) -> None:
        """acts: sparse COO [B, T, U] (``models.encode_sparse``); tokens [B, T]; ctx [B]."""
        import torch

        acts = acts.cpu().coalesce()
        (b, pos, lat), val = acts.indices(), acts.values().to(torch.float32)
        n_ctx, ctx_len, n_units = acts.shape
        if not torch.isfinite(val).all():
            i = int((~torch.isfinite(val)).nonzero()[0, 0])
            raise UserError(f"non-finite activation (NaN/Inf) at {self.hookpoint} unit "
                            f"{int(lat[i])}, context {int(ctx[b[i]])}, position {int(pos[i])}")
        self.cache.add(ctx[b].numpy(), pos.numpy(), lat.numpy(), val.numpy(), tokens.numpy())
        cell = b * n_units + lat
        count = torch.bincount(cell, minlength=n_ctx * n_units).view(n_ctx, n_units)
        ctx_max = torch.full((n_ctx * n_units,), -math.inf).scatter_reduce_(
            0, cell, val, "amax").view(n_ctx, n_units)
        ctx_max = torch.where(count < ctx_len, ctx_max.clamp(min=0), ctx_max)  # zeros count
        n_pos = n_ctx * ctx_len
        if self.boundaries is not None:
            self._histogram(lat, val, n_pos)
        self.top.update(torch.where(count > 0, ctx_max, -math.inf).T, ctx)
        self.random.update(torch.rand(ctx_max.shape, generator=self.gen).T, ctx)
        keys = torch.rand(ctx_max.shape, generator=self.bin_gen)  # the bins' own
        self.moments.merge(*self._moments(lat, val, n_pos))
        batch = _Batch(lat, val, n_pos, ctx_max, keys, ctx)
        if self.boundaries is None:
            self.warm.append(batch)
            self.n_warm += n_ctx
            if self.n_warm >= self.cfg.quantile_warmup:
                self._fix_boundaries()
        else:
            self._bin_samples(batch)

    def _moments(self, lat: Any, val: Any, n: int) -> tuple[Any, ...]:
        """``Moments.batch`` of the dense batch, from its non-zeros: a zero contributes
        (0 - mean)^p, n - nnz times per latent."""
        import torch

        v, u = val.double(), self.n_units
        mean = torch.zeros(u, dtype=torch.float64).index_add_(0, lat, v) / n
        d = v - mean[lat]
        zeros = n - torch.bincount(lat, minlength=u).double()
        sums = [torch.zeros(u, dtype=torch.float64).index_add_(0, lat, d**p) + zeros * (-mean)**p
                for p in (2, 3, 4)]
        return n, mean.numpy(), *(s.numpy() for s in sums)

    def _bin_index(self, x: Any, lo: Any, hi: Any) -> Any:
        """Histogram bin of x as ``UnitRecorder`` computes it (float32, clamp, truncate)."""
        import torch

        nb = self.cfg.n_hist_bins
        return (x - lo).div_(hi - lo).mul_(nb).clamp_(0, nb - 1).to(torch.int64)

    def _histogram(self, lat: Any, val: Any, n: int) -> None:
        import torch

        u, nb = self.n_units, self.cfg.n_hist_bins
        lo, hi = self.hist_edges[:, 0], self.hist_edges[:, -1]
        idx = lat * nb + self._bin_index(val, lo[lat], hi[lat])
        self.hist += torch.bincount(idx, minlength=u * nb).view(u, nb)
        zero_bin = torch.arange(u) * nb + self._bin_index(torch.zeros(u), lo, hi)
        self.hist.view(-1).index_add_(0, zero_bin, n - torch.bincount(lat, minlength=u))

    def _fix_boundaries(self) -> None:
        import torch

        if not self.warm:
            return
        maxima = torch.cat([w.ctx_max for w in self.warm])  # [N, U]
        step = max(1, (1 << 20) // len(maxima))  # latents at a time: small float64 copies
        self.boundaries = torch.cat([
            torch.quantile(maxima[:, a:a + step].T.double(), self.quantiles, dim=1).T
            for a in range(0, self.n_units, step)]).float()
        lat, val = torch.cat([w.latent for w in self.warm]), torch.cat([w.value for w in self.warm])
        lo = torch.full((self.n_units,), math.inf).scatter_reduce_(0, lat, val, "amin")
        has_zero = torch.bincount(lat, minlength=self.n_units) < sum(w.n_pos for w in self.warm)
        lo = torch.where(has_zero, lo.clamp(max=0), lo)
        hi = maxima.amax(0)
        hi = torch.where(hi > lo, hi, lo + 1)
        steps = torch.linspace(0, 1, self.cfg.n_hist_bins + 1)
        self.hist_edges = lo[:, None] + (hi - lo)[:, None] * steps
        self.hist_edges[:, 0], self.hist_edges[:, -1] = lo, hi  # exact ends, as linspace
        warm, self.warm = self.warm, []
        for w in warm:  # what the warm-up batches could not do without boundaries and edges
            self._histogram(w.latent, w.value, w.n_pos)
            self._bin_samples(w)

    def _bin_samples(self, w: _Batch) -> None:
        """The random samples per quantile bin (``UnitRecorder._bin_samples``)."""
        self.bins.update(bin_scores(self.boundaries, w.ctx_max, w.keys), w.ctx)

    def _exemplar_ctx(self, lo: int, hi: int, top: Any, rnd: Any, bins: Any) -> dict[str, Any]:
        """Context ids per record kind for latents lo..hi-1; random ones skip top contexts."""
        import torch

        top, rnd = top[lo:hi], rnd[lo:hi]
        clash = (rnd[:, :, None] == top[:, None, :]).any(-1) | (rnd < 0)
        pick = torch.sort(clash.to(torch.int8), dim=1, stable=True).indices[:, :self.cfg.n_random]
        rnd = rnd.gather(1, pick)
        rnd[clash.gather(1, pick)] = -1
        out = {"top": top, "random": rnd}
        out.update({f"q{g}": bins[g, lo:hi] for g in range(self.n_bins)})
        return {k: v.numpy() for k, v in out.items()}

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """Write the records file (``UnitRecorder``'s keys), then the delphi cache files."""
        import torch

        if self.boundaries is None:
            self._fix_boundaries()
        self.cache.close()
        cfg, u, t = self.cfg, self.n_units, self.cfg.ctx_len
        stats = {k: torch.from_numpy(v.astype(np.float32))
                 for k, v in self.moments.finished().items()}
        stats.update(quantile_boundaries=self.boundaries, hist_edges=self.hist_edges,
                     hist_counts=self.hist)
        widths = {"top": cfg.n_top, "random": cfg.n_random,
                  **{f"q{g}": cfg.n_quantile for g in range(self.n_bins)}}
        specs = {k: (v.numpy().dtype, tuple(v.shape)) for k, v in stats.items()}
        for kind, k in widths.items():
            specs |= {f"{kind}_ctx": (np.int64, (u, k)), f"{kind}_acts": (np.float32, (u, k, t)),
                      f"{kind}_tokens": (np.int32, (u, k, t))}
        top, rnd = self.top.finished(), self.random.finished()
        bins = self.bins.finished().view(self.n_bins, u, cfg.n_quantile)
        tokens = self.cache.tokens()
        size = max(1, EXEMPLAR_BYTES // (8 * t * max(1, sum(widths.values()))))
        with TensorFile(path, specs, metadata) as out:
            for name, v in stats.items():
                out.write(name, 0, v.numpy())
            for split, lo, hi in self.cache.chunks(size):
                ctx = self._exemplar_ctx(lo, hi, top, rnd, bins)
                acts = self.cache.exemplar_acts(split, lo, hi, ctx)
                for kind, c in ctx.items():
                    out.write(f"{kind}_ctx", lo, c)
                    out.write(f"{kind}_acts", lo, acts[kind])
                    out.write(f"{kind}_tokens", lo, tokens[c.clip(0)] * (c >= 0)[..., None])
        del tokens
        self.cache.write_splits({
            "model_name": cfg.model, "dataset_repo": cfg.corpus, "dataset_split": "",
            "dataset_name": "", "dataset_column": "text", "batch_size": cfg.batch_size,
            "cache_ctx_len": t, "n_tokens": self.cache.n_ctx * t, "hookpoint": self.hookpoint,
            "n_latents": u})
