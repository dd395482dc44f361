"""Streaming statistics of the record stage against exact computations on all the data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroscribe.errors import UserError
from neuroscribe.record import units
from neuroscribe.record.core import QUANTILES, RecordConfig, UnitRecorder
from neuroscribe.record.moments import Moments
from neuroscribe.stats import TopK, float_keys


@pytest.fixture(autouse=True, params=[1, 10, 128], ids=lambda h: f"hold{h}")
def hold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs with batches recorded as they come, partly held back, and all held
    back (``units.HOLD_CONTEXTS``)."""
    monkeypatch.setattr(units, "HOLD_CONTEXTS", request.param)

# ---------------------------------------------------------------- Moments


def reference_moments(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"mean": x.mean(0), "variance": x.var(0),  # population variance (ddof=0)
            "skewness": scipy.stats.skew(x, axis=0, bias=True),
            "kurtosis": scipy.stats.kurtosis(x, axis=0, fisher=True, bias=True)}


@pytest.mark.parametrize("sizes", [[1, 7, 130, 2, 50], [300], [2, 1, 1, 1, 40], [64, 64, 64]])
def test_moments_match_scipy_on_concatenation(sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes) * 1000 + sum(sizes))
    n = sum(sizes)
    # a shifted normal, a skewed exponential, a heavy-tailed t, a far-offset uniform
    data = np.stack([rng.normal(3.0, 2.0, n), rng.exponential(1.5, n),
                     rng.standard_t(5, n), 1e3 + rng.uniform(-1, 1, n)], axis=1)
    m = Moments(data.shape[1])
    start = 0
    for b in sizes:
        m.update(data[start:start + b])
        start += b
    assert m.n == n
    got, want = m.finished(), reference_moments(data)
    for key in ("mean", "variance", "skewness", "kurtosis"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=0, err_msg=key)


def test_moments_hand_computed() -> None:
    # x = [0, 0, 0, 4] in two batches [0, 0] and [0, 4]
    # mean 1; deviations [-1,-1,-1,3]; m2 = 1+1+1+9 = 12 -> var 12/4 = 3
    # m3 = -1-1-1+27 = 24 -> skew = (24/4) / 3^1.5 = 6 / (3*sqrt 3) = 2/sqrt(3)
    # m4 = 1+1+1+81 = 84 -> kurt = (84/4) / 9 - 3 = 21/9 - 3 = -2/3
    m = Moments(1)
    m.update(np.array([[0.0], [0.0]]))
    m.update(np.array([[0.0], [4.0]]))
    out = m.finished()
    assert out["mean"][0] == pytest.approx(1.0, abs=1e-12)
    assert out["variance"][0] == pytest.approx(3.0, abs=1e-12)
    assert out["skewness"][0] == pytest.approx(2 / math.sqrt(3), abs=1e-12)
    assert out["kurtosis"][0] == pytest.approx(-2 / 3, abs=1e-12)


def test_moments_constant_unit_has_nan_shape_stats() -> None:
    m = Moments(2)
    m.update(np.array([[2.0, 1.0], [2.0, 3.0]]))
    m.update(np.array([[2.0, 5.0]]))
    out = m.finished()
    # unit 0 is constant 2: var 0, skewness and kurtosis undefined
    assert out["mean"][0] == 2.0 and out["variance"][0] == 0.0
    assert math.isnan(out["skewness"][0]) and math.isnan(out["kurtosis"][0])
    # unit 1 = [1,3,5]: mean 3, var (4+0+4)/3 = 8/3, symmetric -> skew 0
    assert out["mean"][1] == pytest.approx(3.0)
    assert out["variance"][1] == pytest.approx(8 / 3)
    assert out["skewness"][1] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- TopK


@st.composite
def topk_cases(draw: st.DrawFn) -> tuple[int, int, list[int], list[float], int]:
    n_units = draw(st.integers(1, 4))
    k = draw(st.integers(1, 7))
    sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=6))
    n = sum(sizes) * n_units
    # unique finite float32 scores, so the exact top-k is unambiguous
    scores = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=n, max_size=n, unique=True))
    return n_units, k, sizes, scores, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=80, deadline=None)
