"""The in-memory recorder of dense units (MLP neurons, residual or attention outputs,
CNN channels): every exemplar kind is the same streaming top-k (``stats.TopK``), keyed by the
context's max activation or by a random key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.errors import UserError
from neuroscribe.record.moments import Moments
from neuroscribe.stats import (
    BIN_STREAM,
    QUANTILES,
    Part,
    TopK,
    bin_keys,
    float_keys,
    quantiles,
    random_keys,
    scratch,
    stream_seed,
)

RANDOM_STREAM = "random-sample"  # the random sample's keys (BIN_STREAM: the bins')
# ``update`` holds batches back from the top-k stores until it has this many contexts, or
# this many bytes of activations: part of a store update's cost is per call (bench/record.py:
# the three stores took 0.38 s per 40,960 tokens at 32 contexts a call, 0.26 s at 128; 256
# gained nothing more, the rest being copies of the rows that enter a store).
HOLD_CONTEXTS = 128
HOLD_BYTES = 64 << 20


class UnitRecorder:
    """All per-unit state for one hookpoint; ``update`` takes one batch of activations.

    Every exemplar kind is keyed by a pure function of (seed, global context id, unit), so
    the records do not depend on batching or on how contexts are split across ranks:
    ``state`` gives plain tensors and ``merge.finish_units`` merges any number of them.

    Per batch this costs one pass each for the moments, the histogram and the context maxima,
    and per group of held batches (``flush``) top-k merges over [units, k + contexts] keys
    (bench/record.py measures it).
    """

    sparse = False  # SAE latents: ``latents.LatentRecorder``

    def __init__(self, hookpoint: str, n_units: int, cfg: Any) -> None:
        import torch

        self.hookpoint, self.n_units, self.cfg = hookpoint, n_units, cfg
        # The bins draw keys of their own: with the random sample's keys, a bin's sample would
        # hold every random-sample context that falls in the bin (the best keys are the best).
        self.seeds = (stream_seed(cfg.seed, RANDOM_STREAM), stream_seed(cfg.seed, BIN_STREAM))
        self.top = TopK(n_units, cfg.n_top, cfg.ctx_len)
        # Kept n_top larger, so the random sample can exclude top contexts and stay disjoint.
        self.random = TopK(n_units, cfg.n_random + cfg.n_top, cfg.ctx_len)
        # One store, one group per quantile bin: a context's key competes only in its bin.
        self.bins = TopK(n_units, cfg.n_quantile, cfg.ctx_len, groups=len(QUANTILES) - 1)
        self.moments: dict[int, Moments] = {}  # per shard of contexts
        self.warm: list[tuple[Any, Any, Any, Any, Any]] = []
        self.n_warm = 0
        self.n_seen = 0  # contexts this recorder has updated on
        self.boundaries: Any = None  # [U, len(QUANTILES)]
        self.hist_edges: Any = None  # [U, bins + 1]
        self.hist = torch.zeros((n_units, cfg.n_hist_bins), dtype=torch.int64)
        self._hist_offsets = torch.arange(n_units, dtype=torch.int32) * cfg.n_hist_bins
        self._bufs: dict[str, Any] = {}  # scratch buffers, reused batch after batch
        self._held: list[tuple[Part, Any, Any, Any]] = []  # not yet in the stores
        self._held_contexts = self._held_bytes = 0

    def update(self, acts: Any, tokens: Any, ctx: Any, shard: int = 0) -> None:
        """acts [B, T, U], tokens [B, T], global context ids ctx [B], in ``shard``.

        The moments and histogram take the batch at once, while it is in cache; the top-k
        stores take batches in groups of at least ``HOLD_CONTEXTS`` contexts (``flush``).
        ``state`` and ``fix_boundaries`` flush first.
        """
        import torch

        acts = acts.detach().to("cpu")
        if acts.dtype not in (torch.bfloat16, torch.float16):  # those widen exactly where used
            acts = acts.float()
        moments = self.moments.setdefault(shard, Moments(self.n_units))
        sums = moments.batch(acts.reshape(-1, self.n_units))
        if not np.isfinite(sums[1]).all():  # any NaN/Inf makes its unit's batch mean non-finite
            bad = (~torch.isfinite(acts)).nonzero()[0].tolist()
            raise UserError(f"non-finite activation (NaN/Inf) at {self.hookpoint} unit {bad[2]}, "
                            f"context {int(ctx[bad[0]])}, position {bad[1]}")
        moments.merge(*sums)
        counted = self.boundaries is not None
        if counted:
            self._histogram(acts.reshape(-1, self.n_units))
        # Early on most slots change; copying the batch to [B, U, T] once is then cheaper
        # than the stores' strided gathers (about 3 ms against 0.1 us a slot, per store).
        early = self.n_seen + self._held_contexts < 2 * (self.cfg.n_top + self.cfg.n_random)
        part = Part(acts, acts.transpose(1, 2).contiguous() if early else None, counted)
        self._held.append((part, tokens, ctx, acts.amax(dim=1)))
        self._held_contexts += acts.shape[0]
        self._held_bytes += acts.numel() * acts.element_size() * (2 if early else 1)
        if self._held_contexts >= HOLD_CONTEXTS or self._held_bytes >= HOLD_BYTES:
            self.flush()

    def flush(self) -> None:
        """The held batches into the top-k stores, as one batch (fewer calls; the records do
        not depend on the batching)."""
        import torch

        held, self._held = self._held, []
        self._held_contexts = self._held_bytes = 0
        if not held:
            return
        parts = [h[0] for h in held]
        tokens, ctx, ctx_max = (torch.cat([h[i] for h in held]) if len(held) > 1 else held[0][i]
                                for i in (1, 2, 3))
        self.n_seen += len(ctx)
        self.top.update(float_keys(ctx_max, ctx), parts, tokens, ctx)
        self.random.update(random_keys(self.seeds[0], ctx, self.n_units), parts, tokens, ctx)
        keys = random_keys(self.seeds[1], ctx, self.n_units)  # the bins' own
        if self.boundaries is None:
            self.warm.append((parts, tokens, ctx, ctx_max, keys))
            self.n_warm += len(ctx)
            if self.n_warm >= self.cfg.quantile_warmup:
                self.fix_boundaries()
        else:
            self._count(parts)
            self._bin_samples(parts, tokens, ctx, ctx_max, keys)

    def fix_boundaries(self) -> None:
        """Quantile boundaries and histogram edges from the first ``quantile_warmup`` contexts
        (all, if fewer); then what the buffered batches could not do without them."""
        import torch

        if self.boundaries is None:
            self.flush()
        if self.boundaries is not None or not self.warm:
            return
        n = self.cfg.quantile_warmup
        maxima = torch.cat([w[3] for w in self.warm])[:n].float()  # [N, U]
        boundaries = quantiles(maxima.T.contiguous(), QUANTILES).float()  # [U, Q]
        lo = torch.cat([p.acts.amin(dim=1) for w in self.warm for p in w[0]])[:n].amin(0).float()
        hi = maxima.amax(0)
        hi = torch.where(hi > lo, hi, lo + 1)
        steps = torch.linspace(0, 1, self.cfg.n_hist_bins + 1)
        edges = torch.lerp(lo[:, None].expand(-1, len(steps)), hi[:, None].expand(-1, len(steps)),
                           steps)  # each row as torch.linspace(lo, hi), in one call
        self.set_boundaries(boundaries, edges)

    def set_boundaries(self, boundaries: Any, edges: Any) -> None:
        """Use these boundaries and edges (another rank's, or a checkpoint's)."""
        import torch

        self.boundaries, self.hist_edges = boundaries, edges
        lo, hi = edges[:, 0].float(), edges[:, -1].float()
        scale = self.cfg.n_hist_bins / (hi - lo)
        bias = -lo * scale
        # A range float32 cannot split (a constant unit at |x| >= 2**24, where lo + 1 == lo):
        # every value of the unit to bin 0, not inf * 0 = NaN bins.
        ok = torch.isfinite(scale) & torch.isfinite(bias)
        self._hist_scale = (torch.where(ok, scale, 0.0), torch.where(ok, bias, 0.0))
        warm, self.warm = self.warm, []
        for w in warm:
            self._count(w[0])
            self._bin_samples(*w)

    def _count(self, parts: list[Part]) -> None:
        """Count into the histogram the batches not yet counted (those before the edges)."""
        for p in parts:
            if not p.counted:
                self._histogram(p.acts.reshape(-1, self.n_units))
                p.counted = True

    def _bin_samples(self, parts: list[Part], tokens: Any, ctx: Any, ctx_max: Any,
                     keys: Any) -> None:
        """The random samples per quantile bin: a context's key competes only in its bin (the
        first and last bins open-ended: every context is in one)."""
        self.bins.update_rows(bin_keys(self.boundaries, ctx_max, keys), parts, tokens, ctx)

    def _histogram(self, x: Any) -> None:
        """Count x [N, U] into the bins; values outside the warm-up range go to the end bins."""
        import torch

        from neuroscribe.record import kernels

        nb = self.cfg.n_hist_bins
        scale, bias = self._hist_scale  # bin of x: floor(x * scale + bias), clamped
        if kernels.histogram(x, scale, bias, self.hist):
            return
        pos = torch.addcmul(bias, x, scale, out=scratch(self._bufs, "pos", x.shape, torch.float32))
        # Clamping before the int conversion (which truncates) is flooring, then clamping.
        idx = scratch(self._bufs, "idx", x.shape, torch.int32).copy_(pos.clamp_(0, nb - 1))
        idx += self._hist_offsets  # unit u counts into bins [u * nb, (u + 1) * nb)
        self.hist += torch.bincount(idx.view(-1), minlength=self.n_units * nb).view(
            self.n_units, nb)

    def state(self, copy: bool = True) -> dict[str, Any]:
        """Everything recorded so far, as plain tensors (``merge.finish_units`` merges them;
        ``copy=False`` for that only: see ``TopK.state``)."""
        from neuroscribe.record.merge import moments_state

        self.flush()
        self.fix_boundaries()
        return {"top": self.top.state(copy), "random": self.random.state(copy),
                "bins": self.bins.state(copy), "hist": self.hist.clone(),
                "boundaries": self.boundaries, "hist_edges": self.hist_edges,
                **moments_state(self.moments)}

    def finished(self, others: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        """The records file's tensors, merged with other ranks' or checkpoints' states."""
        from neuroscribe.record.merge import finish_units

        return finish_units(self.cfg, [self.state(copy=False), *others])

    def save(self, path: Path, metadata: dict[str, str],
             others: tuple[dict[str, Any], ...] = ()) -> None:
        from neuroscribe.record.latent_cache import TensorFile

        # Our writer, not safetensors': its header (metadata included) is the same bytes in
        # every process, so runs on any number of ranks can be compared file for file.
        out = {k: v.numpy() for k, v in self.finished(others).items()}
        with TensorFile(path, {k: (v.dtype, v.shape) for k, v in out.items()}, metadata) as f:
            for k, v in out.items():
                f.write(k, 0, v)
