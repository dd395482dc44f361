"""The record stage's fast paths give what the plain computations give: float32 moments,
quantiles from a float32 sort, rows gathered from a transposed batch, and merging a store's
own tensors without copying them first."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuroscribe.record.core import RecordConfig
from neuroscribe.record.units import UnitRecorder
from neuroscribe.stats import QUANTILES, Moments, TopK, float_keys, quantiles


def f64_moments(batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    m = Moments(batches[0].shape[1])
    for b in batches:
        m.update(b.double())  # float64 input: the float64 path
    return m.finished()


def test_float32_moments_match_float64_on_the_same_values() -> None:
    g = torch.Generator().manual_seed(0)
    n, sizes = 4096, [1000, 7, 2048, 1041]
    cols = [torch.randn(n, generator=g) * 2 + 3,  # shifted normal
            torch.empty(n).exponential_(1.5, generator=g),  # skewed
            1e3 + torch.rand(n, generator=g) * 2 - 1,  # far from zero, narrow
            torch.distributions.StudentT(5.0).sample((n,)),  # heavy tails
            torch.relu(torch.randn(n, generator=g)) * 1e-3]  # mostly zero, tiny
    x = torch.stack(cols, 1).float()
    x[2048:, 0] += 5  # the mean moves between batches
    batches = list(x.split(sizes))
    m = Moments(x.shape[1])
    for b in batches:
        m.update(b)  # float32: the one-pass path
    got, want = m.finished(), f64_moments(batches)
    std = np.sqrt(want["variance"])
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=0, atol=1e-6 * std.max())
    for key in ("variance", "skewness", "kurtosis"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_float32_moments_of_a_constant_unit_have_exactly_zero_spread() -> None:
    m = Moments(2)
    m.update(torch.tensor([[0.1, 1.0], [0.1, 2.0], [0.1, 4.0]]))
    m.update(torch.tensor([[0.1, 8.0]]))
    out = m.finished()
    assert out["variance"][0] == 0.0 and out["mean"][0] == np.float32(0.1)
    assert math.isnan(out["skewness"][0]) and math.isnan(out["kurtosis"][0])
    assert out["mean"][1] == pytest.approx(3.75)
    assert out["variance"][1] == pytest.approx(np.var([1.0, 2.0, 4.0, 8.0]))


def test_float32_moments_fall_back_to_float64_when_a_power_overflows() -> None:
    # (2e10)**4 = 1.6e41 is beyond float32 (3.4e38): the float64 path takes the batch
    x = torch.tensor([[0.0], [2e10], [4e10], [1e10]])
    m = Moments(1)
    assert m._batch32(x) is None
    m.update(x)
    got, want = m.finished(), f64_moments([x])
    for key in ("mean", "variance", "skewness", "kurtosis"):
        assert np.isfinite(got[key]).all(), key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)


@pytest.mark.parametrize("n", [1, 2, 7, 256, 301])
def test_quantiles_equal_torch_quantile_in_float64(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(50, n, generator=g)
    x[:10] = 0.0  # ties
    x[10:20] = x[10:20].round()
    want = torch.quantile(x.double(), torch.tensor(QUANTILES, dtype=torch.float64), dim=1).T
    assert torch.equal(quantiles(x, QUANTILES), want)


def test_topk_rows_from_a_transposed_batch_equal_the_strided_gather() -> None:
    g = torch.Generator().manual_seed(1)
    u, t, b = 6, 5, 8
    plain, fast = TopK(u, 3, t), TopK(u, 3, t)
    for step in range(4):
        acts = torch.randn(b, t, u, generator=g)
        tokens = torch.randint(0, 50, (b, t), generator=g, dtype=torch.int32)
        ctx = torch.arange(step * b, (step + 1) * b)
        keys = float_keys(acts.amax(1), ctx)
        plain.update(keys, acts, tokens, ctx)
        fast.update(keys, acts, tokens, ctx, acts.transpose(1, 2).contiguous())
    for name, value in plain.state().items():
        assert torch.equal(value, fast.state()[name]), name
    assert plain.acts.abs().sum() > 0


def test_finishing_without_copies_leaves_the_store_as_it_was() -> None:
    cfg = RecordConfig(n_top=3, n_random=2, n_quantile=2, quantile_warmup=8, ctx_len=4,
                       n_hist_bins=5, seed=3)
    g = torch.Generator().manual_seed(2)
    rec = UnitRecorder("h", 3, cfg)
    for step in range(5):
        rec.update(torch.randn(4, 4, 3, generator=g),
                   torch.randint(0, 9, (4, 4), generator=g, dtype=torch.int32),
                   torch.arange(step * 4, step * 4 + 4))
    before = rec.state(copy=True)
    assert rec.state(copy=False)["top"]["acts"] is rec.top.acts  # no slot empty: not copied
    fast = rec.finished()
    again = rec.state(copy=True)
    for store in ("top", "random", "bins"):
        for name, value in before[store].items():
            assert torch.equal(value, again[store][name]), (store, name)
    from neuroscribe.record.merge import finish_units

    slow = finish_units(cfg, [before])
    assert fast.keys() == slow.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_batches_record_as_their_float32_widening(dtype: torch.dtype) -> None:
    """A bf16/fp16 subject's activations are not copied to float32 first; every statistic
    widens them where it reads them, which is exact: the records equal those of the float32
    copy, byte for byte."""
    cfg = RecordConfig(n_top=3, n_random=2, n_quantile=2, quantile_warmup=8, ctx_len=4,
                       n_hist_bins=5, seed=1)
    g = torch.Generator().manual_seed(5)
    half, wide = UnitRecorder("h", 3, cfg), UnitRecorder("h", 3, cfg)
    for step in range(5):
        acts = (torch.randn(4, 4, 3, generator=g) * 3 + 1).to(dtype)
        acts[0, 0, 0] = 1.0 + 2.0 ** -7  # lo + 1 must not round in half precision
        tokens = torch.randint(0, 9, (4, 4), generator=g, dtype=torch.int32)
        ctx = torch.arange(step * 4, step * 4 + 4)
        half.update(acts, tokens, ctx)
        wide.update(acts.float(), tokens, ctx)
    got, want = half.finished(), wide.finished()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, equal_nan=True, msg=k)