@given(topk_cases())
def test_topk_streaming_equals_exact_topk(case: tuple[int, int, list[int], list[float], int]
                                          ) -> None:
    n_units, k, sizes, flat, seed = case
    T = 3
    n = sum(sizes)
    rng = np.random.default_rng(seed)
    scores = torch.tensor(flat, dtype=torch.float32).reshape(n, n_units)
    acts = torch.from_numpy(rng.normal(size=(n, T, n_units)).astype(np.float32))
    tokens = torch.from_numpy(rng.integers(0, 1000, size=(n, T)).astype(np.int32))
    ctx = torch.from_numpy(rng.permutation(n).astype(np.int64) + 100)  # ids are not positions

    top = TopK(n_units, k, T)
    start = 0
    for b in sizes:
        sl = slice(start, start + b)
        top.update(float_keys(scores[sl], ctx[sl]), acts[sl], tokens[sl], ctx[sl])
        start += b
    out = top.finished("top")
    assert out["top_ctx"].shape == (n_units, k)
    assert out["top_acts"].shape == (n_units, k, T)
    assert out["top_tokens"].shape == (n_units, k, T)

    filled = min(k, n)
    for u in range(n_units):
        order = np.argsort(-scores[:, u].numpy(), kind="stable")[:filled]  # exact, best first
        assert out["top_ctx"][u, :filled].tolist() == ctx[order].tolist()
        assert (out["top_ctx"][u, filled:] == -1).all()  # slots never filled
        assert torch.equal(out["top_acts"][u, :filled], acts[order, :, u])
        assert torch.equal(out["top_tokens"][u, :filled], tokens[order])


def test_topk_hand_example() -> None:
    # one unit, k = 2; scores arrive as [1, 5] then [3, 4, 0]: the best two are 5 (ctx 11)
    # then 4 (ctx 21)
    top = TopK(1, 2, 1)
    for s, c in (([1.0, 5.0], [10, 11]), ([3.0, 4.0, 0.0], [20, 21, 22])):
        acts = torch.tensor(s)[:, None, None]  # the activation equals the score here
        top.update(float_keys(torch.tensor(s)[:, None], torch.tensor(c)), acts,
                   torch.tensor(c, dtype=torch.int32)[:, None], torch.tensor(c))
    out = top.finished("x")
    assert out["x_ctx"].tolist() == [[11, 21]]
    assert out["x_acts"].flatten().tolist() == [5.0, 4.0]
    assert out["x_tokens"].flatten().tolist() == [11, 21]


# ---------------------------------------------------------------- UnitRecorder

CFG = RecordConfig(n_top=3, n_random=4, n_quantile=2, quantile_warmup=20, ctx_len=5,
                   n_hist_bins=8, seed=0)
SIZES = [6, 9, 7, 11, 5]  # 38 contexts; the warm-up (20) ends inside the third batch (22)
U = 3


