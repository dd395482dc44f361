"""``UnitRecorder.update`` holds small batches back and records them as one: the records are
those of recording every batch as it comes, and nothing held is lost at a shard's end, a
checkpoint or the finish."""

from __future__ import annotations

import pytest
import torch

from neuroscribe.record import units
from neuroscribe.record.core import RecordConfig
from neuroscribe.record.units import UnitRecorder

CFG = RecordConfig(n_top=3, n_random=2, n_quantile=2, quantile_warmup=12, ctx_len=4,
                   n_hist_bins=6, seed=7)
SIZES = [5, 3, 8, 1, 6, 9, 4]  # 36 contexts; the warm-up ends inside a batch


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for b in SIZES:
        out.append((torch.randn(b, 4, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]),
                    torch.randint(0, 50, (b, 4), generator=g, dtype=torch.int32),
                    torch.arange(start, start + b)))
        start += b
    return out


def record(hold: int, monkeypatch: pytest.MonkeyPatch, per_shard: int = 0
           ) -> dict[str, torch.Tensor]:
    """Batch i in shard i // per_shard (all in shard 0 if per_shard is 0)."""
    monkeypatch.setattr(units, "HOLD_CONTEXTS", hold)
    rec = UnitRecorder("h", 3, CFG)
    for i, (acts, tokens, ctx) in enumerate(batches()):
        rec.update(acts, tokens, ctx, shard=i // per_shard if per_shard else 0)
    return rec.finished()


@pytest.mark.parametrize("hold", [2, 10, 1000])
def test_held_batches_give_the_records_of_batch_by_batch(
        hold: int, monkeypatch: pytest.MonkeyPatch) -> None:
    want, got = record(1, monkeypatch), record(hold, monkeypatch)
    assert got.keys() == want.keys()
    for k in want:  # the moments too: they take each batch as it comes
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_batches_are_held_until_enough_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(units, "HOLD_CONTEXTS", 10)
    rec = UnitRecorder("h", 3, CFG)
    (a0, t0, c0), (a1, t1, c1), (a2, t2, c2) = batches()[:3]
    rec.update(a0, t0, c0)
    rec.update(a1, t1, c1)
    assert rec.n_seen == 0 and rec.moments[0].n == 8 * 4  # stores: held; moments: at once
    assert int((rec.top.ctx >= 0).sum()) == 0
    rec.update(a2, t2, c2)
    assert rec.n_seen == 16 and int((rec.top.ctx >= 0).sum()) == 3 * 3  # k 3 of 3 units


def test_a_batch_over_the_byte_limit_is_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(units, "HOLD_BYTES", 5 * 4 * 3 * 4)  # 5 contexts of float32
    rec = UnitRecorder("h", 3, CFG)
    acts, tokens, ctx = batches()[0]  # 5 contexts
    rec.update(acts, tokens, ctx)
    assert rec.n_seen == 5


def test_a_checkpoint_mid_run_records_what_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    want = record(1, monkeypatch, per_shard=3)
    monkeypatch.setattr(units, "HOLD_CONTEXTS", 1000)
    rec = UnitRecorder("h", 3, CFG)
    bs = batches()
    for i, b in enumerate(bs):
        rec.update(*b, shard=i // 3)
        if i in (3, 5):  # past the warm-up, as a checkpoint at the end of a shard is
            st = rec.state()
            assert int(st["hist"].sum()) == sum(SIZES[:i + 1]) * 4 * 3
            assert rec.n_seen == sum(SIZES[:i + 1])
    got = rec.finished()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_the_finish_records_what_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(units, "HOLD_CONTEXTS", 1000)
    rec = UnitRecorder("h", 3, CFG)
    acts, tokens, ctx = batches()[0]
    rec.update(acts, tokens, ctx)
    out = rec.finished()
    top = acts.amax(1).argmax(0)  # each unit's best context
    assert out["top_ctx"][:, 0].tolist() == top.tolist()
    assert int(out["hist_counts"].sum()) == acts.numel()


@pytest.mark.parametrize("numba", [True, False])
def test_a_range_float32_cannot_split_counts_into_bin_0(
        numba: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A constant unit at 2e7 (lo + 1 == lo in float32): its bins would be NaN; the numba
    kernel then wrote out of bounds (a segfault), torch's bincount raised."""
    from neuroscribe.record import kernels

    if numba:
        pytest.importorskip("numba")
    monkeypatch.setattr(kernels, "ENABLED", numba)
    cfg = RecordConfig(n_top=2, n_random=2, n_quantile=1, quantile_warmup=4, ctx_len=3,
                       n_hist_bins=8, seed=0)
    rec = UnitRecorder("h", 2, cfg)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        acts = torch.randn(4, 3, 2, generator=g)
        acts[..., 1] = 2e7
        rec.update(acts, torch.zeros(4, 3, dtype=torch.int32), torch.arange(4 * step, 4 * step + 4))
    hist = rec.finished()["hist_counts"]
    assert hist[1].tolist() == [36] + [0] * 7
    assert int(hist[0].sum()) == 36
