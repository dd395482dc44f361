"""The intervention scorer: steering, KV-cache generation, the blind judge, and the score
stage end to end on the tiny GPT-2."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord, NeuronId, NeuronRecord
from neuroscribe.models import load_subject
from neuroscribe.score.intervention import (
    InterventionConfig,
    InterventionScorer,
    generate,
    kl,
    load_prompts,
    parse_scales,
    steering_site,
)

PROMPTS = ["the cat sat", "red birds", "the king said that seven"]


@pytest.fixture(scope="module")
def subject(tiny_model: Path):  # type: ignore[no-untyped-def]
    return load_subject(str(tiny_model), "cpu", "float32")


def naive_greedy(model, tok, prompt: str, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def test_batched_kv_cache_generation_equals_one_prompt_at_a_time_without_cache(
        subject) -> None:  # type: ignore[no-untyped-def]
    ids, first = generate(subject.model, subject.tokenizer, PROMPTS, 6)
    assert ids.shape == (3, 6) and first.shape[0] == 3
    for row, p in zip(ids.tolist(), PROMPTS):  # left padding and positions are handled
        assert row == naive_greedy(subject.model, subject.tokenizer, p, 6)


def test_steering_with_scale_0_equals_the_unsteered_generation_exactly(
        subject) -> None:  # type: ignore[no-untyped-def]
    m, tok = subject.model, subject.tokenizer
    site = steering_site(m, "transformer.h.0.mlp.act")
    assert site is m.transformer.h[0].mlp  # an MLP activation steers at the MLP's output
    d = torch.randn(32)
    base = generate(m, tok, PROMPTS, 8)
    zero = generate(m, tok, PROMPTS, 8, site, d, torch.zeros(3))
    assert torch.equal(base[0], zero[0]) and torch.equal(base[1], zero[1])
    pushed = generate(m, tok, PROMPTS, 8, site, 50 * d, torch.ones(3))
    assert not torch.equal(base[0], pushed[0])
    assert (kl(base[1], pushed[1]) > 1e-3).all() and kl(base[1], base[1]).abs().max() < 1e-6


def test_options_are_checked() -> None:
    assert parse_scales("1, 3,10") == [1.0, 3.0, 10.0]
    for bad in ("", "0,1", "a", "-2"):
        with pytest.raises(UserError):
            parse_scales(bad)
    prompts, distractors = load_prompts()
    assert len(prompts) >= 4 and len(distractors) >= 4
    with pytest.raises(UserError):
        load_prompts("/nonexistent/prompts.json")


def record_of(peak: float) -> NeuronRecord:
    recs = [ActivationRecord(tokens=["a", "b"], activations=[0.0, peak]) for _ in range(8)]
    return NeuronRecord(NeuronId(0, 0), most_positive_activation_records=recs)


def planted(subject, token: str, unit: int, other: int) -> int:  # type: ignore[no-untyped-def]
    """Neuron ``unit`` of layer 1 writes the unembedding of ``token`` (GPT-2 ties it to
    ``wte``); neuron ``other`` writes a random direction of the same norm. Both are silenced
    on their own (their input weights zeroed, bias -10), so only steering shows their effect;
    the final norm's gain is raised so the random tiny model predicts decisively, as a
    trained one does."""
    tid = subject.tokenizer.convert_tokens_to_ids(token)
    w = subject.model.transformer.h[1].mlp.c_proj.weight  # Conv1D: [n_inner, d_model]
    with torch.no_grad():
        subject.model.transformer.ln_f.weight.mul_(20)
        fc = subject.model.transformer.h[1].mlp.c_fc  # Conv1D: weight [d_model, n_inner]
        for n in (unit, other):
            fc.weight[:, n] = 0.0
            fc.bias[n] = -10.0
        u = subject.model.transformer.wte.weight[tid]
        w[unit] = 4 * u / u.norm()
        g = torch.Generator().manual_seed(0)
        w[other] = 4 * torch.randn(w.shape[1], generator=g) / w.shape[1] ** 0.5
    return tid


def test_a_planted_unit_that_promotes_a_token_outscores_a_random_direction(
        tiny_model: Path) -> None:
    subject = load_subject(str(tiny_model), "cpu", "float32")  # its weights are edited
    tid = planted(subject, "Ġships", unit=5, other=6)
    cfg = InterventionConfig(intervention_scales="2,5,10", intervention_tokens=8)
    scorer = InterventionScorer(cfg)
    hp = "transformer.h.1.mlp.act"
    scorer.attach(subject, [hp])
    explanation = "ships"
    good = asyncio.run(scorer.score_unit(explanation, hp, 5, record_of(3.0)))
    rand = asyncio.run(scorer.score_unit(explanation, hp, 6, record_of(3.0)))
    steered = good["examples"][0]["steered"]
    assert tid is not None and "ships ships" in steered  # the promoted token, generated
    assert good["auroc"] > 0.9 and good["auroc"] > rand["auroc"] + 0.3, (good, rand)
    assert good["kl"]["10"] > good["kl"]["2"] > 0 and not good["no_effect"]
    assert good["peak"] == 3.0 and good["scales"] == [2.0, 5.0, 10.0]
    assert good["new_tokens"] == 8 and good["prompts"] == load_prompts()[0]


def test_the_score_stage_writes_the_intervention_score_for_neurons_and_sae_latents(
        tiny_model: Path, corpus_file: Path, tmp_path: Path) -> None:
    from test_latents import make_sae
    from test_pipeline import record_argv

    import neuroscribe.cli as cli

    sae_dir = tmp_path / "sae"
    make_sae(sae_dir)
    hps = f"transformer.h.1.mlp.act,transformer.h.1.mlp.act:sae={sae_dir}"
    run = tmp_path / "run"
    assert cli.main(record_argv(tiny_model, corpus_file, run, hps)) == 0
    assert cli.main(["explain", str(run), "--units", "first:2"]) == 0
    assert cli.main(["score", str(run), "--simulator", "tokens", "--scorers",
                     "intervention", "--intervention-tokens", "4",
                     "--intervention-scales", "1,4"]) == 0
    files = sorted((run / "scores").glob("*/*.scores.json"))
    assert len(files) == 4
    for f in files:
        res = json.loads(f.read_text())["classification"]["intervention"]
        assert "failure" not in res, res
        assert 0.0 <= res["auroc"] <= 1.0 and set(res["kl"]) == {"1", "4"}
        assert res["new_tokens"] == 4 and res["peak"] > 0


def test_the_llm_judge_reads_each_continuation_blind_and_in_any_order(
        tiny_model: Path, tmp_path: Path) -> None:
    """--intervention-judge llm: a judge that answers 1 for texts about ships (a fake LLM
    backend; the prompt is classify.json's) ranks the planted unit's continuations first."""
    import re

    from test_llm_explain import client

    from neuroscribe.llm.client import Response
    from neuroscribe.pipeline import ScoreConfig
    from neuroscribe.score.llm_judge import LLMJudge

    def reply(req):  # type: ignore[no-untyped-def]
        user = req.messages[-1][1]
        assert "steer" not in user.lower()  # blind: nothing says which text was steered
        texts = re.findall(r"^Example \d+: (.*)$", user, flags=re.M)
        return Response(text=json.dumps([int("ships" in t) for t in texts]),
                        completion_tokens=5)

    subject = load_subject(str(tiny_model), "cpu", "float32")
    planted(subject, "Ġships", unit=5, other=6)
    cfg = ScoreConfig(intervention_scales="2,5", intervention_tokens=6,
                      intervention_judge="llm")
    scorer = InterventionScorer(cfg)
    hp = "transformer.h.1.mlp.act"
    scorer.attach(subject, [hp])
    c = client(tmp_path, reply)
    scorer.llm_judge = LLMJudge(cfg, c)
    good = asyncio.run(scorer.score_unit("ships", hp, 5, record_of(3.0)))
    rand = asyncio.run(scorer.score_unit("ships", hp, 6, record_of(3.0)))
    assert good["judge"] == "llm" and good["auroc"] == 1.0 and rand["auroc"] == 0.5
    n = len(load_prompts()[0]) * 3  # unsteered + 2 scales, per unit
    sent = [t for r in c.backend.requests  # type: ignore[attr-defined]
            for t in re.findall(r"^Example \d+: (.*)$", r.messages[-1][1], flags=re.M)]
    assert len(sent) == 2 * n


def test_kl_and_the_embedding_judge_match_hand_computed_values() -> None:
    import math

    import numpy as np

    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    assert float(kl(p, q)[0]) == pytest.approx(want, rel=1e-6)
    scorer = InterventionScorer(InterventionConfig())
    vecs = {"E": [1.0, 0.0], "d1": [0.0, 1.0], "d2": [0.6, 0.8], "a": [0.8, 0.6], ".": [0, 1]}
    scorer.distractors = ["d1", "d2"]
    scorer.embed = lambda texts: np.array([vecs[t] for t in texts])  # type: ignore[method-assign]
    # "a": cos to E 0.8, to d1 0.6 and d2 0.96, mean 0.78 -> 0.02; no text -> -2
    got = scorer.judge("E", ["a", " \ufffd ", ""])
    assert got[0] == pytest.approx(0.8 - (0.6 + 0.96) / 2) and got[1:] == [-2.0, -2.0]
