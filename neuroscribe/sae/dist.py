"""Data-parallel SAE training across processes with torch.distributed: the process group, the
DDP wrapper around a training step, and the few collectives the loop needs besides DDP's own
gradient averaging.

Every rank reads the same global batch and keeps its rows ``[r * B / N, (r + 1) * B / N)``;
the loss of each rank is scaled so that DDP's average of the per-rank gradients is the
gradient of the global batch's loss. Then every rank takes the same Adam step and renormalises
the same decoder, so the parameters stay identical (``check_in_sync`` checks this at each
checkpoint and re-broadcasts rank 0's copy if they ever drift). One process (no ``WORLD_SIZE``
or ``WORLD_SIZE=1``) uses none of this: ``Comm()`` is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from neuroscribe.errors import UserError

log = logging.getLogger("neuroscribe")


@dataclass(frozen=True)
class Comm:
    """This process's place in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def current(cls) -> Comm:
        """The initialised default group, if any; else one process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def shard(self, x: Any) -> Any:
        """This rank's contiguous rows of a global batch (which must split evenly)."""
        if not self.active:
            return x
        if len(x) % self.world:
            raise UserError(f"a global batch of {len(x)} tokens does not split evenly over "
                            f"{self.world} processes")
        b = len(x) // self.world
        return x[self.rank * b:(self.rank + 1) * b]

    def all_reduce(self, t: Any, op: str = "sum") -> Any:
        import torch.distributed as dist

        if self.active:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                   "max": dist.ReduceOp.MAX}[op])
        return t

    def gather(self, t: Any) -> Any:
        """Equal-sized tensors of every rank, concatenated along dim 0 in rank order."""
        import torch.distributed as dist

        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.active:
            dist.barrier()

    def fired_and_bad(self, fired: Any, loss: Any) -> tuple[Any, bool]:
        """Latents fired on any rank's tokens, and whether any rank's loss is not finite: one
        all_reduce of the fired counts with a NaN flag on the end (so that every rank stops
        together rather than waiting on a rank that stopped)."""
        bad = ~torch.isfinite(loss.detach())
        if not self.active:
            return fired, bool(bad)
        counts = torch.cat([fired.to(torch.int32), bad.to(torch.int32).reshape(1)])
        self.all_reduce(counts)
        return counts[:-1] > 0, bool(counts[-1] > 0)

    def mean_floats(self, values: list[float], device: Any = "cpu") -> list[float]:
        """The mean over ranks of a few logged numbers (reduced on ``device``: NCCL needs
        CUDA tensors)."""
        if not self.active:
            return values
        t = self.all_reduce(torch.tensor(values, dtype=torch.float64, device=device))
        return (t / self.world).tolist()


@contextmanager
def session(device: str) -> Iterator[tuple[Comm, str]]:
    """Join the group torchrun describes (``WORLD_SIZE`` > 1): NCCL for CUDA devices, gloo
    otherwise; a CUDA device becomes ``cuda:LOCAL_RANK``. Yields the Comm and the device, and
    leaves the group on the way out. Without torchrun: one process, the device unchanged."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield Comm.current(), device
        return
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Comm.current(), device
    finally:
        dist.destroy_process_group()


class _Stepper(torch.nn.Module):
    """A module whose forward is one training step's forward pass, for DDP to wrap."""

    def __init__(self, sae: Any, step_fn: Any, cfg: Any) -> None:
        super().__init__()
        self.sae, self.step_fn, self.cfg = sae, step_fn, cfg

    def forward(self, x: Any, run: dict[str, Any]) -> Any:
        return self.step_fn(self.sae, x, run, self.cfg)


def stepper(sae: Any, step_fn: Any, cfg: Any, comm: Comm) -> Any:
    """``f(x, run) -> Step``: the step itself for one process; under a group, the step inside
    DistributedDataParallel, which averages the gradients over ranks during backward.
    Buffers are not broadcast: batchtopk's threshold is reduced in its step."""
    module = _Stepper(sae, step_fn, cfg)
    if not comm.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [sae.device] if sae.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


@torch.no_grad()
def check_in_sync(sae: Any, optim: Any, comm: Comm) -> bool:
    """Whether every rank holds the same parameters (compared by a float64 checksum of each);
    if not, log it and copy rank 0's parameters and Adam state to all. Returns True if they
    were already in sync."""
    if not comm.active:
        return True
    import torch.distributed as dist

    params = list(sae.parameters())
    sums = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in params])
    lo = comm.all_reduce(sums.clone(), "min")
    hi = comm.all_reduce(sums.clone(), "max")
    if torch.equal(lo, hi):
        return True
    log.warning("SAE parameters drifted apart across ranks (max checksum gap %.3g); "
                "re-broadcasting rank 0's", float((hi - lo).abs().max()))
    for p in params:
        dist.broadcast(p.data, 0)
        for buf in optim.state.get(p, {}).values():
            if torch.is_tensor(buf):
                dist.broadcast(buf, 0)
    for b in sae.buffers():
        dist.broadcast(b, 0)
    return False
