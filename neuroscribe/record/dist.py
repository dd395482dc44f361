"""``record`` across processes and machines with torch.distributed, and its checkpoints.

Under ``torchrun`` (WORLD_SIZE > 1) every rank reads the corpus, keeps the shards of contexts
whose number is its rank modulo the world size, and records them; rank 0 fixes the quantile
boundaries on the first contexts and sends them to every rank, then gathers every rank's
state and merges (``merge.py``). NCCL on GPUs, gloo on CPUs. One process: no process group,
nothing changes.

Checkpoints: at the end of a shard (at most every ``checkpoint_seconds``), each rank saves its
state and the shards it holds to ``RUN/record.partial/``. SAE latents write their spill files
under ``RUN/record.partial/latents/<attempt>-r<rank>/`` as they go; a checkpoint records their
lengths. ``record --resume`` loads the checkpoints, cuts a killed attempt's spills back to
them, skips their shards and merges everything at the end, whatever the number of ranks now
(the states merge exactly). With several machines, the run folder must be shared for
``--resume``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTIAL = "record.partial"


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    owned: bool = False  # init_ranks made the process group (``leave`` destroys it)

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank


def init_ranks(device: str) -> Ranks:
    """The process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        return Ranks(dist.get_rank(), dist.get_world_size(), owned=True)
    return Ranks(dist.get_rank(), dist.get_world_size())


def leave(ranks: Ranks) -> None:
    """Destroy the process group if ``init_ranks`` made it (a no-op in one process, and for
    a group the caller made)."""
    if ranks.owned:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast(obj: Any, ranks: Ranks) -> Any:
    """rank 0's ``obj`` on every rank."""
    if ranks.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (others get [])."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world if ranks.rank == 0 else []
    dist.gather_object(obj, out if ranks.rank == 0 else None, dst=0)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / PARTIAL).glob("*.pt"))


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def attempt_tag(done: set[int]) -> str:
    """The same on every rank of an attempt (all see the same checkpoints), new per attempt."""
    return hashlib.sha256(repr(sorted(done)).encode()).hexdigest()[:12]


def save_checkpoint(run_dir: Path, tag: str, ranks: Ranks, shards: list[int],
                    contexts: int, states: dict[str, Any],
                    spills: dict[str, Any] | None = None) -> None:
    """This rank's state so far; ``spills``: its SAE hookpoints' spill files and their
    lengths now (``LatentCache.snapshot``), which a resumed run merges."""
    import torch

    from neuroscribe.runs import atomic_path

    with atomic_path(run_dir / PARTIAL / f"{tag}-r{ranks.rank}.pt") as tmp:
        torch.save({"shards": sorted(shards), "contexts": contexts, "states": states,
                    "spills": spills or {}}, tmp)


def clear_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(run_dir / PARTIAL, ignore_errors=True)
