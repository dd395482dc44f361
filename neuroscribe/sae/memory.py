"""Keep freed tensor memory in the process, so that a training step's tensors reuse it.

Each step of ``train-sae`` allocates and frees tensors of tens of MiB (the dense gradients of
``W_enc`` and ``W_dec``, their temporaries). glibc serves blocks that large with ``mmap`` and
returns them to the kernel when freed, so every step faults its memory in again, page by page:
under a hypervisor a 25 MiB tensor costs tens of ms that way. Raising glibc's mmap and trim
thresholds keeps such blocks on the heap. Measured with bench/sae.py (2 cores, d_in 1536, 4096
latents, k 32, batch 1024): +7 % tokens/s in fp32, +17 % in bf16 (docs/benchmarks.md).

Process-wide, so only ``train-sae`` turns it on (``launch.train_sae_command``), not an import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit; larger blocks still mmap
TRIM_THRESHOLD = 1 << 30  # free heap kept before trimming


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False (and nothing done) elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
