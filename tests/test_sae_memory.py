"""train-sae keeps freed tensor memory on the heap (glibc), instead of mmap-ing it afresh."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
import torch
from neuroscribe.sae.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
t = torch.empty(24 << 18)  # 24 MiB, as W_enc's gradient at d_in 1536, 4096 latents
print(libc.mallinfo2().hblkhd - before)  # bytes served by mmap
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_gradient_sized_tensor_comes_from_the_heap_after_keep_freed_memory() -> None:
    def mmapped(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.split()[-1])

    assert mmapped("default") >= 24 << 20  # glibc's default: an mmap of its own
    assert mmapped("keep") == 0
