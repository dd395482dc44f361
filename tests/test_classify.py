"""Scorers without logprobs (detection, fuzzing, embedding): the examples they build (delphi's
definitions), exact prompts, strict reply parsing, probabilities from answer logprobs, and
metrics against oracles and anti-oracles on a fake backend. The embedding scorer runs the real
MiniLM model.

The tests of delphi's definitions go through ``classify_unit`` and the prompts the fake LLM
sees, so that they run (and fail) on the code before those definitions too."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_llm_explain import FakeBackend

import neuroscribe.score.classify as classify
from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord, NeuronId, NeuronRecord
from neuroscribe.llm.client import Client, LLMConfig, Request, Response, ResponseCache
from neuroscribe.score.classify import (
    ClassifyConfig,
    DetectionScorer,
    EmbeddingScorer,
    Example,
    FuzzingScorer,
    answer_probabilities,
    classify_messages,
    classify_unit,
    make_scorers,
    mark_text,
)

T = TypeVar("T")


def rec(words: list[str], acts: list[float]) -> ActivationRecord:
    return ActivationRecord(tokens=words, activations=acts)


# " cat" is what the unit fires on: the held-out top records. The held-out random records: two
# where the unit never fires (the negatives), one where it fires weakly and one where it fires
# on a cat (neither, by delphi's definitions).
TOP = [
    rec(["the", " cat", " sat"], [0.0, 8.0, 0.0]),
    rec(["a", " cat", " ran", " far"], [0.0, 6.0, 0.5, 0.0]),
    rec(["my", " cat", " and", " your", " cat"], [0.0, 4.0, 0.0, 0.0, 3.0]),
    rec(["one", " cat"], [0.0, 2.0]),
]
ZERO = [rec(["so", " it", " goes"], [0.0, 0.0, 0.0]), rec(["rain", " fell"], [0.0, -0.2]),
        rec(["we", " left", " early"], [0.0, 0.0, 0.0]), rec(["ok"], [0.0])]
WEAK = rec(["the", " dog", " sat"], [0.0, 1.5, 0.0])
FIRES = rec(["her", " cat", " slept"], [0.0, 7.0, 0.0])


def unit(top: Sequence[ActivationRecord], rand: Sequence[ActivationRecord]) -> NeuronRecord:
    """A neuron record whose valid and test splits hold exactly ``top`` and ``rand`` (even
    counts); the train and calibration records are "TRAIN" and "CAL", never to be shown."""
    assert len(top) % 2 == 0 and len(rand) % 2 == 0
    train, cal = rec(["TRAIN"], [9.0]), rec(["CAL"], [0.0])
    tops = [r for i in range(0, len(top), 2) for r in (train, train, top[i], top[i + 1])]
    rands = [r for i in range(0, len(rand), 2) for r in (cal, rand[i], rand[i + 1])]
    return NeuronRecord(neuron_id=NeuronId(0, 0), random_sample=rands,
                        most_positive_activation_records=tops)


def held(top: Sequence[ActivationRecord], rand: Sequence[ActivationRecord]) -> Any:
    return classify.HeldOut(tuple(top), tuple(rand))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def examples_in(req: Request) -> list[str]:
    return [json.loads(m) for m in re.findall(r"^Example \d+: (.*)$", req.messages[1][1], re.M)]


def fake_client(tmp_path: Path | None, answer: Callable[[str], int]) -> Client:
    def reply(req: Request) -> Response:
        return Response(text=json.dumps([answer(t) for t in examples_in(req)]),
                        completion_tokens=5)
    cache = None if tmp_path is None else ResponseCache(tmp_path / "cache.sqlite")
    return Client(FakeBackend(reply), LLMConfig(retries=0), cache)


def shown(client: Client) -> list[str]:
    return [t for req in client.backend.requests for t in examples_in(req)]


def marks_of(text: str, tokens: Sequence[str]) -> tuple[int, ...] | None:
    """The marked token indices of ``text`` if it is ``tokens`` with marks, else None."""
    pos, inside, out = 0, False, []
    for i, tok in enumerate(tokens):
        if text.startswith("<<", pos):
            pos, inside = pos + 2, True
        if not text.startswith(tok, pos):
            return None
        pos += len(tok)
        if inside:
            out.append(i)
        if text.startswith(">>", pos):
            pos, inside = pos + 2, False
    return tuple(out) if pos == len(text) else None


def delphi_active(r: ActivationRecord) -> tuple[int, ...]:
    """delphi's rule, restated: at 0.3 of the record's own max."""
    return tuple(i for i, a in enumerate(r.activations) if a >= 0.3 * max(r.activations))


def fuzz_oracle(records: Sequence[ActivationRecord]) -> Callable[[str], int]:
    """1 exactly when the marks are the record's active tokens."""
    def answer(text: str) -> int:
        return int(any(marks_of(text, r.tokens) == delphi_active(r) for r in records))
    return answer


