"""The record stage's fast paths give what the plain computations give: float32 moments,
quantiles from a float32 sort, rows gathered from a transposed batch, and merging a store's
own tensors without copying them first."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuroscribe.record import kernels, units
from neuroscribe.record.core import RecordConfig
from neuroscribe.record.moments import Moments
from neuroscribe.record.units import UnitRecorder
from neuroscribe.stats import QUANTILES, Part, TopK, float_keys, gather_rows, quantiles


@pytest.fixture(params=["numba", "torch"])
def paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test runs with the numba kernels (where numba is installed) and without."""
    if request.param == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(kernels, "ENABLED", request.param == "numba")


@pytest.fixture(params=[1, 10, 128], ids=lambda h: f"hold{h}")
def hold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorder test runs with batches recorded as they come, partly held back, and all held
    back (``units.HOLD_CONTEXTS``)."""
    monkeypatch.setattr(units, "HOLD_CONTEXTS", request.param)


def f64_moments(batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    m = Moments(batches[0].shape[1])
    for b in batches:
        m.update(b.double())  # float64 input: the float64 path
    return m.finished()


@pytest.mark.usefixtures("paths")
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


@pytest.mark.usefixtures("paths")
def test_float32_moments_hand_computed() -> None:
    # x = [1, 1, 1, 5]: the shift is the first rows' (lower) median, 1, so y = [0, 0, 0, 4]:
    # s1 = 4, s2 = 16, s3 = 64, s4 = 256, n = 4, mu = s1 / n = 1, mean = 1 + 1 = 2.
    # m2 = s2 - s1 mu = 12; m3 = s3 - 3 mu s2 + 2 n mu^3 = 64 - 48 + 8 = 24;
    # m4 = s4 - 4 mu s3 + 6 mu^2 s2 - 3 n mu^4 = 256 - 256 + 96 - 12 = 84
    # (the deviations from 2 are [-1, -1, -1, 3]: 12, 24 and 84 directly).
    m = Moments(1)
    n, mean, m2, m3, m4 = m._batch32(torch.tensor([[1.0], [1.0], [1.0], [5.0]]))
    assert (n, mean[0], m2[0], m3[0], m4[0]) == (4, 2.0, 12.0, 24.0, 84.0)
    # a second batch [2, 2] shifts by the running mean 2: y = [0, 0], all sums 0
    m.merge(n, mean, m2, m3, m4)
    m.update(torch.tensor([[2.0], [2.0]]))
    out = m.finished()  # x = [1, 1, 1, 5, 2, 2]: mean 2, deviations [-1, -1, -1, 3, 0, 0]
    assert out["mean"][0] == 2.0 and out["variance"][0] == 2.0  # 12 / 6
    assert out["skewness"][0] == pytest.approx((24 / 6) / 2**1.5, abs=1e-12)
    assert out["kurtosis"][0] == pytest.approx((84 / 6) / 4 - 3, abs=1e-12)


@pytest.mark.usefixtures("paths")
def test_histogram_bins_hand_computed() -> None:
    # edges 0..4 in 4 bins of width 1; below and above the range go to the end bins
    cfg = RecordConfig(n_hist_bins=4, ctx_len=1)
    rec = UnitRecorder("h", 2, cfg)
    rec.set_boundaries(torch.zeros(2, len(QUANTILES)),
                       torch.stack([torch.linspace(0, 4, 5), torch.linspace(-2, 2, 5)]))
    x = torch.tensor([[-1.0, -3.0], [0.0, -2.0], [0.5, -1.0], [1.0, 0.5], [3.99, 1.99],
                      [4.0, 2.0], [10.0, 9.0]])
    rec._histogram(x)
    assert rec.hist.tolist() == [[3, 1, 0, 3],  # -1, 0, 0.5 | 1 | 3.99, 4, 10
                                 [2, 1, 1, 3]]  # -3, -2 | -1 | 0.5 | 1.99, 2, 9


@pytest.mark.usefixtures("paths")
def test_float32_moments_of_a_constant_unit_have_exactly_zero_spread() -> None:
    m = Moments(2)
    m.update(torch.tensor([[0.1, 1.0], [0.1, 2.0], [0.1, 4.0]]))
    m.update(torch.tensor([[0.1, 8.0]]))
    out = m.finished()
    assert out["variance"][0] == 0.0 and out["mean"][0] == np.float32(0.1)
    assert math.isnan(out["skewness"][0]) and math.isnan(out["kurtosis"][0])
    assert out["mean"][1] == pytest.approx(3.75)
    assert out["variance"][1] == pytest.approx(np.var([1.0, 2.0, 4.0, 8.0]))


@pytest.mark.usefixtures("paths")
def test_float32_moments_fall_back_to_float64_when_a_power_overflows() -> None:
    # (2e10)**4 = 1.6e41 is beyond float32 (3.4e38): the float64 path takes the batch (the
    # numba kernel sums in float64: no overflow)
    x = torch.tensor([[0.0], [2e10], [4e10], [1e10]])
    m = Moments(1)
    assert (m._batch32(x) is None) == (not kernels.ENABLED)
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
        fast.update(keys, [Part(acts, acts.transpose(1, 2).contiguous())], tokens, ctx)
    for name, value in plain.state().items():
        assert torch.equal(value, fast.state()[name]), name
    assert plain.acts.abs().sum() > 0


def test_rows_from_several_parts_equal_those_of_the_joined_batch() -> None:
    g = torch.Generator().manual_seed(4)
    sizes, t, u = [3, 1, 5, 2], 4, 6
    whole = torch.randn(sum(sizes), t, u, generator=g).to(torch.bfloat16)
    chunks = whole.split(sizes)
    parts = [Part(c, c.transpose(1, 2).contiguous() if i % 2 else None)
             for i, c in enumerate(chunks)]  # rows and strided columns, mixed
    b = torch.tensor([10, 0, 3, 3, 9, 4, 2, 8, 5, 1])
    uu = torch.tensor([5, 0, 1, 2, 3, 4, 5, 0, 1, 2])
    got = gather_rows(parts, b, uu)
    assert got.dtype == torch.float32
    assert torch.equal(got, whole[b, :, uu].float())
    assert torch.equal(gather_rows(parts, b[:0], uu[:0]), torch.empty(0, t))


@pytest.mark.usefixtures("hold", "paths")
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


@pytest.mark.usefixtures("hold", "paths")
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


@pytest.mark.integration
def test_fast_paths_on_real_smollm2_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model's layer-3 MLP activations (SmolLM2-135M GGUF, real tokenizer): the
    one-pass moments agree with float64 ones on the same values, the transposed gather with
    the strided one, and the whole recorder with the numba kernels with the torch paths."""
    import neuroscribe.models as models

    try:
        models.default_model_path()
    except Exception as e:  # noqa: BLE001 - the model package is an optional install
        pytest.skip(str(e))
    subject = models.load_subject("smollm2")
    hp = models.resolve_hookpoints(subject.model, ["model.layers.3.mlp.act_fn"])
    text = " ".join(["To be, or not to be, that is the question:"] * 200)
    ids = torch.tensor(subject.tokenizer(text)["input_ids"][:8 * 64]).view(8, 64)
    with models.capture(subject.model, hp) as store, torch.inference_mode():
        acts = models.run_to_hooks(subject.model, ids, store)[hp[0]].float()
    x = acts.reshape(-1, acts.shape[-1])
    fast = Moments(x.shape[1])
    for b in x.split(128):
        fast.update(b)
    got, want = fast.finished(), f64_moments(list(x.split(128)))
    std = np.sqrt(want["variance"])
    assert std.max() > 0
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=0, atol=1e-6 * std.max())
    live = want["variance"] > 1e-8 * want["variance"].max()
    for key in ("variance", "skewness", "kurtosis"):
        np.testing.assert_allclose(got[key][live], want[key][live], rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    plain, quick = TopK(x.shape[1], 4, 64), TopK(x.shape[1], 4, 64)
    keys = float_keys(acts.amax(1), torch.arange(8))
    tokens = ids.to(torch.int32)
    plain.update(keys, acts, tokens, torch.arange(8))
    quick.update(keys, [Part(acts, acts.transpose(1, 2).contiguous())], tokens, torch.arange(8))
    assert torch.equal(plain.acts, quick.acts) and plain.acts.abs().sum() > 0
    if kernels._kernels() is None:
        return  # numba is not installed: nothing to compare the torch paths with
    cfg = RecordConfig(n_top=3, n_random=2, n_quantile=1, quantile_warmup=4, ctx_len=64,
                       n_hist_bins=64, seed=0)
    out = {}
    for numba in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", numba)
        rec = UnitRecorder("h", acts.shape[-1], cfg)
        for i in range(0, 8, 2):  # the warm-up ends after the second batch
            rec.update(acts[i:i + 2], tokens[i:i + 2], torch.arange(i, i + 2))
        out[numba] = rec.finished()
    hist, hist_torch = out[True]["hist_counts"], out[False]["hist_counts"]
    assert int(hist.sum()) == acts.numel() and int((hist > 0).sum(1).min()) > 1
    # bin edges: a fused multiply-add in torch may put an edge value in the next bin
    assert int((hist - hist_torch).abs().sum()) <= 2e-4 * acts.numel()
    for k, v in out[False].items():
        if k.endswith(("_ctx", "_acts", "_tokens")):
            assert torch.equal(out[True][k], v), k
        elif k in ("mean", "variance"):
            torch.testing.assert_close(out[True][k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numba_kernels_against_plain_numpy(dtype: torch.dtype,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' sums against float64 numpy, and their bins against float32 numpy doing
    floor(x * scale + bias) as written (a multiply, then an add: no fused multiply-add)."""
    pytest.importorskip("numba")
    monkeypatch.setattr(kernels, "ENABLED", True)
    g = torch.Generator().manual_seed(9)
    n, u, nb = 300, 130, 16  # a unit block and a remainder (kernels.BLOCK = 128)
    x = (torch.randn(n, u, generator=g) * torch.linspace(0.1, 5, u) + 2).to(dtype)
    shift = torch.linspace(-1, 3, u)
    sums = kernels.power_sums(x, shift.numpy())
    y = (x.double() - shift.double()).numpy()
    want = np.stack([(y ** p).sum(0) for p in (1, 2, 3, 4)])
    np.testing.assert_allclose(sums, want, rtol=1e-12, atol=1e-9)
    lo, hi = torch.full((u,), 0.0), torch.full((u,), 4.0)
    scale = nb / (hi - lo)
    bias = -lo * scale
    hist = torch.zeros(u, nb, dtype=torch.int64)
    assert kernels.histogram(x, scale, bias, hist)
    xf = x.float().numpy()
    pos = np.clip((xf * scale.numpy()).astype(np.float32) + bias.numpy(), 0, nb - 1)
    want_h = np.zeros((u, nb), np.int64)
    for j in range(u):
        np.add.at(want_h[j], pos[:, j].astype(np.int64), 1)
    assert hist.numpy().tolist() == want_h.tolist()
    assert hist.sum() == n * u and hist[:, 0].sum() > 0 and hist[:, -1].sum() > 0


def test_kernels_decline_what_they_do_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(4, 3)
    hist = torch.zeros(3, 2, dtype=torch.int64)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert kernels.power_sums(x, np.zeros(3, np.float32)) is None
    assert not kernels.histogram(x, torch.ones(3), torch.zeros(3), hist)
    monkeypatch.setattr(kernels, "ENABLED", True)
    pytest.importorskip("numba")
    assert kernels.power_sums(x.T, np.zeros(4, np.float32)) is None  # not contiguous
    assert kernels.power_sums(x.double(), np.zeros(3, np.float32)) is None
    assert not kernels.histogram(x.double(), torch.ones(3), torch.zeros(3), hist)
    assert not kernels.histogram(x, torch.ones(3), torch.zeros(3), hist.T.contiguous().T)
    assert kernels.histogram(x, torch.ones(3), torch.zeros(3), hist)  # this one it takes
    assert hist[:, 1].tolist() == [4, 4, 4]
