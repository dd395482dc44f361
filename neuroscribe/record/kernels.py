"""One-pass CPU kernels (numba) for the two whole-batch steps of ``record``: the power sums
behind the moments and the histogram counts. Optional (``pip install neuroscribe[fast]``):
without numba, or for tensors it does not take, ``moments.Moments`` and ``UnitRecorder`` use
their torch paths. Those give the same moments to float rounding, and the same counts except
for a value on a bin edge, which float rounding (torch may fuse the multiply-add) can put in
either neighbouring bin.

Each kernel splits the units into blocks, one block per task on numba's threads, and reads
each row of the block once. bf16 comes in as its raw 16 bits and is widened exactly here.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import numpy as np

BLOCK = 128  # units per task: their float64 sums (4 KiB) and int32 counts stay in L1
ENABLED = os.environ.get("NEUROSCRIBE_NUMBA", "1") != "0"  # 0: the torch paths only


@cache
def _kernels() -> tuple[Any, Any] | None:
    try:
        import numba
    except ImportError:
        return None
    from numba import prange

    @numba.njit(inline="always")
    def load_row(x: Any, r: int, u0: int, n: int, bits: Any, vals: Any, is_bf16: bool) -> None:
        """Row r, units u0 .. u0 + n, as float32 into vals (bits: the same memory)."""
        if is_bf16:  # a bf16 is the high 16 bits of the float32 of the same value
            for j in range(n):
                bits[j] = np.uint32(np.uint16(x[r, u0 + j])) << np.uint32(16)
        else:
            for j in range(n):
                vals[j] = x[r, u0 + j]

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def power_sums(x: Any, shift: Any, out: Any, is_bf16: bool) -> None:
        n_rows, n_units = x.shape
        for blk in prange((n_units + BLOCK - 1) // BLOCK):
            u0 = blk * BLOCK
            n = min(BLOCK, n_units - u0)
            acc = np.zeros((4, BLOCK))
            bits = np.zeros(BLOCK, np.uint32)
            vals = bits.view(np.float32)
            for r in range(n_rows):
                load_row(x, r, u0, n, bits, vals, is_bf16)
                for j in range(n):
                    y = np.float64(vals[j]) - np.float64(shift[u0 + j])
                    y2 = y * y
                    acc[0, j] += y
                    acc[1, j] += y2
                    acc[2, j] += y2 * y
                    acc[3, j] += y2 * y2
            for j in range(n):
                for p in range(4):
                    out[p, u0 + j] = acc[p, j]

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def histogram(x: Any, scale: Any, bias: Any, n_bins: int, hist: Any, is_bf16: bool) -> None:
        n_rows, n_units = x.shape
        top = np.float32(n_bins - 1)
        for blk in prange((n_units + BLOCK - 1) // BLOCK):
            u0 = blk * BLOCK
            n = min(BLOCK, n_units - u0)
            idx = np.zeros(BLOCK, np.int32)
            h = np.zeros(BLOCK * n_bins, np.int32)  # in L1 (int32: 32 KiB at 64 bins)
            bits = np.zeros(BLOCK, np.uint32)
            vals = bits.view(np.float32)
            for r in range(n_rows):
                load_row(x, r, u0, n, bits, vals, is_bf16)
                for j in range(n):  # as torch.addcmul(bias, x, scale), clamped, truncated
                    p = vals[j] * scale[u0 + j]
                    p = p + bias[u0 + j]
                    p = min(p if p >= 0 else np.float32(0), top)  # NaN: bin 0
                    idx[j] = np.int32(p) + j * n_bins
                for j in range(n):
                    h[idx[j]] += 1
            for i in range(n * n_bins):
                hist[u0 * n_bins + i] += h[i]

    return power_sums, histogram


def _raw(x: Any) -> tuple[np.ndarray, bool] | None:
    """x [N, U] as a numpy array the kernels take (bf16 as int16 bits), or None."""
    import numba
    import torch

    if x.device.type != "cpu" or x.dim() != 2 or not x.is_contiguous():
        return None
    # as many threads as torch uses (fewer, e.g., for several ranks on one machine)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    if x.dtype == torch.float32:
        return x.numpy(), False
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy(), True
    if x.dtype == torch.float16:  # numba has no float16 arithmetic: a float32 copy (exact)
        return x.float().numpy(), False
    return None


def power_sums(x: Any, shift: Any) -> np.ndarray | None:
    """float64 [4, U]: the column sums of y, y^2, y^3, y^4 with y = x - shift, all in
    float64, or None where the kernel does not apply."""
    k = _kernels() if ENABLED else None
    raw = None if k is None else _raw(x)
    if raw is None:
        return None
    out = np.empty((4, x.shape[1]))
    k[0](raw[0], np.ascontiguousarray(shift, dtype=np.float32), out, raw[1])
    return out


def histogram(x: Any, scale: Any, bias: Any, hist: Any) -> bool:
    """Count x [N, U] into hist [U, bins] (int64, contiguous), bin floor(x * scale + bias)
    clamped to the end bins; False where the kernel does not apply."""
    k = _kernels() if ENABLED else None
    raw = None if k is None or not hist.is_contiguous() else _raw(x)
    if raw is None:
        return False
    k[1](raw[0], scale.numpy(), bias.numpy(), hist.shape[1], hist.view(-1).numpy(), raw[1])
    return True