def score_unit(cfg: ClassifyConfig, nr: NeuronRecord, answer: Callable[[str], int]
               ) -> tuple[dict[str, Any], list[str]]:
    client = fake_client(None, answer)
    out = run(classify_unit(make_scorers(cfg, client), "cats", nr))
    return out, shown(client)


def test_marks_are_at_0_3_of_each_records_own_max() -> None:
    """delphi highlights tokens at 0.3 x the example's own max; the old rule, 0.25 x the peak
    over all records, marked " mid" (2.6 >= 2.5) and left the small record unshown."""
    big = rec(["x", " big", " mid", " low"], [0.0, 10.0, 2.6, 0.0])
    small = rec(["y", " small", " tiny", " end"], [0.0, 1.0, 0.35, 0.0])
    out, texts = score_unit(ClassifyConfig(scorers="fuzzing"), unit([big, small], ZERO),
                            lambda t: 1)
    assert "x<< big>> mid low" in texts
    assert "y<< small tiny>> end" in texts
    assert out["fuzzing"]["n_active"] == 2
    assert ClassifyConfig().active_threshold == 0.3


def test_detection_negatives_are_random_records_where_the_unit_never_fires() -> None:
    """Positives: the held-out top records; negatives: held-out random records with max
    activation <= 0. A random record that fires weakly or strongly is neither."""
    nr = unit(TOP, [*ZERO, WEAK, FIRES])
    out, texts = score_unit(ClassifyConfig(scorers="detection"), nr, lambda t: int(" cat" in t))
    det = out["detection"]
    assert (det["n"], det["n_active"], det["failed"]) == (8, 4, 0)
    assert sorted(texts) == sorted("".join(r.tokens) for r in [*TOP, *ZERO])
    assert det["balanced_accuracy"] == 1.0 and "notes" not in det
    # The named deviation: random records below 0.3 x the activating peak (8) are negatives.
    out, texts = score_unit(ClassifyConfig(scorers="detection", classify_negatives="weak"), nr,
                            lambda t: 1)
    assert sorted(texts) == sorted("".join(r.tokens) for r in [*TOP, *ZERO, WEAK])


def test_no_non_activating_records_is_a_reported_failure() -> None:
    """Never silently active records as negatives: with none, each scorer fails and says so;
    with fewer negatives than positives, the result notes it."""
    nr = unit(TOP, [WEAK, FIRES])
    out, texts = score_unit(ClassifyConfig(scorers="detection,fuzzing"), nr, lambda t: 1)
    assert texts == []
    for name in ("detection", "fuzzing"):
        assert "no non-activating examples" in out[name]["failure"]
        assert "--classify-negatives weak" in out[name]["failure"]
    out, _ = score_unit(ClassifyConfig(scorers="detection"), unit(TOP, [ZERO[0], WEAK]),
                        lambda t: 1)
    assert out["detection"]["notes"] == ["only 1 non-activating examples for 4 activating ones"]


def test_fuzzing_marks_every_activating_example_and_wrongly_marks_non_activating_ones() -> None:
    """delphi's default fuzzing: every activating example marked at its active tokens (1);
    every non-activating example marked at n_incorrect random tokens (0), n_incorrect being
    the ceiling of the mean number of firing tokens per activating example: (1+2+2+1)/4 -> 2."""
    out, texts = score_unit(ClassifyConfig(scorers="fuzzing"), unit(TOP, [*ZERO, WEAK, FIRES]),
                            fuzz_oracle(TOP))
    assert len(texts) == 8 and len(set(texts)) == 8
    for r in TOP:
        assert [marks_of(t, r.tokens) for t in texts if marks_of(t, r.tokens) is not None] == [
            delphi_active(r)]
    for r in ZERO:
        (marks,) = [m for t in texts if (m := marks_of(t, r.tokens)) is not None]
        assert len(marks) == min(2, len(r.tokens))
    fz = out["fuzzing"]
    assert (fz["n"], fz["n_active"], fz["balanced_accuracy"]) == (8, 4, 1.0)


def test_active_fuzzing_adds_a_wrongly_marked_copy_of_every_activating_example() -> None:
    """``--classify-fuzz active`` (delphi's fuzz_type "active"): each activating example once
    correctly marked and once marked at 2 random tokens that are not active."""
    cfg = ClassifyConfig(scorers="fuzzing", classify_fuzz="active")
    out, texts = score_unit(cfg, unit(TOP, ZERO), fuzz_oracle(TOP))
    assert len(texts) == 8
    for r in TOP:
        marks = [m for t in texts if (m := marks_of(t, r.tokens)) is not None]
        assert delphi_active(r) in marks and len(marks) == 2
        (wrong,) = [m for m in marks if m != delphi_active(r)]
        inactive = len(r.tokens) - len(delphi_active(r))
        assert len(wrong) == min(2, inactive) and not set(wrong) & set(delphi_active(r))
    assert out["fuzzing"]["balanced_accuracy"] == 1.0
    # 'marked': as many wrong marks as the mean number of marked tokens, ceil(5 / 4) = 2.
    assert classify.n_incorrect(TOP, 0.3, "marked") == 2
    assert classify.n_incorrect([rec(["a", " b", " c"], [1.0, 0.1, 0.0])], 0.3, "firing") == 2


