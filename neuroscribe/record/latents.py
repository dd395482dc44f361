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

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from neuroscribe.errors import UserError
from neuroscribe.record.latent_cache import LatentCache, TensorFile
from neuroscribe.record.moments import Moments
from neuroscribe.stats import (
    BIN_STREAM,
    EMPTY,
    QUANTILES,
    VACANT,
    bin_keys,
    float_keys,
    random_keys,
    stream_seed,
)

EXEMPLAR_BYTES = 1 << 25  # exemplar activations and tokens filled at a time (32 MiB)


class ContextTopK:
    """Per row, the k best-keyed context ids, best first (their activations stay on disk).
    Keys are ``stats.TopK``'s: unique int64 per row, so the kept set is exact."""

    def __init__(self, rows: int, k: int) -> None:
        import torch

        self.k = k
        self.keys = torch.full((rows, k), VACANT, dtype=torch.int64)
        self.ctx = torch.full((rows, k), -1, dtype=torch.int64)

    def update(self, keys: Any, ctx: Any) -> None:
        """keys [rows, B] of the batch's contexts ctx [B] (``EMPTY``: not a candidate)."""
        import torch

        if self.k == 0 or keys.shape[1] == 0:
            return
        # Only rows where a new key beats the k-th best change (most, for sparse latents, not).
        rows = (keys > self.keys[:, -1:]).any(1).nonzero().squeeze(1)
        merged = torch.cat([self.keys[rows], keys[rows]], dim=1)
        best = merged.topk(self.k, dim=1).indices
        self.keys[rows] = merged.gather(1, best)
        self.ctx[rows] = torch.cat([self.ctx[rows], ctx.expand(len(rows), -1)], 1).gather(1, best)

    def finished(self) -> Any:
        """Context ids [rows, k], best first; -1 for a slot never filled."""
        import torch

        return torch.where(self.keys > VACANT, self.ctx, -1)

    def state(self) -> dict[str, Any]:
        empty = self.keys <= VACANT
        return {"keys": self.keys.masked_fill(empty, EMPTY), "ctx": self.ctx.masked_fill(empty, -1)}


def merged_ctx(states: list[dict[str, Any]], k: int) -> Any:
    """Context ids [rows, k], best first (-1: a slot never filled), of several stores."""
    import torch

    keys = torch.cat([s["keys"] for s in states], 1)
    ctx = torch.cat([s["ctx"] for s in states], 1)
    best = keys.topk(min(k, keys.shape[1]), dim=1).indices
    return torch.where(keys.gather(1, best) > EMPTY, ctx.gather(1, best), -1)


