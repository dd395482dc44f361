"""LLM explainers and simulators on a fake backend: parsing, rejection, expected values from
hand-made logprobs, JSON repair, best-of-n on the calibration split, and the stages' files.

No network and no model: the fake backend answers each Request from a function.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import neuroscribe.explain.core as explain_mod
import neuroscribe.pipeline as pipeline
import neuroscribe.prompts as prompts
from neuroscribe.explain.core import ExplainConfig, ExplanationError, explanation_path
from neuroscribe.explain.llm import (
    CleaningRules,
    ContrastiveExplainer,
    OpenAIExplainer,
    clean_explanation,
)
from neuroscribe.formats import (
    SPLITS_RANDOM,
    SPLITS_TOP,
    ActivationRecord,
    NeuronId,
    NeuronRecord,
    loads,
)
from neuroscribe.llm.client import Client, LLMConfig, Request, Response, ResponseCache, Retryable
from neuroscribe.pipeline import ScoreConfig, best_candidate, score_path, score_unit
from neuroscribe.simulate.core import SimulationError, point_simulation
from neuroscribe.simulate.llm import (
    JSONSimulator,
    OpenAISimulator,
    parse_json_values,
    unknown_slots,
)


class FakeBackend:
    name = "fake"
    model = "fake-1"

    def __init__(self, reply: Callable[[Request], Response], delay: float = 0.0) -> None:
        self.reply, self.delay = reply, delay
        self.requests: list[Request] = []
        self.in_flight = self.peak = 0

    async def complete(self, req: Request) -> Response:
        self.requests.append(req)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return self.reply(req)
        finally:
            self.in_flight -= 1


def client(tmp_path: Path, reply: Callable[[Request], Response], **kw: Any) -> Client:
    cfg = LLMConfig(retries=0, **kw)
    return Client(FakeBackend(reply), cfg, ResponseCache(tmp_path / "cache.sqlite"))


def text(*by_seed: str) -> Callable[[Request], Response]:
    return lambda req: Response(text=by_seed[req.seed], completion_tokens=5)


TRAIN = [ActivationRecord(["the", " cat", " sat"], [0.0, 4.0, 0.0]),
         ActivationRecord([" a", " cat"], [0.0, 2.0])]


# --- explainers ---------------------------------------------------------------------------------


def test_openai_explainer_cleans_and_dedupes_candidates(tmp_path: Path) -> None:
    cfg = ExplainConfig(explainer="openai", n_samples=4, temperature=1.0, max_examples=1)
    c = client(tmp_path, text(" words about cats.\n\nNeuron 5",
                              "The main thing this neuron does is find words about cats.",
                              "**Explanation:** animal nouns. They appear often.",
                              "I'm sorry, I cannot help with that."))
    got = asyncio.run(OpenAIExplainer(cfg, c).explain(TRAIN, []))
    assert got == ["words about cats", "animal nouns"]
    reqs = c.backend.requests
    assert sorted(r.seed for r in reqs) == [0, 1, 2, 3]
    want = prompts.openai_explain_messages(TRAIN[:1], "floor")
    assert all(r.messages == want and r.temperature == 1.0 and r.max_tokens == 60
               and r.stage == "explain" for r in reqs)
    assert c.usage_report()["explain"]["calls"] == 4
    # The same requests again come from the cache.
    asyncio.run(OpenAIExplainer(cfg, c).explain(TRAIN, []))
    assert c.usage_report()["explain"]["cached"] == 4


@pytest.mark.parametrize("raw,reason", [
    ("", "empty reply"),
    ("  \n **  \n", "empty reply"),
    ("<think>hmm</think>", "empty reply"),
    ("I'm sorry, but I can't determine that.", "refusal"),
    ("As an AI model I think it is cats.", "refusal"),
    ("There is no clear pattern here.", "refusal"),
    (" the\tunknown", "repeats prompt text"),
    ("tokens like <<cat>> in text", "repeats prompt text"),
    ("<start> the cat", "repeats prompt text"),
    ("Body parts, such as hand, knee or face.", "copies a few-shot explanation"),
    ("the word after a negation such as not or never", "copies a few-shot explanation"),
    (" " + "very " * 45 + "long", "too long (46 words > 40)"),
])
def test_unusable_replies_are_rejected_with_a_reason(raw: str, reason: str) -> None:
    copies = [n.explanation for n in prompts.few_shot_neurons()]
    with pytest.raises(ExplanationError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        clean_explanation(raw, CleaningRules.load(), 40, copies)


@pytest.mark.parametrize("raw,want", [
    (" nouns that name animals.", "nouns that name animals"),
    ("<think>cats?</think>\nExplanation: the word 'cat'.", "the word 'cat'"),
    ('"pet names."', "pet names"),
    ('\u201cpet names\u201d', "pet names"),
    ('"cat" or "dog"', '"cat" or "dog"'),
    ("[EXPLANATION]: Animal nouns, e.g. cat or dog. Also more.", "Animal nouns, e.g. cat or dog"),
    ("This neuron detects mentions of pets", "mentions of pets"),
    ("Explanation of neuron 4 behavior: the main thing this neuron does is find pets.", "pets"),
    ("- \"pet names\"\nsecond line", "pet names"),
])
def test_replies_are_cleaned_to_one_phrase(raw: str, want: str) -> None:
    assert clean_explanation(raw, CleaningRules.load()) == want


def test_all_unusable_samples_raise_with_every_reason(tmp_path: Path) -> None:
    cfg = ExplainConfig(explainer="openai", n_samples=3, temperature=0.7)
    c = client(tmp_path, text("", "I cannot do that.", ""))
    with pytest.raises(ExplanationError) as exc:
        asyncio.run(OpenAIExplainer(cfg, c).explain(TRAIN, []))
    msg = str(exc.value)
    assert msg.startswith("no usable explanation in 3 sample(s): ")
    assert "empty reply: '' (x2)" in msg and "refusal: 'I cannot do that.'" in msg


def test_llm_failure_and_truncation_are_reasons(tmp_path: Path) -> None:
    def broken(req: Request) -> Response:
        raise Retryable("HTTP 503")

    with pytest.raises(ExplanationError, match="LLM failed: gave up after 1 attempts"):
        asyncio.run(OpenAIExplainer(ExplainConfig(), client(tmp_path, broken)).explain(TRAIN, []))
    cut = client(tmp_path, lambda req: Response(text=" nouns that", completion_tokens=60))
    with pytest.raises(ExplanationError, match="cut off at 60 tokens"):
        asyncio.run(OpenAIExplainer(ExplainConfig(), cut).explain(TRAIN, []))


def test_explainer_config_checks(tmp_path: Path) -> None:
    c = client(tmp_path, text("x"))
    with pytest.raises(Exception, match="--temperature > 0"):
        OpenAIExplainer(ExplainConfig(n_samples=2, temperature=0.0), c)
    with pytest.raises(ExplanationError, match="never activates"):
        asyncio.run(OpenAIExplainer(ExplainConfig(), c).explain(
            [ActivationRecord(["a"], [-1.0])], []))
    assert c.backend.requests == []


def test_contrastive_explainer_shows_only_silent_background(tmp_path: Path) -> None:
    cfg = ExplainConfig(explainer="contrastive", active_level=5, max_negatives=1)
    c = client(tmp_path, text("Explanation: cats"))
    silent = [ActivationRecord([" dog"], [1.0]), ActivationRecord([" cow"], [0.0])]
    loud = ActivationRecord([" cat"], [3.9])  # level 9 on the train scale (max 4)
    assert asyncio.run(ContrastiveExplainer(cfg, c).explain(TRAIN, [loud, *silent])) == ["cats"]
    want = prompts.contrastive_explain_messages(TRAIN, silent[:1], "floor", 5)
    assert c.backend.requests[0].messages == want


def test_summary_explainer_sends_the_counted_prompt(tmp_path: Path) -> None:
    cfg = ExplainConfig(explainer="summary", active_level=5)
    c = client(tmp_path, text("Explanation: the word cat"))
    got = asyncio.run(explain_mod.EXPLAINERS["summary"](cfg, c).explain(TRAIN, []))
    assert got == ["the word cat"]
    sent = c.backend.requests[0].messages
    assert sent == prompts.summary_explain_messages(TRAIN, "floor", 5)
    assert 'Marked tokens, most frequent first: "cat" x' in sent[-1][1]


def test_category_explainer_names_the_kind_and_appends_the_facts(tmp_path: Path) -> None:
    """The LLM only names the kind of the marked tokens; the facts that hold for them (here:
    all four come right after "the") are appended by the code, to every candidate."""
    recs = [ActivationRecord(["I", " saw", " the", " owl", " and", " the", " fox", " go"],
                             [0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 6.0, 0.0]),
            ActivationRecord([" then", " the", " bear", " met", " the", " deer", " here"],
                             [0.0, 0.0, 6.0, 0.0, 0.0, 4.0, 0.0])]
    cfg = ExplainConfig(explainer="category", active_level=4, n_samples=2, temperature=1.0)
    c = client(tmp_path, text("Explanation: animals", "Explanation: wild animals."))
    got = asyncio.run(explain_mod.EXPLAINERS["category"](cfg, c).explain(recs, []))
    assert got == ['animals, right after "the"', 'wild animals, right after "the"']
    sent = c.backend.requests[0].messages
    assert sent == prompts.category_explain_messages(recs, "floor", 4)
    assert sent[-1][1].startswith('Tokens where the neuron fires, most frequent first:\n"bear" x1')


def test_each_explainer_refuses_copies_of_the_few_shot_set_it_shows(tmp_path: Path) -> None:
    """The summary prompt shows its own few-shot neurons, so a reply that copies one of those is
    refused; an explanation from the shared set is not a copy there."""
    own = prompts.few_shot_neurons("summary_examples")[1].explanation
    shared = prompts.few_shot_neurons()[2].explanation
    cfg = ExplainConfig(explainer="summary")
    with pytest.raises(ExplanationError, match="copies a few-shot explanation"):
        asyncio.run(explain_mod.EXPLAINERS["summary"](
            cfg, client(tmp_path / "a", text(f"Explanation: {own}"))).explain(TRAIN, []))
    got = asyncio.run(explain_mod.EXPLAINERS["summary"](
        cfg, client(tmp_path / "b", text(f"Explanation: {shared}"))).explain(TRAIN, []))
    assert got == [shared]
    with pytest.raises(ExplanationError, match="copies a few-shot explanation"):
        asyncio.run(explain_mod.EXPLAINERS["highlight"](
            ExplainConfig(explainer="highlight"),
            client(tmp_path / "c", text(f"Explanation: {shared}"))).explain(TRAIN, []))


def test_llm_explainers_are_registered() -> None:
    assert {"tokens", "openai", "highlight", "summary", "category", "contrastive"} <= set(
        explain_mod.EXPLAINERS)
    from neuroscribe.simulate.core import SIMULATORS

    assert {"tokens", "embedding", "openai", "json"} <= set(SIMULATORS)


# --- the openai simulator: expected values from prompt logprobs ---------------------------------


def test_openai_simulator_expected_values(tmp_path: Path) -> None:
    # Echoed prompt tokens as llama.cpp returns them; a few-shot line's digit is not a slot,
    # and "unknown" may be split into several tokens.
    echo = ["Neuron", " 1", "\n", "a", "\t", "3", "\n", "<", "start", ">\n",
            " the", "\t", "unknown", "\n", " cat", "\t", "unk", "nown", "\n",
            "\t", "\t", "unknown", "\n", "<", "end", ">\n"]
    tops: list[dict[str, float]] = [{} for _ in echo]
    tops[5] = {"3": 0.0}
    tops[12] = {"0": math.log(0.5), "5": math.log(0.2), "10": math.log(0.1),
                "unknown": math.log(0.15), " the": math.log(0.05)}
    tops[16] = {"1": math.log(0.3), "2": math.log(0.1), " 3": math.log(0.1), "x": math.log(0.5)}
    tops[21] = {"unknown": math.log(0.9)}  # no digit at all: EV 0, empty distribution
    c = client(tmp_path, lambda req: Response(text="", tokens=echo, top_logprobs=tops))
    sim = OpenAISimulator(ScoreConfig(simulator="openai", sim_fill="unknown"), c)
    out = asyncio.run(sim.simulate("cats", [" the", " cat", "\t"]))
    # EV = (0*.5 + 5*.2 + 10*.1) / .8 = 2.5 ; (1*.3 + 2*.1 + 3*.1) / .5 = 1.6
    assert out.tokens == [" the", " cat", "\t"]
    assert out.expected_activations == pytest.approx([2.5, 1.6, 0.0])
    assert out.distribution_values == [[0.0, 5.0, 10.0], [1.0, 2.0, 3.0], []]
    assert out.distribution_probabilities[0] == pytest.approx([0.625, 0.25, 0.125])
    assert out.distribution_probabilities[1] == pytest.approx([0.6, 0.2, 0.2])
    req = c.backend.requests[0]
    assert req.prompt == prompts.openai_simulate_prompt("cats", [" the", " cat", "\t"])
    assert req.prompt_logprobs == 15 and not req.messages and req.stage == "score"
    assert unknown_slots(echo) == [12, 16, 21]


def test_openai_simulator_errors_are_clear(tmp_path: Path) -> None:
    merged = ["x", "\tunknown", "\n"]  # the tokenizer merged the tab and the marker
    c = client(tmp_path, lambda req: Response(text="", tokens=merged, top_logprobs=[{}] * 3))
    sim = OpenAISimulator(ScoreConfig(simulator="openai", sim_fill="unknown"), c)
    with pytest.raises(SimulationError, match="found 0 'unknown' slots .* for 1 tokens"):
        asyncio.run(sim.simulate("cats", ["x"]))
    none = client(tmp_path / "b", lambda req: Response(text="[0]"))
    with pytest.raises(SimulationError, match="needs prompt logprobs"):
        asyncio.run(OpenAISimulator(ScoreConfig(sim_fill="unknown"), none).simulate("cats", ["x"]))
    assert sim.stats["failed"] == 1


# --- the json simulator: parse, repair, reject --------------------------------------------------


@pytest.mark.parametrize("reply,n,values,note", [
    ("[0, 3, 10]", 3, [0, 3, 10], ""),
    (" [0, 2.5, 10]\n", 3, [0, 2.5, 10], ""),
    ("Sure! Here it is: [0, 3, 10] hope that helps", 3, [0, 3, 10],
     "list extracted from the reply"),
    ("```json\n[1,2,3]\n```", 3, [1, 2, 3], "list extracted from the reply"),
    ("[0, 3]", 3, [0, 3, 0], "2 values for 3 tokens"),
    ("[0, 3, 10, 0, 0, ", 5, [0, 3, 10, 0, 0], "unterminated list"),
    ("Here: [4, 5", 3, [4, 5, 0], "unterminated list; 2 values for 3 tokens"),
    ("[0, 3, 12, 4]", 3, [0, 3, 10], "4 values for 3 tokens; clamped to 0-10"),
    ("[-1, 2, 3]", 3, [0, 2, 3], "clamped to 0-10"),
    ('["0", "7"]', 2, [0, 7], "repaired"),
    ('{"activations": [[4, 0]]}', 2, [4, 0], "list extracted from the reply"),
])
def test_json_values_are_repaired(reply: str, n: int, values: list[float], note: str) -> None:
    assert parse_json_values(reply, n) == ([float(v) for v in values], note)


@pytest.mark.parametrize("reply,match", [
    ("the neuron fires on cat", "no JSON list"),
    ("[a, b]", "holds no numbers"),
    ("", "no JSON list"),
])
def test_unrepairable_json_is_rejected(reply: str, match: str) -> None:
    with pytest.raises(SimulationError, match=match):
        parse_json_values(reply, 2)


def test_json_simulator_counts_outcomes(tmp_path: Path) -> None:
    replies = {"good": "[0, 9]", "messy": "values: [0, 9, 9]", "bad": "no idea"}
    c = client(tmp_path, lambda req: Response(
        text=replies[req.messages[-1][1].split("find ")[1].split("\n")[0]]))
    sim = JSONSimulator(ScoreConfig(simulator="json"), c)
    assert asyncio.run(sim.simulate("good", ["a", "b"])).expected_activations == [0.0, 9.0]
    assert asyncio.run(sim.simulate("messy", ["a", "b"])).expected_activations == [0.0, 9.0]
    with pytest.raises(SimulationError, match="no JSON list"):
        asyncio.run(sim.simulate("bad", ["a", "b"]))
    assert dict(sim.stats) == {"exact": 1, "repaired": 1, "failed": 1}
    req = c.backend.requests[0]
    assert req.messages == prompts.json_simulate_messages("good", ["a", "b"])
    assert req.max_tokens == 4 * 2 + 32 and req.temperature == 0.0 and not req.prompt_logprobs


# --- best of n on the calibration split ---------------------------------------------------------


def neuron(layer: int = 0, unit: int = 0) -> tuple[NeuronRecord, dict[str, float]]:
    """8 top records (2 per split) and 6 random ones (2 per split); tokens name their split."""
    top, rnd, acts = [], [], {}
    for i in range(8):
        split = SPLITS_TOP[i % 4]
        rec = ActivationRecord([f"{split}{layer}{unit}t{i}{c}" for c in "abc"],
                               [i + 1.0, 0.0, (i % 3) * 1.0])
        top.append(rec)
    for j in range(6):
        split = SPLITS_RANDOM[j % 3]
        rnd.append(ActivationRecord([f"{split}{layer}{unit}r{j}{c}" for c in "xy"],
                                    [0.0, 0.5 * j]))
    for rec in top + rnd:
        acts.update(zip(rec.tokens, rec.activations))
    return NeuronRecord(neuron_id=NeuronId(layer, unit), random_sample=rnd,
                        most_positive_activation_records=top), acts


class SplitAwareSimulator:
    """'cal-only' is right on the calibration split and anti-correlated elsewhere;
    'valid-only' the reverse; 'boom' fails."""

    def __init__(self, acts: dict[str, float]) -> None:
        self.acts = acts

    async def simulate(self, explanation: str, tokens: Any) -> Any:
        if explanation == "boom":
            raise SimulationError("malformed reply")
        sign = {"cal-only": 1.0, "valid-only": -1.0}[explanation]
        vals = [self.acts[t] * (sign if t.startswith("calibration") else -sign)
                for t in tokens]
        return point_simulation(tokens, vals)


def test_best_of_n_is_chosen_on_calibration_only() -> None:
    nr, acts = neuron()
    res = asyncio.run(score_unit(SplitAwareSimulator(acts), ["valid-only", "cal-only", "boom"],
                                 nr, ScoreConfig(simulator="tokens")))
    assert res["explanation"] == "cal-only"
    assert [c["explanation"] for c in res["candidates"]] == ["valid-only", "cal-only", "boom"]
    assert [c["calibration_ev_correlation"] for c in res["candidates"]] == [-1.0, 1.0, None]
    assert res["candidates"][2]["failure"] == "SimulationError: malformed reply"
    # The chosen candidate's valid and test scores are reported, bad as they are: the valid
    # split (where 'valid-only' would score 1.0) played no part in the choice.
    assert res["scores"]["valid_all"]["ev_correlation_score"] == pytest.approx(-1.0)
    assert res["scores"]["test_top"]["ev_correlation_score"] == pytest.approx(-1.0)
    assert res["calibration"] == {"slope": pytest.approx(1.0), "intercept": pytest.approx(0.0)}


def test_best_candidate_ties_and_undefined() -> None:
    assert best_candidate([{"calibration_ev_correlation": None},
                           {"calibration_ev_correlation": 0.2},
                           {"calibration_ev_correlation": 0.2}]) == 1
    assert best_candidate([{"calibration_ev_correlation": None}]) == 0
    assert best_candidate([{"failure": "x", "calibration_ev_correlation": None}]) is None


def test_simulation_failures_are_returned_not_raised() -> None:
    nr, acts = neuron()
    sim = SplitAwareSimulator(acts)
    res = asyncio.run(score_unit(sim, ["boom"], nr, ScoreConfig()))
    assert res["failure"] == "every candidate failed to simulate: SimulationError: malformed reply"
    # One candidate and no calibration: the calibration split is not simulated at all.
    res = asyncio.run(score_unit(sim, "boom", nr, ScoreConfig(calibrate=False)))
    assert res["failure"] == "valid split: SimulationError: malformed reply"
    assert res["candidates"] == [{"explanation": "boom", "calibration_ev_correlation": None}]


# --- the stages on a fake record store ----------------------------------------------------------


class FakeStore:
    hookpoints = ["h.0", "h.1"]
    units = {"h.0": 3, "h.1": 3}

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def neuron_record(self, hp: str, unit: int) -> NeuronRecord:
        return neuron(int(hp[-1]), unit)[0]


def test_explain_stage_runs_units_concurrently_and_records_usage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroscribe.record.core

    monkeypatch.setattr(neuroscribe.record.core, "RecordStore", FakeStore)

    def reply(req: Request) -> Response:
        user = req.messages[-1][1]
        if "train12t" in user:  # unit h.1#2 gets a refusal
            return Response(text="I'm sorry, I cannot explain this.")
        unit = next(w for w in user.split() if w.startswith("<<train"))[7:9]
        return Response(text=f"Explanation: tokens of unit {unit}.", prompt_tokens=100,
                        completion_tokens=8)

    cfg = ExplainConfig(explainer="highlight", units="all", concurrency=3)
    c = Client(FakeBackend(reply, delay=0.01), cfg, ResponseCache(tmp_path / "c.sqlite"))
    run = tmp_path / "run"
    res = explain_mod.explain(cfg, run, explainer=explain_mod.EXPLAINERS["highlight"](cfg, c))
    assert res == {"explained": 5, "failed": 1}
    assert 1 < c.backend.peak <= 3
    for hp, unit in [(h, u) for h in FakeStore.hookpoints for u in range(3)]:
        entry = json.loads(explanation_path(run, hp, unit).read_text())
        if (hp, unit) == ("h.1", 2):
            assert entry["failure"].startswith("no usable explanation in 1 sample(s): refusal")
        else:
            assert entry["explanation"] == f"tokens of unit {hp[-1]}{unit}"
            assert entry["candidates"] == [entry["explanation"]]
    saved = json.loads((run / "explain.json").read_text())
    assert saved["complete"] and saved["config"]["n_samples"] == 1
    assert saved["llm_usage"]["explain"]["calls"] == 6
    assert saved["llm_usage"]["explain"]["prompt_tokens"] == 500


def test_score_stage_picks_candidates_and_records_failures(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import neuroscribe.results

    monkeypatch.setattr(pipeline, "RecordStore", FakeStore)
    monkeypatch.setattr(neuroscribe.results, "index_run", lambda run_dir: None)
    monkeypatch.setattr(neuroscribe.results, "summarize", lambda run_dir: {})
    run = tmp_path / "run"
    entries = {0: ["valid-only", "cal-only"], 1: ["boom"]}
    for unit, cands in entries.items():
        path = explanation_path(run, "h.0", unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"hookpoint": "h.0", "unit": unit, "explainer": "x",
                                    "explanation": cands[0], "candidates": cands}))
    acts = {**neuron(0, 0)[1], **neuron(0, 1)[1]}
    pipeline.score(ScoreConfig(simulator="json"), run, sim=SplitAwareSimulator(acts))
    detail = json.loads(score_path(run, "h.0", 0, "scores").read_text())
    assert detail["explanation"] == "cal-only"
    assert [c["calibration_ev_correlation"] for c in detail["candidates"]] == [-1.0, 1.0]
    assert detail["scores"]["valid_all"]["ev_correlation_score"] == pytest.approx(-1.0)
    res = loads(score_path(run, "h.0", 0).read_text())
    assert res.scored_explanations[0].explanation == "cal-only"
    failed = json.loads(score_path(run, "h.0", 1, "scores").read_text())
    assert failed["failure"].startswith("every candidate failed") and failed["scores"] == {}
    assert not score_path(run, "h.0", 1).exists()
    saved = json.loads((run / "score.json").read_text())
    assert (saved["scored"], saved["failed"]) == (1, 1)


def _echo_with_cat_detector(req: Request) -> Response:
    """Echo the prompt split at tabs and newlines; at each 'unknown' slot predict 10 when the
    line's token contains 'cat', else 0."""
    import re as _re

    toks = _re.findall(r"unknown|\t|\n|[^\t\n]+", req.prompt)
    tops: list[dict[str, float]] = []
    for i, t in enumerate(toks):
        cat = t == "unknown" and i >= 2 and "cat" in toks[i - 2]
        tops.append({"10" if cat else "0": 0.0} if t == "unknown" else {})
    return Response(text="", tokens=toks, top_logprobs=tops)


@pytest.mark.parametrize("budget,n_requests", [(0, 4), (4, 4), (5, 2), (100, 1)])
def test_openai_simulator_fills_several_records_in_one_prompt(
        tmp_path: Path, budget: int, n_requests: int) -> None:
    seqs = [["a", " cat"], ["the", " dog", " sat"], [" cat", "s"], ["x", " y", " cat"]]
    c = client(tmp_path, _echo_with_cat_detector)
    sim = OpenAISimulator(ScoreConfig(simulator="openai", sim_batch_tokens=budget,
                                      sim_fill="unknown"), c)
    many = asyncio.run(sim.simulate_many("cats", seqs))
    assert [s.tokens for s in many] == seqs
    assert [s.expected_activations for s in many] == [
        [0, 10], [0, 0, 0], [10, 0], [0, 0, 10]]
    assert len(c.backend.requests) == n_requests
    if budget == 100:
        assert c.backend.requests[0].prompt == prompts.openai_simulate_prompt_many("cats", seqs)
    one = [asyncio.run(sim.simulate("cats", s)).expected_activations for s in seqs]
    assert one == [s.expected_activations for s in many]
