"""SAEs: metric formulas, k-sparse invariants, planted-dictionary recovery, dead latents,
save/load/resume round trips, and the errors for bad input."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from neuroscribe.errors import UserError
from neuroscribe.sae.acts import ActsConfig, shuffled, store_batches, tensor_batches, write_store
from neuroscribe.sae.eval import ce_loss_recovered, spliced_metrics, train_sae_stage
from neuroscribe.sae.losses import STEPS
from neuroscribe.sae.model import Sae, SaeConfig, fvu, l0_of, load_sae
from neuroscribe.sae.train import (
    TrainSaeConfig,
    geometric_median,
    init_sae,
    load_checkpoint,
    resample_dead,
    train_sae,
)


def planted(n_tokens: int, d: int = 32, m: int = 64, active: float = 4, seed: int = 0,
            sample_seed: int | None = None) -> tuple[Any, Any]:
    """Tokens made of a planted dictionary D [m, d]: ~``active`` atoms per token. ``seed``
    draws D (and, by default, the tokens after it); a ``sample_seed`` draws other tokens from
    the same D: held-out data."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed + 1_000_003)
    mask = torch.rand(n_tokens, m, generator=g) < active / m
    coef = mask * (torch.rand(n_tokens, m, generator=g) + 0.5)
    return coef @ D, D


# ---- formulas against hand-computed values ------------------------------------------------

def test_metric_formulas_match_hand_computed_values() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); sum of squared deviations = 4
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # squared error 1 + 1 = 2
    assert fvu(x, x_hat) == pytest.approx(0.5)
    assert l0_of(torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])) == pytest.approx(2.0)
    assert ce_loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 4.0, 4.0) == 0.0


def test_geometric_median_resists_an_outlier() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(x)
    assert gm.norm() < 1.5 < x.mean(0).norm()


