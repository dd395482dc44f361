"""Recorder states and their exact merge: what lets ``record`` split a corpus across ranks
(torch.distributed) and resume from a checkpoint, with the same result as one pass.

A state is plain tensors: each exemplar store's slots (int64 keys, unique per unit, so the
merged top-k is one exact set), the histogram counts (added), the quantile boundaries and
histogram edges (every rank uses rank 0's), and the moments of each shard of contexts
(merged in shard order, so the float64 rounding does not depend on who read which shard).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from neuroscribe.record.moments import Moments
from neuroscribe.stats import (
    EMPTY,
    QUANTILES,
    gather_slots,
    merge_order,
    merge_states,
    split_groups,
)

N_BINS = len(QUANTILES) - 1


def merge_moments(states: list[dict[str, Any]], n_units: int) -> Moments:
    """The moments of all shards, merged in shard order."""
    per_shard = sorted((int(s), m) for st in states
                       for s, m in zip(st["moment_shards"].tolist(), st["moments"]))
    shards = [s for s, _ in per_shard]
    if len(set(shards)) != len(shards):
        raise ValueError(f"a shard was recorded twice: {sorted(shards)}")
    total = Moments(n_units)
    for _, m in per_shard:
        total.merge_state(m.numpy())
    return total


def pick_random(states: list[dict[str, Any]], k: int, top_ctx: Any,
                n_random: int) -> dict[str, Any]:
    """The random sample: of the merged best-keyed ``k`` (``n_random + n_top``), the first
    ``n_random`` that are not top contexts of the unit (the random store keeps ``n_top``
    more for that). The slots are picked first and copied once."""
    import torch

    cat, best = merge_order(states, k)
    rnd_ctx = cat["ctx"].gather(1, best).masked_fill(cat["keys"].gather(1, best) == EMPTY, -1)
    clash = (rnd_ctx[:, :, None] == top_ctx[:, None, :]).any(-1) | (rnd_ctx < 0)
    pick = torch.sort(clash.to(torch.int8), dim=1, stable=True).indices[:, :n_random]
    out = gather_slots(cat, best.gather(1, pick))
    gone = clash.gather(1, pick)
    if gone.any():
        out["ctx"][gone] = -1
        out["acts"][gone] = 0.0
        out["tokens"][gone] = 0
    return {"random_ctx": out["ctx"], "random_acts": out["acts"], "random_tokens": out["tokens"]}


def finish_units(cfg: Any, states: list[dict[str, Any]]) -> dict[str, Any]:
    """The records file's tensors (``UnitRecorder``'s layout) from one or more states."""
    import torch

    n_units = int(states[0]["hist"].shape[0])
    out = split_groups(merge_states([s["top"] for s in states], cfg.n_top), n_units, "top")
    out.update(pick_random([s["random"] for s in states], cfg.n_top + cfg.n_random,
                           out["top_ctx"], cfg.n_random))
    bins = merge_states([s["bins"] for s in states], cfg.n_quantile)
    out.update(split_groups(bins, n_units, *(f"q{i}" for i in range(N_BINS))))
    moments = merge_moments(states, n_units).finished()
    out.update({k: torch.from_numpy(v.astype(np.float32)) for k, v in moments.items()})
    out["quantile_boundaries"] = states[0]["boundaries"]
    out["hist_edges"] = states[0]["hist_edges"]
    out["hist_counts"] = sum(s["hist"] for s in states)
    return {k: v.contiguous() for k, v in out.items()}


def moments_state(per_shard: dict[int, Moments]) -> dict[str, Any]:
    import torch

    shards = sorted(per_shard)
    n_units = len(next(iter(per_shard.values())).mean) if per_shard else 0
    stacked = (np.stack([per_shard[s].state() for s in shards]) if shards
               else np.zeros((0, 5, n_units)))
    return {"moments": torch.from_numpy(stacked),
            "moment_shards": torch.tensor(shards, dtype=torch.int64)}