@pytest.mark.parametrize("scheme", ["default", "active"])
def test_a_record_active_on_every_token_never_gets_a_wrong_label(scheme: str) -> None:
    """A label-0 example never marks an active token: a record active everywhere gets no
    wrongly marked copy (the old code marked all its tokens, exactly the right marks, as 0)."""
    full = [rec(["one", " cat"], [5.0, 6.0]), rec(["cat"], [7.0])]
    top = full + (TOP[:2] if scheme == "active" else [])
    # The default scheme without naming it, so that this also runs on the code before it.
    cfg = ClassifyConfig(scorers="fuzzing", **({"classify_fuzz": scheme} if scheme != "default"
                                                else {}))
    out, texts = score_unit(cfg, unit(top, ZERO), fuzz_oracle(top))
    for r in full:
        assert [m for t in texts if (m := marks_of(t, r.tokens)) is not None] == [(0, 1)[
            :len(r.tokens)]]
    assert out["fuzzing"]["balanced_accuracy"] == 1.0
    if scheme == "active":
        assert out["fuzzing"]["notes"] == [
            "2 records have no inactive token: no wrongly marked example for them"]
        cfg = ClassifyConfig(scorers="fuzzing", classify_fuzz="active")
        out, texts = score_unit(cfg, unit(full, ZERO), lambda t: 1)
        assert "no wrongly marked examples" in out["fuzzing"]["failure"] and texts == []


@pytest.mark.parametrize("reply", ["[1, 1", "[1, 0]", "[1, 0, 1, 1]", "[1, 0, 7]",
                                   "[1, 0, 0.5]"])
def test_a_reply_cut_short_or_repaired_is_a_failure_not_answers(reply: str) -> None:
    """One batch of 3 examples; a reply that would need padding, cutting or rounding is a
    failure with its reason, never predictions (the old code padded "[1, 1" with a 0)."""
    def answer(req: Request) -> Response:
        return Response(text=reply)
    client = Client(FakeBackend(answer), LLMConfig(retries=0), None)
    cfg = ClassifyConfig(scorers="detection", classify_batch=3)
    out = run(classify_unit(make_scorers(cfg, client), "cats", unit(TOP[:2], [ZERO[0], WEAK])))
    det = out["detection"]
    assert (det["n"], det["failed"]) == (0, 3)
    assert len(det["failures"]) == 1 and det["failures"][0].startswith("ClassifyError")


def test_parse_answers() -> None:
    parse = classify.parse_answers
    assert parse("[1, 0, 1]", 3) == [True, False, True]
    assert parse("Sure:\n```json\n[0,1]\n```", 2) == [False, True]  # as delphi: first list
    assert parse("[true, 0]", 2) == [True, False]
    for text, n, why in [("[1, 1", 5, "cut short"), ("[1, 1]", 5, "2 answers for 5"),
                         ("[1, 0, 2]", 3, "other than 0 or 1"), ("no idea", 1, "no JSON list"),
                         ("[1, 0,]", 3, "not JSON"), ('["1"]', 1, "other than 0 or 1")]:
        with pytest.raises(classify.ClassifyError, match=why):
            parse(text, n)


def test_mark_text_wraps_each_run_once() -> None:
    toks = ["a", " b", " c", " d", " e"]
    assert mark_text(toks, (1, 2, 4)) == "a<< b c>> d<< e>>"
    assert mark_text(toks, ()) == "a b c d e"


def test_detection_prompt_exact() -> None:
    msgs = classify_messages("detection", " cats ", [Example(("the", " cat"), True),
                                                     Example(("a\tb",), False)])
    assert msgs[0][0] == "system" and msgs[0][1].startswith("We are studying neurons")
    assert msgs[1] == ("user", 'Explanation: the main thing this neuron does is find cats\n\n'
                       'Example 1: "the cat"\nExample 2: "a\\tb"\n\n'
                       "Reply with a JSON list of 2 integers, each 0 or 1.")


def test_fuzzing_prompt_shows_the_marks() -> None:
    msgs = classify_messages("fuzzing", "cats", [Example(("the", " cat"), True, (1,))])
    assert 'Example 1: "the<< cat>>"' in msgs[1][1]
    assert "<< and >>" in msgs[0][1]


