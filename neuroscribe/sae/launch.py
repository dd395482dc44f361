"""The ``train-sae`` command in one process or under torchrun.

- ``neuroscribe train-sae ...``: one process, one SAE (as always).
- ``torchrun --nproc-per-node N -m neuroscribe train-sae ...``: one SAE, data-parallel (DDP);
  ``--batch-size`` is per rank, so a step sees N x batch-size tokens.
- ``... train-sae --distribute-hookpoints --hookpoint A,B,C``: one SAE per hookpoint, each
  trained whole by one rank (hookpoint i by rank i mod N), into ``OUT/<hookpoint>``, as
  EleutherAI sparsify's ``--distribute_modules``. In one process they train one after another.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.runs import write_json
from neuroscribe.sae.acts import ActsConfig
from neuroscribe.sae.dist import Comm, session
from neuroscribe.sae.train import TrainSaeConfig

log = logging.getLogger("neuroscribe")
GLOB = set("*?[")


def hookpoint_folder(hookpoint: str) -> str:
    """A hookpoint's sub-folder name (``:`` is not safe on every file system)."""
    return hookpoint.replace(":", "-")


def expand_hookpoints(acts: ActsConfig) -> list[str]:
    """The comma-separated hookpoints, with globs resolved against the model (loaded only if
    there is a glob)."""
    patterns = [p.strip() for p in acts.hookpoint.split(",") if p.strip()]
    if not any(GLOB & set(p) for p in patterns):
        return list(dict.fromkeys(patterns))
    from neuroscribe.models import load_subject, resolve_hookpoints

    return resolve_hookpoints(load_subject(acts.model).model, patterns)


def assign(hookpoints: list[str], comm: Comm) -> list[str]:
    """This rank's hookpoints: the i-th goes to rank i mod world."""
    return [h for i, h in enumerate(hookpoints) if i % comm.world == comm.rank]


def train_distributed_hookpoints(acts: ActsConfig, cfg: TrainSaeConfig, out: Path,
                                 resume: bool, comm: Comm) -> list[tuple[Path, dict[str, Any]]]:
    """Each rank trains its hookpoints' SAEs alone (no DDP), one after another."""
    from neuroscribe.sae.eval import train_sae_stage

    hookpoints = expand_hookpoints(acts)
    if not hookpoints:
        raise UserError("--distribute-hookpoints: --hookpoint names no hookpoint")
    if len(hookpoints) < comm.world:
        log.warning("%d hookpoints for %d ranks: ranks %d.. have nothing to train",
                    len(hookpoints), comm.world, len(hookpoints))
    if comm.rank == 0:
        write_json(out / "hookpoints.json", {h: {"folder": hookpoint_folder(h),
                                                 "rank": i % comm.world}
                                             for i, h in enumerate(hookpoints)})
    done = []
    for hp in assign(hookpoints, comm):
        sub = hookpoint_folder(hp)
        store = str(Path(acts.store) / sub) if acts.store else ""
        one = replace(acts, hookpoint=hp, store=store, distribute_hookpoints=False)
        m = train_sae_stage(one, replace(cfg, hookpoint=hp), out / sub, resume, comm=Comm())
        done.append((out / sub, m))
    comm.barrier()
    return done


def train_sae_command(acts: ActsConfig, cfg: TrainSaeConfig, out: Path,
                      resume: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """Join torchrun's group if there is one, train, and return the (folder, metrics) of the
    SAEs this process reports: all of its own with --distribute-hookpoints, else the one SAE
    on rank 0 and nothing on the others."""
    from neuroscribe.sae.eval import train_sae_stage
    from neuroscribe.sae.memory import keep_freed_memory

    keep_freed_memory()
    with session(cfg.device) as (comm, device):
        cfg = replace(cfg, device=device)
        if acts.distribute_hookpoints:
            return train_distributed_hookpoints(acts, cfg, out, resume, comm)
        if "," in acts.hookpoint:
            raise UserError("several hookpoints: pass --distribute-hookpoints to train one "
                            "SAE for each")
        m = train_sae_stage(acts, cfg, out, resume, comm=comm)
        return [(out, m)] if comm.rank == 0 else []