def feed(cfg: RecordConfig = CFG, sizes: list[int] = SIZES, seed: int = 0
         ) -> tuple[UnitRecorder, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(1234)
    n, T = sum(sizes), cfg.ctx_len
    # per-unit scale and offset; unit 2 is mostly negative
    acts = (torch.randn(n, T, U, generator=data) * torch.tensor([1.0, 3.0, 0.5])
            + torch.tensor([0.0, 1.0, -2.0]))
    tokens = torch.randint(0, 500, (n, T), generator=data, dtype=torch.int32)
    ctx = torch.arange(n, dtype=torch.int64)
    rec = UnitRecorder("layer.0", U, dataclasses.replace(cfg, seed=seed))
    start = 0
    for b in sizes:
        sl = slice(start, start + b)
        rec.update(acts[sl].clone(), tokens[sl].clone(), ctx[sl].clone())
        start += b
    return rec, acts, tokens, ctx


def valid(row: torch.Tensor) -> list[int]:
    return [c for c in row.tolist() if c >= 0]


def test_recorder_top_contexts_are_true_top() -> None:
    rec, acts, tokens, ctx = feed()
    out = rec.finished()
    ctx_max = acts.amax(dim=1)  # [N, U]
    for u in range(U):
        want = torch.argsort(ctx_max[:, u], descending=True)[: CFG.n_top]
        assert out["top_ctx"][u].tolist() == want.tolist()  # ctx id == row here
        assert torch.equal(out["top_acts"][u], acts[want, :, u])
        assert torch.equal(out["top_tokens"][u], tokens[want])


def test_recorder_random_sample_disjoint_from_top() -> None:
    rec, acts, tokens, _ = feed()
    out = rec.finished()
    assert out["random_ctx"].shape == (U, CFG.n_random)
    for u in range(U):
        rnd = out["random_ctx"][u].tolist()
        assert all(c >= 0 for c in rnd)  # 38 contexts - 3 top >= 4 random: all filled
        assert len(set(rnd)) == len(rnd)
        assert not set(rnd) & set(out["top_ctx"][u].tolist())
        assert torch.equal(out["random_acts"][u], acts[rnd, :, u])
        assert torch.equal(out["random_tokens"][u], tokens[rnd])


def test_recorder_random_sample_short_corpus() -> None:
    # 5 contexts, 3 of them top: only 2 can be random, the other slots stay empty (-1)
    rec, _, _, _ = feed(sizes=[2, 3])
    out = rec.finished()
    for u in range(U):
        rnd = valid(out["random_ctx"][u])
        assert sorted(rnd + out["top_ctx"][u].tolist()) == [0, 1, 2, 3, 4]
        assert out["random_ctx"][u].tolist().count(-1) == CFG.n_random - 2


def test_recorder_random_sample_is_seeded() -> None:
    a = feed(seed=7)[0].finished()["random_ctx"]
    b = feed(seed=7)[0].finished()["random_ctx"]
    assert torch.equal(a, b)


def bin_range(b: torch.Tensor, u: int, i: int) -> tuple[float, float]:
    """Bin i of unit u: [b_i, b_i+1), the first bin open below and the last open above."""
    lo = -math.inf if i == 0 else float(b[u, i])
    return lo, math.inf if i == len(QUANTILES) - 2 else float(b[u, i + 1])


def check_quantile_bins(out: dict[str, torch.Tensor], acts: torch.Tensor, n_warm: int) -> None:
    ctx_max = acts.amax(dim=1)  # [N, U]
    b = out["quantile_boundaries"]
    assert b.shape == (U, len(QUANTILES))
    # boundaries: quantiles (linear interpolation) of the warm-up contexts' maxima
    want = np.quantile(ctx_max[:n_warm].double().numpy(), QUANTILES, axis=0).T
    np.testing.assert_allclose(b.numpy(), want, rtol=1e-6, atol=1e-6)
    for i in range(len(QUANTILES) - 1):
        for u in range(U):
            lo, hi = bin_range(b, u, i)
            got = valid(out[f"q{i}_ctx"][u])
            assert len(set(got)) == len(got)
            for c in got:
                assert lo <= float(ctx_max[c, u]) < hi, (i, u, c)
            # every context of the corpus (warm-up ones too) was a candidate
            n_inside = int(((ctx_max[:, u] >= lo) & (ctx_max[:, u] < hi)).sum())
            assert len(got) == min(CFG.n_quantile, n_inside), (i, u)
            assert torch.equal(out[f"q{i}_acts"][u, : len(got)], acts[got, :, u])


def test_recorder_quantile_bins() -> None:
    rec, acts, _, _ = feed()
    check_quantile_bins(rec.finished(), acts, n_warm=CFG.quantile_warmup)  # exactly


def test_recorder_quantile_bins_exact_membership() -> None:
    # n_quantile >= number of contexts keeps every member of every bin, so each bin must be
    # exactly {c : b_i <= max_c < b_i+1}. A warm-up of 21 contexts puts the 0.5 and 0.9
    # quantiles exactly on data points (positions 0.5*20 = 10 and 0.9*20 = 18 of the sorted
    # maxima), which checks the bins are half-open: such a context belongs to the upper bin.
    cfg = RecordConfig(n_top=2, n_random=2, n_quantile=64, quantile_warmup=21, ctx_len=4,
                       n_hist_bins=4, seed=0)
    sizes = [10, 11, 8, 9]
    rec, acts, _, _ = feed(cfg, sizes)
    out = rec.finished()
    ctx_max = acts.amax(dim=1)
    b = out["quantile_boundaries"]
    for u in range(U):
        warm_sorted = ctx_max[:21, u].sort().values
        assert float(b[u, 1]) == float(warm_sorted[10])  # the median is a data point
        assert float(b[u, 2]) == float(warm_sorted[18])
        median_ctx = int((ctx_max[:21, u] == warm_sorted[10]).nonzero()[0, 0])
        assert median_ctx in valid(out["q1_ctx"][u])
        assert median_ctx not in valid(out["q0_ctx"][u])
        for i in range(len(QUANTILES) - 1):
            lo, hi = bin_range(b, u, i)
            want = ((ctx_max[:, u] >= lo) & (ctx_max[:, u] < hi)).nonzero()[:, 0].tolist()
            assert sorted(valid(out[f"q{i}_ctx"][u])) == want, (i, u)


def test_recorder_histogram_counts_every_token() -> None:
    rec, acts, _, _ = feed()
    out = rec.finished()
    n_tokens = sum(SIZES) * CFG.ctx_len  # 38 * 5 = 190, warm-up tokens included
    assert out["hist_counts"].shape == (U, CFG.n_hist_bins)
    assert out["hist_counts"].sum(1).tolist() == [n_tokens] * U
    # edges span the warm-up range: min activation .. max activation of the first 22 contexts
    warm = acts[:22]
    edges = out["hist_edges"]
    assert edges.shape == (U, CFG.n_hist_bins + 1)
    torch.testing.assert_close(edges[:, 0], warm.amin(dim=(0, 1)))
    torch.testing.assert_close(edges[:, -1], warm.amax(dim=(0, 1)))


def test_recorder_warmup_longer_than_corpus() -> None:
    # the warm-up never completes during update: finished() fixes the boundaries from all
    # contexts and replays them into the bins and the histogram
    cfg = RecordConfig(n_top=3, n_random=4, n_quantile=2, quantile_warmup=10_000, ctx_len=5,
                       n_hist_bins=8, seed=0)
    rec, acts, _, _ = feed(cfg)
    out = rec.finished()
    assert out["hist_counts"].sum(1).tolist() == [sum(SIZES) * cfg.ctx_len] * U
    check_quantile_bins(out, acts, n_warm=sum(SIZES))


def test_recorder_moments() -> None:
    rec, acts, _, _ = feed()
    out = rec.finished()
    x = acts.reshape(-1, U).double().numpy()
    want = reference_moments(x)
    for key in ("mean", "variance", "skewness", "kurtosis"):
        assert out[key].shape == (U,)
        np.testing.assert_allclose(out[key].double().numpy(), want[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_recorder_non_finite_names_unit(bad: float) -> None:
    rec = UnitRecorder("model.layers.3.mlp", U, CFG)
    acts = torch.zeros(4, CFG.ctx_len, U)
    acts[1, 2, 2] = bad
    ctx = torch.arange(40, 44)
    tokens = torch.zeros(4, CFG.ctx_len, dtype=torch.int32)
    rec.update(torch.ones(4, CFG.ctx_len, U), tokens, torch.arange(4))  # a clean batch first
    with pytest.raises(UserError, match=r"model\.layers\.3\.mlp unit 2, context 41, position 2"):
        rec.update(acts, tokens, ctx)  # checked at once, though the stores hold it back


# ---------------------------------------------------------------- quantile bins: coverage, keys


def feed_all(cfg: RecordConfig, acts: torch.Tensor, sizes: list[int],
             seed: int = 0) -> dict[str, torch.Tensor]:
    """acts [N, T, U] through a UnitRecorder in batches of ``sizes``; its finished tensors."""
    n, t, u = acts.shape
    tokens = torch.arange(n * t, dtype=torch.int32).reshape(n, t)
    rec = UnitRecorder("layer.0", u, dataclasses.replace(cfg, seed=seed))
    start = 0
    for b in sizes:
        sl = slice(start, start + b)
        rec.update(acts[sl].clone(), tokens[sl].clone(), torch.arange(start, start + b))
        start += b
    assert start == n
    return rec.finished()


def bins_of(out: dict[str, torch.Tensor], u: int) -> list[list[int]]:
    return [valid(out[f"q{i}_ctx"][u]) for i in range(len(QUANTILES) - 1)]


def test_contexts_outside_the_warmup_range_land_in_the_end_bins() -> None:
    # The warm-up (10 contexts) sees maxima 0..9 per unit. Later: a context far above the
    # warm-up maximum (100) must go to the top bin, one far below its minimum (-100) to the
    # bottom bin, and one inside the range to the bin its maximum falls in.
    cfg = RecordConfig(n_top=1, n_random=1, n_quantile=64, quantile_warmup=10, ctx_len=3,
                       n_hist_bins=4, seed=0)
    acts = torch.zeros(13, 3, 2)
    acts[:10, 1, :] = torch.arange(10.0)[:, None]  # context c has maximum c
    acts[10] = 100.0
    acts[11] = -100.0
    acts[12, 0, :] = 4.2
    out = feed_all(cfg, acts, [10, 3])
    for u in range(2):
        b = out["quantile_boundaries"][u].tolist()
        assert b[-1] < 100 and b[0] > -100  # fixed by the warm-up: both outliers are outside
        bins = bins_of(out, u)
        assert 10 in bins[-1], bins
        assert 11 in bins[0], bins
        assert 12 in bins[0]  # 4.2 < the median (4.5)
        assert 9 in bins[-1]  # the warm-up maximum itself (0.999 quantile 8.991 <= 9)


@pytest.mark.parametrize("warmup", [8, 20, 1000])
def test_quantile_bins_cover_every_context_exactly_once(warmup: int) -> None:
    # n_quantile >= contexts keeps every member of every bin: together they are all the
    # contexts, each in one bin, whether the warm-up ends early (8), mid-way (20) or never.
    cfg = RecordConfig(n_top=2, n_random=2, n_quantile=64, quantile_warmup=warmup, ctx_len=4,
                       n_hist_bins=4, seed=0)
    data = torch.Generator().manual_seed(99)
    acts = torch.randn(40, 4, U, generator=data) * torch.linspace(0.2, 3.0, 40)[:, None, None]
    out = feed_all(cfg, acts, [5, 7, 9, 11, 8])  # spread grows: later contexts fall outside
    for u in range(U):
        members = [c for ids in bins_of(out, u) for c in ids]
        assert sorted(members) == list(range(40)), (u, sorted(members))


def test_quantile_bins_do_not_reuse_the_random_sample_keys() -> None:
    # With the random sample's keys, every context of the random sample (n_top = 0: the
    # n_random best keys overall) is among the n_quantile best keys of its own bin, so it is
    # always in the bins' samples: the two samples overlap in all n_random contexts of every
    # unit. With keys of their own, a random context is in the union of the bins' samples
    # (4 bins x 4 of 400 contexts) with chance about 16/400.
    n, units, k = 400, 8, 4
    cfg = RecordConfig(n_top=0, n_random=k, n_quantile=k, quantile_warmup=n, ctx_len=2,
                       n_hist_bins=4, seed=3)
    data = torch.Generator().manual_seed(5)
    acts = torch.randn(n, 2, units, generator=data)
    out = feed_all(cfg, acts, [100] * 4, seed=3)
    overlap = 0
    for u in range(units):
        rnd = valid(out["random_ctx"][u])
        assert len(rnd) == k
        overlap += len(set(rnd) & {c for ids in bins_of(out, u) for c in ids})
    assert overlap <= units, f"{overlap} of {units * k} random contexts are also bin samples"


def test_quantile_bin_keys_are_a_stream_of_their_own() -> None:
    from neuroscribe.record.units import RANDOM_STREAM
    from neuroscribe.stats import BIN_STREAM, random_keys, stream_seed

    ctx = torch.arange(64)
    a = random_keys(stream_seed(11, RANDOM_STREAM), ctx, 3)
    b = random_keys(stream_seed(11, BIN_STREAM), ctx, 3)
    assert (a != b).all()
    # a pure function of (seed, context, unit): the same seed gives the same keys
    assert torch.equal(b, random_keys(stream_seed(11, BIN_STREAM), ctx, 3))
    assert torch.equal(b[10:20], random_keys(stream_seed(11, BIN_STREAM), ctx[10:20], 3))
    assert not torch.equal(b, random_keys(stream_seed(12, BIN_STREAM), ctx, 3))
