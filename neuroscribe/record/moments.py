"""Streaming mean, variance, skewness and kurtosis per unit, batch by batch, mergeable across
shards and ranks (Pebay's pairwise update)."""

from __future__ import annotations

from typing import Any

import numpy as np

from neuroscribe.stats import scratch

BLOCK = 1 << 19  # elements per block of Moments.batch: 4 MiB as float64
BLOCK32 = 1 << 22  # elements per block of the float32 path (16 MiB): few, large ops (see _batch32)


class Moments:
    """Streaming mean, variance, skewness and kurtosis per unit (Pebay's pairwise update).

    Each batch's central sums are taken first (``batch``), then merged into the running
    float64 state (``merge``); ``update`` does both. A float32 (or bf16, fp16) batch is summed
    about a shift near its mean in one pass (``_batch32``): by the numba kernel in float64
    (``kernels.power_sums``), else by torch in float32; any other dtype in float64.
    """

    def __init__(self, n_units: int) -> None:
        self.n = 0
        self.mean = np.zeros(n_units)
        self.m2 = np.zeros(n_units)
        self.m3 = np.zeros(n_units)
        self.m4 = np.zeros(n_units)
        self._bufs: dict[str, Any] = {}

    def batch(self, x: Any) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rows, mean, sum d^2, sum d^3, sum d^4) of x [N, U], with d = x - mean, in float64.

        A NaN or Inf anywhere in a unit's column makes that unit's mean non-finite. The rows
        go through in blocks of about BLOCK elements, so that the float64 temporaries stay in
        cache (twice as fast as whole-batch passes).
        """
        import torch

        x = torch.as_tensor(x)
        if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and len(x):
            sums = self._batch32(x)
            if sums is not None:
                return sums
        nb, n_units = x.shape
        blocks = x.split(max(1, BLOCK // max(n_units, 1)))
        mb = torch.zeros(n_units, dtype=torch.float64)
        for c in blocks:
            mb += scratch(self._bufs, "d", c.shape, torch.float64).copy_(c).sum(0)
        mb /= max(nb, 1)
        sums = torch.zeros((3, n_units), dtype=torch.float64)
        for c in blocks:
            d = scratch(self._bufs, "d", c.shape, torch.float64).copy_(c).sub_(mb)
            d2 = torch.mul(d, d, out=scratch(self._bufs, "d2", c.shape, torch.float64))
            sums[0] += d2.sum(0)
            sums[1] += d.mul_(d2).sum(0)
            sums[2] += d2.mul_(d2).sum(0)
        m2b, m3b, m4b = sums.numpy()
        return nb, mb.numpy(), m2b, m3b, m4b

    def _batch32(self, x: Any) -> tuple[int, np.ndarray, np.ndarray, np.ndarray,
                                        np.ndarray] | None:
        """``batch`` of a float32 x [N, U] in one pass: sums of the powers of y = x - K, K a
        float32 shift per unit (the running mean; on the first batch, the first rows' median,
        an actual value), made central in float64.

        With numba (``kernels.power_sums``) every step is in float64. Otherwise torch sums
        per block of rows in float32, as follows.
        x - K is exact wherever x is within a factor of 2 of K (Sterbenz), so a unit far from
        zero keeps its spread and a constant unit has exactly zero spread; what is lost is the
        float32 rounding of sums over one block of rows (relative ~1e-7). None when a power
        overflowed float32 with the mean finite: the float64 path takes that batch.

        Blocks are large (BLOCK32): between forward passes each op pays a fixed start-up cost
        on the thread pool, so a few whole-batch ops beat many cache-sized ones there
        (bench/record.py: ~3.6 against ~8 ms per 2048 x 1536 batch), though not in a loop.
        """
        import torch

        from neuroscribe.record import kernels

        nb, n_units = x.shape
        shift = torch.from_numpy(self.mean).float() if self.n else x[:64].median(0).values.float()
        fast = kernels.power_sums(x, shift.numpy())  # the same sums, in float64, one pass
        if fast is not None:
            s = torch.from_numpy(fast)
        else:
            s = torch.zeros((4, n_units), dtype=torch.float64)
            for c in x.split(max(1, BLOCK32 // max(n_units, 1))):
                y = torch.sub(c, shift, out=scratch(self._bufs, "y", c.shape, torch.float32))
                y2 = torch.mul(y, y, out=scratch(self._bufs, "y2", c.shape, torch.float32))
                s[0] += y.sum(0)
                s[1] += y2.sum(0)
                s[2] += y.mul_(y2).sum(0)
                s[3] += y2.mul_(y2).sum(0)
        s1, s2, s3, s4 = s.numpy()
        if np.isfinite(s1).all() and not np.isfinite(s[1:].numpy()).all():
            return None
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf: the caller's error
            mu = s1 / nb  # the batch mean's offset from the shift
            m2 = s2 - s1 * mu
            m3 = s3 - 3 * mu * s2 + 2 * nb * mu**3
            m4 = s4 - 4 * mu * s3 + 6 * mu**2 * s2 - 3 * nb * mu**4
        return nb, shift.double().numpy() + mu, np.maximum(m2, 0.0), m3, np.maximum(m4, 0.0)

    def merge(self, nb: int, mb: np.ndarray, m2b: np.ndarray, m3b: np.ndarray,
              m4b: np.ndarray) -> None:
        if nb == 0:
            return
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        m2a, m3a = self.m2, self.m3
        self.m4 = (self.m4 + m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                   + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
                   + 4 * delta * (na * m3b - nb * m3a) / n)
        self.m3 = (m3a + m3b + delta**3 * na * nb * (na - nb) / n**2
                   + 3 * delta * (na * m2b - nb * m2a) / n)
        self.m2 = m2a + m2b + delta**2 * na * nb / n
        self.mean = self.mean + delta * nb / n
        self.n = n

    def update(self, x: Any) -> None:
        """x [N, U]: a numpy array or torch tensor of any float dtype (left unchanged)."""
        self.merge(*self.batch(x))

    def state(self) -> np.ndarray:
        """[5, U] float64: count, mean and the central sums of powers 2 to 4."""
        return np.stack([np.full_like(self.mean, self.n), self.mean, self.m2, self.m3, self.m4])

    def merge_state(self, st: Any) -> None:
        st = np.asarray(st, dtype=np.float64)
        if len(st[0]):
            self.merge(int(st[0][0]), st[1], st[2], st[3], st[4])

    def finished(self) -> dict[str, np.ndarray]:
        """Population variance, skewness and excess kurtosis (scipy's bias=True defaults)."""
        n = max(self.n, 1)
        var = self.m2 / n
        with np.errstate(divide="ignore", invalid="ignore"):
            skew = np.where(var > 0, (self.m3 / n) / var**1.5, np.nan)
            kurt = np.where(var > 0, (self.m4 / n) / var**2 - 3.0, np.nan)
        return {"mean": self.mean, "variance": var, "skewness": skew, "kurtosis": kurt}