def test_answer_probabilities_from_token_logprobs() -> None:
    lp = math.log
    resp = Response(text="[1, 0]", tokens=["[", "1", ",", " 0", "]"], top_logprobs=[
        {"[": 0.0}, {"1": lp(0.6), "0": lp(0.2), "x": lp(0.2)}, {",": 0.0},
        {" 0": lp(0.9), " 1": lp(0.1)}, {"]": 0.0}])
    got = answer_probabilities(resp, 2)
    assert got == pytest.approx([0.75, 0.1])
    assert answer_probabilities(resp, 3) is None  # the count must match
    assert answer_probabilities(Response(text="[1, 0]"), 2) is None  # no logprobs


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_detection_oracle_and_anti_oracle(tmp_path: Path, batch: int) -> None:
    cfg, ho = ClassifyConfig(classify_batch=batch), held(TOP, [*ZERO, WEAK, FIRES])

    def cat(text: str) -> int:  # an oracle: the unit fires on " cat"
        return int(" cat" in text)

    good = run(DetectionScorer(cfg, fake_client(tmp_path / "a", cat)).score("cats", ho))
    assert good == {"n": 8, "n_active": 4, "failed": 0, "balanced_accuracy": 1.0, "f1": 1.0,
                    "auroc": None}
    bad = run(DetectionScorer(cfg, fake_client(tmp_path / "b", lambda t: 1 - cat(t))).score(
        "cats", ho))
    assert bad["balanced_accuracy"] == 0.0 and bad["f1"] == 0.0
    yes = run(DetectionScorer(cfg, fake_client(tmp_path / "c", lambda t: 1)).score("cats", ho))
    assert yes["balanced_accuracy"] == 0.5 and yes["f1"] == pytest.approx(2 / 3)


def test_fuzzing_oracle(tmp_path: Path) -> None:
    cfg = ClassifyConfig(classify_batch=2)
    oracle = run(FuzzingScorer(cfg, fake_client(tmp_path / "a", lambda t: int(
        re.fullmatch(r"(<< cat>>|[^<])*", t) is not None))).score("cats", held(TOP, ZERO)))
    assert (oracle["n"], oracle["n_active"], oracle["balanced_accuracy"]) == (8, 4, 1.0)


def test_a_batch_that_cannot_be_parsed_is_counted_as_failed() -> None:
    def reply(req: Request) -> Response:
        texts = examples_in(req)
        return Response(text="no idea" if "my cat and your cat" in texts else
                        json.dumps([1] * len(texts)))
    c = Client(FakeBackend(reply), LLMConfig(retries=0), None)
    out = run(DetectionScorer(ClassifyConfig(classify_batch=1), c).score(
        "cats", held(TOP, ZERO)))
    assert out["failed"] == 1 and out["n"] == 7
    assert "no JSON list" in out["failures"][0]


def test_unknown_scorer_or_option_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown scorer 'detect'"):
        make_scorers(ClassifyConfig(scorers="embedding,detect"))
    with pytest.raises(UserError, match="unknown classify_negatives 'none'"):
        make_scorers(ClassifyConfig(scorers="detection", classify_negatives="none"))


def test_options_on_the_command_line() -> None:
    from neuroscribe.cli import add_config

    parser = argparse.ArgumentParser()
    add_config(parser, ClassifyConfig)
    args = parser.parse_args(["--classify-negatives", "weak", "--classify-fuzz", "active",
                              "--classify-fuzz-count", "marked", "--active-threshold", "0.5"])
    assert (args.classify_negatives, args.classify_fuzz, args.classify_fuzz_count,
            args.active_threshold) == ("weak", "active", "marked", 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--classify-fuzz", "half"])


def test_embedding_scorer_ranks_related_text_first() -> None:
    """Real all-MiniLM-L6-v2: texts about colours against unrelated texts."""
    top = [rec(["the", " red", " car"], [0.0, 9.0, 0.0]),
           rec(["a", " blue", " sky"], [0.0, 8.0, 0.0]),
           rec(["green", " and", " yellow", " paint"], [7.0, 0.0, 6.0, 0.0])]
    rand = [rec(["tax", " law", " reform"], [0.0, 0.0, 0.0]),
            rec(["the", " train", " left", " late"], [0.0, 0.0, 0.0, 0.0]),
            rec(["he", " ate", " soup"], [0.0, 0.0, 0.0])]
    good = run(EmbeddingScorer(ClassifyConfig()).score("names of colours", held(top, rand)))
    assert good == {"n": 6, "n_active": 3, "failed": 0, "auroc": 1.0}
    bad = run(EmbeddingScorer(ClassifyConfig()).score("taxes, trains and soup",
                                                      held(top, rand)))
    assert bad["auroc"] < 0.5