class _Batch(NamedTuple):
    """What the warm-up keeps of a batch until the quantile boundaries are fixed."""

    latent: Any  # [nnz] latent of each non-zero
    value: Any  # [nnz]
    row: Any  # [nnz] its context's row in the batch
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

    sparse = True

    def __init__(self, hookpoint: str, n_units: int, cfg: Any, folder: Path) -> None:
        import torch

        from neuroscribe.record.units import RANDOM_STREAM

        self.hookpoint, self.n_units, self.cfg = hookpoint, n_units, cfg
        self.seeds = (stream_seed(cfg.seed, RANDOM_STREAM), stream_seed(cfg.seed, BIN_STREAM))
        self.n_bins = len(QUANTILES) - 1
        self.quantiles = torch.tensor(QUANTILES, dtype=torch.float64)
        self.cache = LatentCache(folder, n_units, cfg.ctx_len, cfg.latent_splits)
        self.top = ContextTopK(n_units, cfg.n_top)
        self.random = ContextTopK(n_units, cfg.n_top + cfg.n_random)  # disjoint from top later
        self.bins = ContextTopK(self.n_bins * n_units, cfg.n_quantile)  # row g * U + u
        self.moments: dict[int, Moments] = {}  # per shard of contexts
        self.hist = torch.zeros((n_units, cfg.n_hist_bins), dtype=torch.int64)
        self.warm: list[_Batch] = []
        self.n_warm = 0
        self.boundaries: Any = None  # [U, len(QUANTILES)]
        self.hist_edges: Any = None  # [U, bins + 1]

    def update(self, acts: Any, tokens: Any, ctx: Any, shard: int = 0) -> None:
        """acts: sparse COO [B, T, U] (``models.encode_sparse``); tokens [B, T]; ctx [B]."""
        import torch

        acts = acts.cpu().coalesce()
        (b, pos, lat), val = acts.indices(), acts.values().to(torch.float32)
        n_ctx, ctx_len, n_units = acts.shape
        if not torch.isfinite(val).all():
            i = int((~torch.isfinite(val)).nonzero()[0, 0])
            raise UserError(f"non-finite activation (NaN/Inf) at {self.hookpoint} unit "
                            f"{int(lat[i])}, context {int(ctx[b[i]])}, position {int(pos[i])}")
        self.cache.add(ctx[b].numpy(), pos.numpy(), lat.numpy(), val.numpy(), tokens.numpy(),
                       ctx.numpy())
        cell = b * n_units + lat
        count = torch.bincount(cell, minlength=n_ctx * n_units).view(n_ctx, n_units)
        ctx_max = torch.full((n_ctx * n_units,), -math.inf).scatter_reduce_(
            0, cell, val, "amax").view(n_ctx, n_units)
        ctx_max = torch.where(count < ctx_len, ctx_max.clamp(min=0), ctx_max)  # zeros count
        n_pos = n_ctx * ctx_len
        if self.boundaries is not None:
            self._histogram(lat, val, n_pos)
        self.top.update(torch.where(count > 0, float_keys(ctx_max, ctx), EMPTY).T, ctx)
        self.random.update(random_keys(self.seeds[0], ctx, n_units).T, ctx)
        keys = random_keys(self.seeds[1], ctx, n_units)  # the bins' own
        moments = self.moments.setdefault(shard, Moments(n_units))
        moments.merge(*self._moments(lat, val, n_pos))
        batch = _Batch(lat, val, b, n_pos, ctx_max, keys, ctx)
        if self.boundaries is None:
            self.warm.append(batch)
            self.n_warm += n_ctx
            if self.n_warm >= self.cfg.quantile_warmup:
                self.fix_boundaries()
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

    def fix_boundaries(self) -> None:
        """``UnitRecorder.fix_boundaries``: from the first ``quantile_warmup`` contexts."""
        import torch

        if self.boundaries is not None or not self.warm:
            return
        n = self.cfg.quantile_warmup
        maxima = torch.cat([w.ctx_max for w in self.warm])[:n]  # [N, U]
        step = max(1, (1 << 20) // len(maxima))  # latents at a time: small float64 copies
        boundaries = torch.cat([
            torch.quantile(maxima[:, a:a + step].T.double(), self.quantiles, dim=1).T
            for a in range(0, self.n_units, step)]).float()
        offsets = np.cumsum([0] + [len(w.ctx) for w in self.warm])
        inside = [w.row + int(o) < n for w, o in zip(self.warm, offsets)]
        lat = torch.cat([w.latent[k] for w, k in zip(self.warm, inside)])
        val = torch.cat([w.value[k] for w, k in zip(self.warm, inside)])
        lo = torch.full((self.n_units,), math.inf).scatter_reduce_(0, lat, val, "amin")
        n_pos = len(maxima) * self.cfg.ctx_len
        has_zero = torch.bincount(lat, minlength=self.n_units) < n_pos
        lo = torch.where(has_zero, lo.clamp(max=0), lo)
        hi = maxima.amax(0)
        hi = torch.where(hi > lo, hi, lo + 1)
        steps = torch.linspace(0, 1, self.cfg.n_hist_bins + 1)
        edges = lo[:, None] + (hi - lo)[:, None] * steps
        edges[:, 0], edges[:, -1] = lo, hi  # exact ends, as linspace
        self.set_boundaries(boundaries, edges)

    def set_boundaries(self, boundaries: Any, edges: Any) -> None:
        self.boundaries, self.hist_edges = boundaries, edges
        warm, self.warm = self.warm, []
        for w in warm:  # what the warm-up batches could not do without boundaries and edges
            self._histogram(w.latent, w.value, w.n_pos)
            self._bin_samples(w)

    def _bin_samples(self, w: _Batch) -> None:
        """The random samples per quantile bin (``UnitRecorder._bin_samples``)."""
        self.bins.update(bin_keys(self.boundaries, w.ctx_max, w.keys), w.ctx)

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

    def state(self) -> dict[str, Any]:
        """Everything but the spilled activations, as plain tensors (see ``merge.py``)."""
        from neuroscribe.record.merge import moments_state

        self.fix_boundaries()
        return {"top": self.top.state(), "random": self.random.state(),
                "bins": self.bins.state(), "hist": self.hist.clone(),
                "boundaries": self.boundaries, "hist_edges": self.hist_edges,
                **moments_state(self.moments)}

    def save(self, path: Path, metadata: dict[str, str],
             others: tuple[dict[str, Any], ...] = ()) -> None:
        """Write the records file (``UnitRecorder``'s keys), then the delphi cache files;
        ``others``: other ranks' states, whose spills ``LatentCache.adopt`` took in."""
        import torch

        from neuroscribe.record.merge import merge_moments

        states = [self.state(), *others]
        self.cache.close()
        cfg, u, t = self.cfg, self.n_units, self.cfg.ctx_len
        stats = {k: torch.from_numpy(v.astype(np.float32))
                 for k, v in merge_moments(states, u).finished().items()}
        stats.update(quantile_boundaries=self.boundaries, hist_edges=self.hist_edges,
                     hist_counts=sum(s["hist"] for s in states))
        widths = {"top": cfg.n_top, "random": cfg.n_random,
                  **{f"q{g}": cfg.n_quantile for g in range(self.n_bins)}}
        specs = {k: (v.numpy().dtype, tuple(v.shape)) for k, v in stats.items()}
        for kind, k in widths.items():
            specs |= {f"{kind}_ctx": (np.int64, (u, k)), f"{kind}_acts": (np.float32, (u, k, t)),
                      f"{kind}_tokens": (np.int32, (u, k, t))}
        top = merged_ctx([s["top"] for s in states], cfg.n_top)
        rnd = merged_ctx([s["random"] for s in states], cfg.n_top + cfg.n_random)
        bins = merged_ctx([s["bins"] for s in states], cfg.n_quantile).view(
            self.n_bins, u, cfg.n_quantile)
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
