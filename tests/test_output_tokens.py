"""The output side of units (logit lens) on the tiny random GPT-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuroscribe.models import load_subject
from neuroscribe.record.output_tokens import (
    OutputTokensConfig,
    load_output_tokens,
    logit_lens,
    unit_directions,
    write_output_tokens,
)
from neuroscribe.sae.model import Sae, SaeConfig

HP = "transformer.h.1.mlp.act"


def test_neuron_logit_lens_equals_hand_computed_product(tiny_model: Path) -> None:
    model = load_subject(str(tiny_model)).model
    mlp, ln_f = model.transformer.h[1].mlp, model.transformer.ln_f
    unit = 5
    d = mlp.c_proj.weight[unit].detach()  # Conv1D [in, out]: row = what neuron 5 writes
    want = model.lm_head.weight.detach() @ (ln_f.weight.detach() * (d - d.mean()))
    got = logit_lens(model, unit_directions(model, HP))[unit]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the centring matters: the plain product differs
    assert not torch.allclose(got, model.lm_head.weight.detach() @ (ln_f.weight.detach() * d),
                              atol=1e-4)


def test_sae_latent_direction_is_w_dec_row_through_c_proj(tiny_model: Path) -> None:
    model = load_subject(str(tiny_model)).model
    torch.manual_seed(0)
    sae = Sae(SaeConfig(d_in=64, n_latents=16, k=4))
    torch.nn.init.normal_(sae.W_dec)
    dirs = unit_directions(model, f"{HP}:sae=whatever", sae)
    want = sae.W_dec[3].detach() @ model.transformer.h[1].mlp.c_proj.weight.detach()
    torch.testing.assert_close(dirs[3], want)


def test_residual_hookpoint_is_the_basis_vector(tiny_model: Path) -> None:
    model = load_subject(str(tiny_model)).model
    torch.testing.assert_close(unit_directions(model, "transformer.h.0.mlp")[2],
                               torch.eye(32)[2])


def test_written_file_holds_the_top_tokens(tiny_run: Path, tiny_model: Path) -> None:
    (path,) = write_output_tokens(tiny_run, OutputTokensConfig(top_k=3))
    data = json.loads(path.read_text())
    assert data["config"]["top_k"] == 3 and data["hookpoint"] == "transformer.h.0.mlp.act"
    units = load_output_tokens(tiny_run, data["hookpoint"])
    assert units is not None and len(units) == 64
    model = load_subject(str(tiny_model)).model
    logits = logit_lens(model, unit_directions(model, data["hookpoint"]))[7]
    vocab = json.loads((tiny_run / "vocab.json").read_text())
    assert [t for t, _ in units[7]["promoted"]] == [vocab[i] for i in logits.topk(3).indices]
    assert [t for t, _ in units[7]["suppressed"]] == [
        vocab[i] for i in (-logits).topk(3).indices]
    assert units[7]["promoted"][0][1] == pytest.approx(float(logits.max()), rel=1e-3)


@pytest.fixture(scope="module")
def tiny_run(tiny_model: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Path:
    from neuroscribe.record.core import RecordConfig, record

    run = tmp_path_factory.mktemp("ot") / "run"
    record(RecordConfig(model=str(tiny_model), hookpoints="transformer.h.0.mlp.act",
                        corpus=str(corpus_file), max_tokens=2000, ctx_len=32, batch_size=16,
                        quantile_warmup=8, n_top=6, n_random=4, n_quantile=1), run)
    return run


def test_record_writes_output_tokens_at_the_end(tiny_run: Path) -> None:
    assert (tiny_run / "output_tokens").is_dir()
    assert load_output_tokens(tiny_run, "transformer.h.0.mlp.act") is not None


OUTPUT = {"promoted": [[" sea", 2.5], [" ship", 2.0], [" boat", 1.0], ["x", 0.5], ["y", 0.4],
                       ["z", 0.3]],
          "suppressed": [[" cat", -1.5], [" mat", -1.0], ["a", -0.5], ["b", -0.4], ["c", -0.3],
                         ["d", -0.2]]}


def test_output_tokens_line_is_appended_to_the_last_user_message_exactly() -> None:
    from neuroscribe.explain.output_side import with_output_tokens

    msgs = (("system", "S"), ("user", "U1"), ("assistant", "A"), ("user", "U2"))
    out = with_output_tokens(msgs, OUTPUT)
    assert out[:3] == msgs[:3]
    assert out[3] == ("user", 'U2\n\nWhen this neuron fires, it makes the model more likely to '
                              'write next: " sea", " ship", " boat", "x", "y"; and less likely: '
                              '" cat", " mat", "a", "b", "c".')


def test_an_llm_explainer_sends_the_output_tokens(tmp_path: Path) -> None:
    import asyncio

    from test_llm_explain import TRAIN, client, text

    from neuroscribe.explain.core import ExplainConfig
    from neuroscribe.explain.llm import HighlightExplainer

    c = client(tmp_path, text("the word cat"))
    ex = HighlightExplainer(ExplainConfig(explainer="highlight"), c)
    asyncio.run(ex.explain(TRAIN, [], OUTPUT))
    asyncio.run(ex.explain(TRAIN, []))
    with_ot, without = (r.messages[-1][1] for r in c.backend.requests)  # type: ignore[attr-defined]
    assert with_ot.endswith('and less likely: " cat", " mat", "a", "b", "c".')
    assert with_ot.startswith(without) and "less likely" not in without


def test_tokens_explainer_with_output_tokens_names_each_unit_s_promoted_tokens(
        tiny_run: Path) -> None:
    from neuroscribe.errors import UserError
    from neuroscribe.explain.core import ExplainConfig, explain, explanation_path

    hp = "transformer.h.0.mlp.act"
    explain(ExplainConfig(units="first:3", with_output_tokens=True), tiny_run)
    units = load_output_tokens(tiny_run, hp)
    assert units is not None
    for u in range(3):
        e = json.loads(explanation_path(tiny_run, hp, u).read_text())["explanation"]
        want = ", ".join(json.dumps(t, ensure_ascii=False) for t, _ in units[u]["promoted"][:5])
        assert e.endswith(f"; when it fires, the model leans to writing {want} next"), e
    import shutil

    shutil.rmtree(tiny_run / "output_tokens")
    with pytest.raises(UserError, match="neuroscribe output-tokens"):
        explain(ExplainConfig(units="first:3", with_output_tokens=True), tiny_run, resume=True)