def test_spliced_metrics_on_a_real_tiny_model(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    sae = Sae(SaeConfig(d_in=64, n_latents=64, architecture="relu"))
    with torch.no_grad():  # an exact identity SAE: latents = relu(x), decoder = I
        sae.W_enc.copy_(torch.eye(64))
        sae.W_dec.copy_(torch.eye(64))
    hp = "transformer.h.0.mlp.act"  # GELU outputs can be negative: relu(x) is not exact
    m = spliced_metrics(model, hp, sae, ids)
    assert m["kl_sae"] >= 0 and m["kl_zero_ablate"] > 0
    # the clean CE, computed by transformers itself (shifted labels, mean over tokens)
    with torch.no_grad():
        assert m["ce_clean"] == pytest.approx(float(model(input_ids=ids, labels=ids).loss),
                                              rel=1e-5)
    # ce_loss_recovered against hand-computed values: tests/test_sae_reference.py
    hp_in = "transformer.h.0.mlp.c_proj:input"
    sae_id = Sae(SaeConfig(d_in=64, n_latents=128, architecture="relu"))
    with torch.no_grad():  # x = relu(x) - relu(-x): exact for any sign
        sae_id.W_enc.copy_(torch.cat([torch.eye(64), -torch.eye(64)], 1))
        sae_id.W_dec.copy_(torch.cat([torch.eye(64), -torch.eye(64)], 0))
    exact = spliced_metrics(model, hp_in, sae_id, ids)
    assert exact["kl_sae"] == pytest.approx(0, abs=1e-6)
    assert exact["ce_sae"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)


# ---- k-sparse invariants --------------------------------------------------------------------

def _trained_like(arch: str, k: int = 4, n: int = 64, d: int = 16) -> Sae:
    sae = Sae(SaeConfig(d_in=d, n_latents=n, architecture=arch, k=k))
    init_sae(sae, torch.randn(256, d), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every pre-activation positive: the rule alone decides
    return sae


def test_topk_keeps_exactly_k_latents_per_token() -> None:
    sae = _trained_like("topk", k=5)
    lat = sae.encode(torch.randn(100, 16))
    assert ((lat != 0).sum(1) == 5).all()
    cfg = TrainSaeConfig(architecture="topk", d_in=16, n_latents=64, k=5)
    step = STEPS["topk"](sae, torch.randn(100, 16), {"step": 0,
                         "dead": torch.zeros(64, dtype=torch.bool)}, cfg)
    assert step.l0 == 5


def test_batchtopk_keeps_k_per_token_on_average_over_the_batch() -> None:
    sae = _trained_like("batchtopk", k=5)
    cfg = TrainSaeConfig(architecture="batchtopk", d_in=16, n_latents=64, k=5)
    x = torch.randn(100, 16)
    step = STEPS["batchtopk"](sae, x, {"step": 0, "dead": torch.zeros(64, dtype=torch.bool)},
                              cfg)
    assert step.l0 == 5  # 500 active over 100 tokens
    assert float(sae.threshold) > 0  # the inference threshold was estimated


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_gradient_of_sparse_backward_matches_dense_autograd(arch: str) -> None:
    """The sparse backward (topk, batchtopk) gives the gradients dense autograd would."""
    torch.manual_seed(0)
    sae = _trained_like(arch, k=3, n=32, d=8)
    with torch.no_grad():
        sae.b_enc.normal_()
    cfg = TrainSaeConfig(architecture=arch, d_in=8, n_latents=32, k=3, auxk_alpha=0)
    x = torch.randn(20, 8)
    STEPS[arch](sae, x, {"step": 0, "dead": torch.zeros(32, dtype=torch.bool)},
                cfg).loss.backward()
    sparse = {k: p.grad.clone() for k, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
    with torch.no_grad():
        lat = sae.encode(x)  # the same selection, inference rule
        if arch == "batchtopk":
            flat = pre.relu().reshape(-1).topk(20 * 3).indices
            keep = torch.zeros(pre.numel(), dtype=torch.bool)
            keep[flat] = True
            keep = keep.reshape(pre.shape) & (pre > 0)
        else:
            keep = lat != 0
    if arch in ("topk", "batchtopk"):
        x_hat = (pre * keep) @ sae.W_dec + sae.b_dec
        ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).backward()
        for k in ("W_enc", "b_enc", "b_dec", "W_dec"):
            torch.testing.assert_close(sparse[k], getattr(sae, k).grad, atol=1e-5, rtol=1e-4)
    else:
        assert set(sparse) >= {"W_enc", "b_enc", "W_dec", "b_dec"}


def test_k_larger_than_the_dictionary_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="k = 100 must be between 1 and n_latents = 64"):
        Sae(SaeConfig(d_in=8, n_latents=64, architecture="topk", k=100))
    with pytest.raises(UserError, match="architecture 'gated' unknown"):
        SaeConfig(d_in=8, architecture="gated").check()


# ---- training: recovery, dead latents -------------------------------------------------------

@pytest.mark.parametrize("arch,extra", [("topk", {}), ("relu", {"l1_coeff": 0.3})])
def test_a_planted_dictionary_is_recovered(arch: str, extra: dict[str, float]) -> None:
    x, D = planted(200_000)
    cfg = TrainSaeConfig(architecture=arch, n_latents=128, k=4, batch_size=512, lr=1e-2,
                         log_every=500, dead_tokens=50_000, **extra)
    sae, _ = train_sae(cfg, tensor_batches(x, 512, seed=0), d_in=32)
    cos = (D @ sae.W_dec.T).max(1).values  # best latent per true atom
    assert float((cos > 0.9).float().mean()) >= 0.9


@pytest.mark.parametrize("arch,extra", [("batchtopk", {}), ("jumprelu", {"l0_coeff": 0.03})])
def test_the_other_rules_learn_a_sparse_code(arch: str, extra: dict[str, float]) -> None:
    """batchtopk and jumprelu on the planted data: a good fit at about the planted L0."""
    x, D = planted(200_000)
    cfg = TrainSaeConfig(architecture=arch, n_latents=128, k=4, batch_size=512, lr=1e-2,
                         log_every=500, dead_tokens=50_000, **extra)
    sae, _ = train_sae(cfg, tensor_batches(x, 512, seed=0), d_in=32)
    held, D_held = planted(4096, seed=0, sample_seed=1)  # the same dictionary, new tokens
    assert torch.equal(D_held, D)
    lat = sae.encode(held)
    assert fvu(held, sae.decode(lat)) < 0.3
    assert 2 <= l0_of(lat) <= 8


def _weak_half(d: int = 16, n: int = 64, k: int = 2) -> tuple[Sae, Any]:
    """Half the latents have encoder columns 20x too short: they lose every top-k contest, so
    without help they never fire and never get a gradient (dead by construction)."""
    x, _ = planted(20_000, d=d, m=32, active=2)
    sae = Sae(SaeConfig(d_in=d, n_latents=n, architecture="topk", k=k))
    init_sae(sae, x[:512], seed=0)
    with torch.no_grad():
        sae.W_enc[:, n // 2:] *= 0.05
    return sae, x


def _fires(sae: Sae, x: Any) -> Any:
    return (sae.encode(x) > 0).any(0)


@pytest.mark.parametrize("alpha", [0.0, 1 / 32])
def test_auxk_revives_latents_that_top_k_starves(alpha: float) -> None:
    sae, x = _weak_half()
    assert not _fires(sae, x)[32:].any()  # the weak half is dead at the start
    cfg = TrainSaeConfig(architecture="topk", n_latents=64, k=2, auxk_alpha=alpha)
    optim = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for batch in tensor_batches(x, 256, seed=0, epochs=2):
        step = STEPS["topk"](sae, batch, {"step": 1, "dead": ~_fires(sae, batch)}, cfg)
        optim.zero_grad()
        step.loss.backward()
        sae.remove_parallel_grads()
        optim.step()
        sae.normalize_decoder()
    revived = float(_fires(sae, x)[32:].float().mean())
    if alpha == 0:
        assert revived == 0.0  # no gradient ever reaches them
    else:
        assert revived >= 0.1  # measured: 0.125 (4 of 32) after two epochs


def test_resampling_revives_dead_relu_latents_and_resets_their_adam_state() -> None:
    x, _ = planted(4096, d=16, m=32, active=2)
    sae = Sae(SaeConfig(d_in=16, n_latents=64, architecture="relu"))
    init_sae(sae, x[:512], seed=0)
    optim = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.b_enc.sum().backward()
    optim.step()  # Adam now has moments for every latent
    with torch.no_grad():
        sae.b_enc[:20] = -100.0  # dead by construction
    dead = ~_fires(sae, x)
    assert int(dead.sum()) == 20
    n = resample_dead(sae, optim, x[:512], sae(x[:512]).detach(), dead,
                      torch.Generator().manual_seed(0))
    assert n == 20
    assert int((~_fires(sae, x)).sum()) < 5  # the resampled latents fire on the data
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    assert (optim.state[sae.b_enc]["exp_avg"][:20] == 0).all()
    assert (optim.state[sae.b_enc]["exp_avg"][20:] != 0).all()


# ---- save, load, resume -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_save_and_load_give_identical_outputs(arch: str, tmp_path: Path) -> None:
    x, _ = planted(4096, d=16, m=16)
    cfg = TrainSaeConfig(architecture=arch, n_latents=48, k=3, batch_size=256, lr=1e-2)
    sae, _ = train_sae(cfg, tensor_batches(x * 7.0, 256, seed=0), d_in=16, out=tmp_path)
    again = load_sae(tmp_path)
    probe = x[:50] * 7.0
    torch.testing.assert_close(again.encode(probe), sae.encode(probe), rtol=0, atol=0)
    torch.testing.assert_close(again(probe), sae(probe), rtol=0, atol=0)
    assert fvu(probe, sae(probe)) < 0.9  # the folded input scale works on raw activations


def test_resume_continues_to_the_same_weights(tmp_path: Path) -> None:
    x, _ = planted(8192, d=16, m=16)
    cfg = TrainSaeConfig(architecture="relu", n_latents=48, batch_size=256, lr=1e-2,
                         checkpoint_every=10, resample_every=15, dead_tokens=256)
    straight, _ = train_sae(cfg, tensor_batches(x, 256, seed=3), d_in=16, out=tmp_path / "a")
    first = tensor_batches(x, 256, seed=3)
    train_sae(cfg, (b for _, b in zip(range(20), first)), d_in=16, out=tmp_path / "b")
    assert load_checkpoint(tmp_path / "b")["state"]["step"] == 20
    resumed, m = train_sae(cfg, tensor_batches(x, 256, seed=3, start_step=20), d_in=16,
                           out=tmp_path / "b", resume=True)
    assert m["steps"] == 32
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


def test_a_corrupted_checkpoint_is_detected_and_not_loaded(tmp_path: Path) -> None:
    x, _ = planted(2048, d=16, m=16)
    cfg = TrainSaeConfig(architecture="topk", n_latents=32, k=2, batch_size=256)
    train_sae(cfg, tensor_batches(x, 256, seed=0), d_in=16, out=tmp_path)
    data = bytearray((tmp_path / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        train_sae(cfg, tensor_batches(x, 256, seed=0), d_in=16, out=tmp_path, resume=True)


def test_nan_loss_stops_reports_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path: Path) -> None:
    x, _ = planted(256 * 12, d=16, m=16)

    def batches() -> Iterator[Any]:
        for i, b in enumerate(tensor_batches(x, 256, seed=0)):
            yield b * math.nan if i == 7 else b

    cfg = TrainSaeConfig(architecture="topk", n_latents=32, k=2, batch_size=256,
                         checkpoint_every=5)
    with pytest.raises(UserError, match=r"at step 7: .*last good checkpoint \(step 5\)"):
        train_sae(cfg, batches(), d_in=16, out=tmp_path)
    ck = load_checkpoint(tmp_path)
    assert ck["state"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in ck["sae"].values())


def test_activations_of_the_wrong_width_are_a_clear_error() -> None:
    cfg = TrainSaeConfig(architecture="topk", n_latents=32, k=2, batch_size=4)
    with pytest.raises(UserError, match="width 8, the SAE expects d_in=16"):
        train_sae(cfg, iter([torch.randn(4, 8)]), d_in=16)


# ---- activation sources and the stage ---------------------------------------------------------

def test_a_store_replays_the_same_batches_and_skips_exactly(tmp_path: Path) -> None:
    chunks = [torch.randn(100, 4) for _ in range(10)]
    passed = list(write_store(iter(chunks), tmp_path, shard_tokens=250))
    assert all(torch.equal(a, b) for a, b in zip(passed, chunks))
    full = list(store_batches(tmp_path, 32, seed=1, window=2))
    assert len(full) == 600 // 32 + 400 // 32  # shards of 300, 300, 300, 100 in pairs
    tail = list(store_batches(tmp_path, 32, seed=1, window=2, start_step=10))
    assert all(torch.equal(a, b) for a, b in zip(tail, full[10:])) and len(tail) == len(full) - 10
    seen = torch.cat(full)
    assert len(torch.unique(seen, dim=0)) == len(seen)  # no token twice in an epoch


def test_shuffled_batches_mix_contexts_and_lose_at_most_a_remainder() -> None:
    chunks = [torch.full((10, 1), float(i)) for i in range(20)]
    out = list(shuffled(iter(chunks), 8, buffer_tokens=50, seed=0))
    assert all(len(b) == 8 for b in out) and len(out) == 200 // 8
    assert len(torch.unique(out[0])) > 1


def test_train_sae_stage_streams_from_a_model_and_writes_everything(
        tiny_model: Path, corpus_file: Path, tmp_path: Path) -> None:
    acts = ActsConfig(model=str(tiny_model), hookpoint="transformer.h.1.mlp.act",
                      corpus=str(corpus_file), max_tokens=4096, ctx_len=16, eval_tokens=512,
                      shuffle_tokens=1024, store=str(tmp_path / "store"))
    cfg = TrainSaeConfig(architecture="topk", n_latents=128, k=8, batch_size=256, log_every=4)
    m = train_sae_stage(acts, cfg, tmp_path / "sae")
    out = tmp_path / "sae"
    for name in ("cfg.json", "sae.safetensors", "metrics.json", "metrics.png", "checkpoint.pt"):
        assert (out / name).exists(), name
    # 4096 tokens at 15 of every 16 positions (the first is skipped), less shuffle remainders
    assert 12 <= m["steps"] <= 16 and m["held_out"]["n_tokens"] == 512
    assert 0 < m["held_out"]["fvu"] < 1 and m["held_out"]["l0"] <= 8
    assert m["spliced"]["ce_zero_ablate"] != m["spliced"]["ce_clean"]
    assert load_sae(out).cfg.hookpoint == "transformer.h.1.mlp.act"
    assert (tmp_path / "store" / "store.json").exists()
    again = train_sae_stage(acts, cfg, tmp_path / "sae2")  # now read from the store
    assert again["steps"] == len(list(store_batches(tmp_path / "store", 256, seed=0)))
    with pytest.raises(UserError, match="already holds an SAE"):
        train_sae_stage(acts, cfg, out)


# ---- SAEs saved by SAELens and sparsify ----------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "sae_formats"


@pytest.mark.parametrize("name", ["sparsify_topk", "saelens_standard", "saelens_jumprelu",
                                  "saelens_topk", "saelens_topk_rescaled"])
def test_saes_saved_by_other_libraries_load_and_agree_with_them(name: str) -> None:
    """Each fixture holds the library's own files and its own encode/decode outputs."""
    import json

    want = json.loads((FIXTURES / name / "expected.json").read_text())
    sae = load_sae(FIXTURES / name)
    x = torch.tensor(want["inputs"])
    lat = sae.encode(x)
    torch.testing.assert_close(lat, torch.tensor(want["latents"]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.decode(lat), torch.tensor(want["reconstructions"]),
                               atol=1e-5, rtol=1e-4)


def test_unreadable_sae_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="SAE folder not found"):
        load_sae(tmp_path / "missing")
    with pytest.raises(UserError, match="no cfg.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(UserError, match="no sae.safetensors"):
        load_sae(tmp_path)
