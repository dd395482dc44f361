"""SAE losses, gradients, activation rules and metrics against values computed by hand (or with
plain torch ops from the papers' formulas), never against the implementation's own outputs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from neuroscribe.errors import UserError
from neuroscribe.sae.acts import ActsConfig, model_chunks
from neuroscribe.sae.eval import _eval_ids, ce_loss_recovered, spliced_metrics, train_sae_stage
from neuroscribe.sae.losses import STEPS
from neuroscribe.sae.model import Sae, SaeConfig, load_sae
from neuroscribe.sae.train import TrainSaeConfig, train_sae


def _sae(arch: str, W_enc: list[list[float]], W_dec: list[list[float]], k: int = 1) -> Sae:
    """An SAE with the given weights and zero biases."""
    d, n = len(W_enc), len(W_enc[0])
    sae = Sae(SaeConfig(d_in=d, n_latents=n, architecture=arch, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_enc))
        sae.W_dec.copy_(torch.tensor(W_dec))
    return sae


def _grads(sae: Sae) -> dict[str, Any]:
    return {k: p.grad.clone() for k, p in sae.named_parameters() if p.grad is not None}


# ---- AuxK (Gao et al. 2024, appendix B.1; sparsify's order of operations) -----------------

def _auxk_example() -> tuple[Sae, Any, Any]:
    """d_in 4, three latents, k = 1; latent 2 is dead and reads 0.5 x the third input unit.

    x = (3, 0, 1, 0) and (0, 2, 0, 1): pre-activations (3, 0, 0.5) and (0, 2, 0); top-1 keeps
    latent 0, then latent 1, so the residuals are (0, 0, 1, 0) and (0, 0, 0, 1). The total
    variance about the mean (1.5, 1, 0.5, 0.5) is 2 x 3.75 = 7.5.
    """
    eye = torch.eye(4)
    W_enc = torch.stack([eye[0], eye[1], 0.5 * eye[2]], 1).tolist()
    W_dec = [eye[0].tolist(), eye[1].tolist(), eye[2].tolist()]
    x = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    return _sae("topk", W_enc, W_dec), x, torch.tensor([False, False, True])


def test_auxk_loss_matches_a_hand_computed_value() -> None:
    # One dead latent, k_aux = d_in // 2 = 2: scale = min(1 / 2, 1) = 0.5, then k_aux = 1.
    # e_hat = relu(0.5, 0) x W_dec[2] = (0, 0, 0.5, 0) and 0; |e_hat - residual|^2 = 0.25 + 1.
    # AuxK = 0.5 x 1.25 / 7.5 = 1/12.
    sae, x, dead = _auxk_example()
    cfg = TrainSaeConfig(architecture="topk", d_in=4, n_latents=3, k=1, auxk_alpha=1.0)
    step = STEPS["topk"](sae, x, {"step": 1, "dead": dead}, cfg)
    assert step.parts["auxk"] == pytest.approx(1 / 12, rel=1e-6)
    assert step.parts["fvu"] == pytest.approx(2 / 7.5, rel=1e-6)

    # Two dead latents, d_in 2: k_aux = 1, scale = min(2 / 1, 1) = 1; the larger dead
    # pre-activation per token is used, never the live latent 0 (even where it is larger).
    # x = (3, 1): pre (3, 1, 2.6), x_hat (3, 0), residual (0, 1), dead pick 2.6 -> e_hat
    # (1.56, 2.08), error^2 3.6. x = (1, 0): pre (1, 0, 0.6), residual 0, e_hat (0.36, 0.48),
    # error^2 0.36. Total variance 2.5: AuxK = (3.6 + 0.36) / 2.5 = 1.584.
    sae = _sae("topk", [[1.0, 0.0, 0.6], [0.0, 1.0, 0.8]],
               [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    cfg = TrainSaeConfig(architecture="topk", d_in=2, n_latents=3, k=1, auxk_alpha=1.0)
    x = torch.tensor([[3.0, 1.0], [1.0, 0.0]])
    step = STEPS["topk"](sae, x, {"step": 1, "dead": torch.tensor([False, True, True])}, cfg)
    assert step.parts["auxk"] == pytest.approx(1.584, rel=1e-6)


def test_auxk_gradient_matches_a_hand_computed_reference() -> None:
    """The AuxK part of the gradient (alpha = 1 minus alpha = 0), derived by hand:
    dAuxK/de_hat = 2 x 0.5 x (e_hat - residual) / 7.5 = (0, 0, -1/15, 0) on token 1, and on
    token 2 (0, 0, 0, -2/15), which is orthogonal to W_dec[2] = e2. So dAuxK/dz = -1/15 on
    token 1 (pre 0.5 > 0) and 0 on token 2 (pre 0: no ReLU gradient). Hence
    W_enc[:, 2]: -1/15 x (3, 0, 1, 0); b_enc[2]: -1/15; b_dec: -W_enc[:, 2] x (-1/15) =
    (0, 0, 1/30, 0); W_dec[2]: 0.5 x (0, 0, -1/15, 0). Nothing else."""
    grads = []
    for alpha in (1.0, 0.0):
        sae, x, dead = _auxk_example()
        cfg = TrainSaeConfig(architecture="topk", d_in=4, n_latents=3, k=1, auxk_alpha=alpha)
        STEPS["topk"](sae, x, {"step": 1, "dead": dead}, cfg).loss.backward()
        grads.append(_grads(sae))
    aux = {k: grads[0][k] - grads[1][k] for k in grads[0]}
    want_W_enc = torch.zeros(4, 3)
    want_W_enc[:, 2] = torch.tensor([3.0, 0.0, 1.0, 0.0]) * (-1 / 15)
    want_W_dec = torch.zeros(3, 4)
    want_W_dec[2, 2] = -1 / 30
    torch.testing.assert_close(aux["W_enc"], want_W_enc, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux["b_enc"], torch.tensor([0.0, 0.0, -1 / 15]),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux["b_dec"], torch.tensor([0.0, 0.0, 1 / 30, 0.0]),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aux["W_dec"], want_W_dec, atol=1e-6, rtol=1e-5)


# ---- JumpReLU straight-through estimators (Rajamanoharan et al. 2024, as in SAELens) ------

def test_jumprelu_straight_through_gradients_match_hand_computed_values() -> None:
    """Rectangle kernel K(u) = 1 if |u| < 1/2, bandwidth eps = 0.5 (window |z - t| < 0.25):
    d JumpReLU / dt = -(t / eps) K((z - t) / eps), d H / dt = -(1 / eps) K((z - t) / eps),
    d JumpReLU / dz = H(z - t) (SAELens' JumpReLU and Step).

    W_enc = I, zero biases, W_dec rows (1, 0) and (0.6, 0.8), thresholds t = (1, 0.6),
    l0_coeff c = 1. x = pre = (1.1, 0.9) and (0.9, 0.5): token 1 keeps both latents, token 2
    none. x_hat - x = (1.64, 0.72) - (1.1, 0.9) = (0.54, -0.18) and (-0.9, -0.5); the total
    variance about the mean (1, 0.7) is tv = 2 x 0.05 = 0.1; FVU = 1.384 / 0.1.
    dFVU/dlatents = 2 (x_hat - x) W_dec.T / tv = (1.08, 0.36) / tv and (-1.8, -1.88) / tv.
    In the window: latent 0 on both tokens; latent 1 on token 2 only (0.9 is 0.3 away).
    dFVU/dt = (-(1/0.5)(1.08 - 1.8), -(0.6/0.5)(-1.88)) / tv = (1.44, 2.256) / tv.
    dL0/dt = -(1/0.5) x (1/2 per token) x (2, 1) = (-2, -1).
    d loss / d log t = t x (dFVU/dt + c dL0/dt) = (14.4 - 2, 0.6 x (22.56 - 1)).
    """
    tv, c = 0.1, 1.0
    sae = _sae("jumprelu", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]])
    with torch.no_grad():
        sae.log_threshold.copy_(torch.tensor([1.0, 0.6]).log())
    cfg = TrainSaeConfig(architecture="jumprelu", d_in=2, n_latents=2, l0_coeff=c,
                         jumprelu_bandwidth=0.5)
    x = torch.tensor([[1.1, 0.9], [0.9, 0.5]])
    step = STEPS["jumprelu"](sae, x, {"step": 0, "dead": torch.zeros(2, dtype=torch.bool)},
                             cfg)
    assert step.parts["fvu"] == pytest.approx(1.384 / tv, rel=1e-5)
    assert step.l0 == pytest.approx(1.0)
    step.loss.backward()
    close = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(sae.log_threshold.grad, torch.tensor([12.4, 0.6 * 21.56]),
                               **close)
    # z gets H(z - t) x dFVU/dlatents: token 1 only; L0 gives z no gradient
    torch.testing.assert_close(sae.b_enc.grad, torch.tensor([1.08, 0.36]) / tv, **close)
    torch.testing.assert_close(
        sae.W_enc.grad, torch.tensor([[1.1 * 1.08, 1.1 * 0.36], [0.9 * 1.08, 0.9 * 0.36]]) / tv,
        **close)
    # b_dec: -W_enc (1.08, 0.36) / tv through the encoder, 2 (-0.36, -0.68) / tv via x_hat
    torch.testing.assert_close(sae.b_dec.grad, torch.tensor([-1.8, -1.72]) / tv, **close)


# ---- GroupMax (sparsify) and unknown activations -----------------------------------------

def _sparsify_folder(folder: Path, activation: str) -> Path:
    """A sparsify SAE folder: d_in 2, 6 latents, k = 2 (groups {0, 1, 2} and {3, 4, 5})."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    enc = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [0.5, 0.5]])
    tensors = {"encoder.weight": enc, "encoder.bias": torch.tensor([0, 0, 0, 0, 0, 0.1]),
               "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 3), "b_dec": torch.tensor([1.0, 0])}
    save_file(tensors, str(folder / "sae.safetensors"))
    cfg = {"activation": activation, "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": 6, "k": 2, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": 2}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_a_sparsify_groupmax_sae_encodes_as_sparsify_defines_it(tmp_path: Path) -> None:
    """sparsify: relu(encoder(x - b_dec)).unflatten(-1, (k, -1)).max(-1): the maximum of each
    of k contiguous groups. x = (3, 1): x - b_dec = (2, 1), relu(pre) = (2, 4, 1, 0, 0, 1.6),
    so (0, 4, 0 | 0, 0, 1.6), where top-2 would keep (2, 4, 0, 0, 0, 0). x = (0, -2):
    relu(pre) = (0, 0, 0, 1, 2, 0): (0, 0, 0 | 0, 2, 0)."""
    sae = load_sae(_sparsify_folder(tmp_path / "g", "groupmax"))
    assert sae.cfg.architecture == "groupmax" and sae.cfg.k == 2
    x = torch.tensor([[3.0, 1.0], [0.0, -2.0]])
    lat = sae.encode(x)
    torch.testing.assert_close(lat, torch.tensor([[0, 4.0, 0, 0, 0, 1.6], [0, 0, 0, 0, 2.0, 0]]))
    # decode: latents @ W_dec + b_dec
    torch.testing.assert_close(sae.decode(lat), torch.tensor([[1.0, 5.6], [3.0, 0.0]]))
    topk = load_sae(_sparsify_folder(tmp_path / "t", "topk"))
    torch.testing.assert_close(topk.encode(x[:1]), torch.tensor([[2.0, 4.0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("activation", ["batchtopk", "softmax"])
def test_an_unknown_sparsify_activation_is_refused(activation: str, tmp_path: Path) -> None:
    folder = _sparsify_folder(tmp_path, activation)
    with pytest.raises(UserError, match=f"sparsify activation '{activation}' is unknown"):
        load_sae(folder)


def test_groupmax_checks_its_groups_and_is_not_trained_here() -> None:
    with pytest.raises(UserError, match="divisible"):
        SaeConfig(d_in=2, n_latents=6, architecture="groupmax", k=4).check()
    with pytest.raises(UserError, match="can be loaded but not trained"):
        train_sae(TrainSaeConfig(architecture="groupmax", n_latents=6, k=2),
                  iter([torch.randn(4, 2)]), d_in=2)


# ---- CE loss recovered ----------------------------------------------------------------------

class _TwoTokenLM(torch.nn.Module):
    """logits = act(table[ids]) over a 2-token vocabulary; ``act`` is the hookpoint."""

    def __init__(self, row0: list[float]) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding.from_pretrained(torch.tensor([row0, [0.0, 0.0]]))
        self.act = torch.nn.Identity()

    def forward(self, input_ids: Any, use_cache: bool = False) -> Any:
        return SimpleNamespace(logits=self.act(self.emb(input_ids)))


@pytest.mark.parametrize("skip_first", [True, False])
def test_spliced_metrics_match_hand_computed_values(skip_first: bool) -> None:
    """ids (0, 0, 0): logits (2, 0) at every position, target 0 at positions 0 and 1, so the
    clean CE is log(1 + e^-2). The SAE halves the hidden state (W_enc = I/2, W_dec = I): CE
    log(1 + e^-1); zeroing it: CE log 2. With skip_first, position 0 stays clean."""
    model = _TwoTokenLM([2.0, 0.0])
    sae = _sae("relu", [[0.5, 0.0], [0.0, 0.5]], [[1.0, 0.0], [0.0, 1.0]])
    m = spliced_metrics(model, "act", sae, torch.tensor([[0, 0, 0]]), skip_first=skip_first)
    clean, half, zero = math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(2)
    if skip_first:
        half, zero = (clean + half) / 2, (clean + zero) / 2
    assert m["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert m["ce_sae"] == pytest.approx(half, rel=1e-5)
    assert m["ce_zero_ablate"] == pytest.approx(zero, rel=1e-5)
    # (log 2 - log(1 + e^-1)) / (log 2 - log(1 + e^-2)) = 0.379885 / 0.566219 either way
    assert m["ce_loss_recovered"] == pytest.approx(0.379885 / 0.566219, rel=1e-5)
    # KL(softmax(2, 0) || uniform) = 0.880797 log(1.761594) + 0.119203 log(0.238406)
    #                              = 0.327812, at 2 of 3 positions (3 of 3 without skip_first)
    assert m["kl_zero_ablate"] == pytest.approx(0.327812 * (2 if skip_first else 3) / 3,
                                                rel=1e-4)


def test_ce_loss_recovered_is_nan_with_a_warning_when_ablation_changes_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    assert ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    with caplog.at_level(logging.WARNING, logger="neuroscribe"):
        assert math.isnan(ce_loss_recovered(ce_clean=3.0, ce_sae=3.5, ce_zero=3.0))
    assert "undefined (NaN)" in caplog.text
    # the same through spliced_metrics: a zero hidden state, so zero-ablating changes nothing
    caplog.clear()
    model = _TwoTokenLM([0.0, 0.0])
    sae = _sae("relu", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    with caplog.at_level(logging.WARNING, logger="neuroscribe"):
        m = spliced_metrics(model, "act", sae, torch.tensor([[0, 1, 0]]))
    assert m["ce_clean"] == pytest.approx(math.log(2)) == pytest.approx(m["ce_zero_ablate"])
    assert math.isnan(m["ce_loss_recovered"]) and "undefined (NaN)" in caplog.text


# ---- the subject model runs on the training device ---------------------------------------

def test_the_subject_model_goes_to_the_given_device(
        tiny_model: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the meta device (no GPU here). transformers cannot run a forward pass on meta
    tensors, so the forward is replaced by one that records where the model and the token ids
    are and returns activations of the right shape there."""
    import neuroscribe.models as models

    seen: list[tuple[str, str]] = []

    def forward(model: Any, ids: Any, store: dict[str, Any]) -> dict[str, Any]:
        seen.append((next(model.parameters()).device.type, ids.device.type))
        return {"transformer.h.1.mlp.act": torch.zeros(*ids.shape, 64, device=ids.device)}

    monkeypatch.setattr(models, "run_to_hooks", forward)
    acts = ActsConfig(model=str(tiny_model), hookpoint="transformer.h.1.mlp.act",
                      corpus=str(corpus_file), max_tokens=256, ctx_len=16, model_batch=2)
    chunk = next(model_chunks(acts, device="meta"))
    assert seen == [("meta", "meta")]
    assert chunk.device.type == "meta" and tuple(chunk.shape) == (2 * 15, 64)
    model, _ = _eval_ids(acts, n_contexts=2, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_train_sae_stage_loads_the_subject_on_its_device(
        tiny_model: Path, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """``train-sae --device D`` loads (and so moves, ``model.to(D)``) both subject models,
    the streaming one and the evaluation one, on D ("cpu:0", a distinct name for the CPU)."""
    import neuroscribe.models as models

    devices: list[str] = []
    real = models.load_subject

    def spy(spec: str, device: str = "cpu", dtype: str = "float32") -> Any:
        devices.append(device)
        subject = real(spec, device=device, dtype=dtype)
        assert next(subject.model.parameters()).device.type == torch.device(device).type
        return subject

    monkeypatch.setattr(models, "load_subject", spy)
    acts = ActsConfig(model=str(tiny_model), hookpoint="transformer.h.1.mlp.act",
                      corpus=str(corpus_file), max_tokens=1024, ctx_len=16, eval_tokens=256,
                      shuffle_tokens=512)
    cfg = TrainSaeConfig(architecture="topk", n_latents=64, k=4, batch_size=256,
                         device="cpu:0")
    m = train_sae_stage(acts, cfg, tmp_path / "sae")
    assert devices == ["cpu:0", "cpu:0"]
    assert m["steps"] >= 1 and math.isfinite(m["spliced"]["ce_loss_recovered"])
