"""Scorers without logprobs (detection, fuzzing, embedding): the examples they build, exact
prompts, probabilities from answer logprobs, and metrics against oracles and anti-oracles on a
fake backend. The embedding scorer runs the real MiniLM model."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_llm_explain import FakeBackend

from neuroscribe.classify import (
    ClassifyConfig,
    DetectionScorer,
    EmbeddingScorer,
    Example,
    FuzzingScorer,
    answer_probabilities,
    classify_messages,
    detection_examples,
    fuzzing_examples,
    make_scorers,
    mark_text,
)
from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord
from neuroscribe.llm import Client, LLMConfig, Request, Response, ResponseCache

T = TypeVar("T")


def rec(words: list[str], acts: list[float]) -> ActivationRecord:
    return ActivationRecord(tokens=words, activations=acts)


# " cat" is what the unit fires on; the peak is 8, so at threshold 0.25 a token is active
# from 2.0 on, and 1.5 (the " dog") is not.
RECORDS = [
    rec(["the", " cat", " sat"], [0.0, 8.0, 0.0]),
    rec(["a", " cat", " ran", " far"], [0.0, 6.0, 0.5, 0.0]),
    rec(["my", " cat", " and", " your", " cat"], [0.0, 4.0, 0.0, 0.0, 3.0]),
    rec(["one", " cat"], [0.0, 2.0]),
    rec(["the", " dog", " sat"], [0.0, 1.5, 0.0]),
    rec(["so", " it", " goes"], [0.0, 0.0, 0.0]),
    rec(["rain", " fell"], [0.1, 0.0]),
]


def test_detection_labels_follow_the_threshold() -> None:
    ex = detection_examples(RECORDS, 0.25)
    assert [e.label for e in ex] == [True, True, True, True, False, False, False]
    assert all(e.marked == () for e in ex)
    # A higher threshold (0.5 x 8 = 4) leaves only the first three records active.
    assert [e.label for e in detection_examples(RECORDS, 0.5)] == [True] * 3 + [False] * 4


def test_fuzzing_marks_active_tokens_or_as_many_random_inactive_ones() -> None:
    ex = fuzzing_examples(RECORDS, 0.25, seed=3)
    assert len(ex) == 4  # the active records only
    assert sum(e.label for e in ex) == 2  # half correctly marked
    for e in ex:
        r = next(r for r in RECORDS if tuple(r.tokens) == e.tokens)
        active = tuple(i for i, a in enumerate(r.activations) if a >= 2.0)
        if e.label:
            assert e.marked == active
        else:
            assert len(e.marked) == len(active) and not set(e.marked) & set(active)
    assert ex == fuzzing_examples(RECORDS, 0.25, seed=3)
    assert ex != fuzzing_examples(RECORDS, 0.25, seed=4)


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


def examples_in(req: Request) -> list[str]:
    return [json.loads(m) for m in re.findall(r"^Example \d+: (.*)$", req.messages[1][1], re.M)]


def fake_client(tmp_path: Path, answer: Callable[[str], int]) -> Client:
    def reply(req: Request) -> Response:
        return Response(text=json.dumps([answer(t) for t in examples_in(req)]),
                        completion_tokens=5)
    return Client(FakeBackend(reply), LLMConfig(retries=0),
                  ResponseCache(tmp_path / "cache.sqlite"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_detection_oracle_and_anti_oracle(tmp_path: Path, batch: int) -> None:
    cfg = ClassifyConfig(classify_batch=batch)

    def cat(text: str) -> int:  # an oracle: the unit fires on " cat"
        return int(" cat" in text)

    good = run(DetectionScorer(cfg, fake_client(tmp_path / "a", cat)).score("cats", RECORDS))
    assert good == {"n": 7, "n_active": 4, "failed": 0, "balanced_accuracy": 1.0, "f1": 1.0,
                    "auroc": None}
    bad = run(DetectionScorer(cfg, fake_client(tmp_path / "b", lambda t: 1 - cat(t))).score(
        "cats", RECORDS))
    assert bad["balanced_accuracy"] == 0.0 and bad["f1"] == 0.0
    yes = run(DetectionScorer(cfg, fake_client(tmp_path / "c", lambda t: 1)).score(
        "cats", RECORDS))
    assert yes["balanced_accuracy"] == 0.5 and yes["f1"] == pytest.approx(8 / 11)


def test_fuzzing_oracle(tmp_path: Path) -> None:
    cfg = ClassifyConfig(classify_batch=2)
    oracle = run(FuzzingScorer(cfg, fake_client(tmp_path / "a", lambda t: int(
        re.fullmatch(r"(<< cat>>|[^<])*", t) is not None))).score("cats", RECORDS))
    assert oracle["n"] == 4 and oracle["balanced_accuracy"] == 1.0


def test_a_batch_that_cannot_be_parsed_is_counted_as_failed(tmp_path: Path) -> None:
    def reply(req: Request) -> Response:
        texts = examples_in(req)
        return Response(text="no idea" if "my cat and your cat" in texts else
                        json.dumps([1] * len(texts)))
    c = Client(FakeBackend(reply), LLMConfig(retries=0), None)
    out = run(DetectionScorer(ClassifyConfig(classify_batch=1), c).score("cats", RECORDS))
    assert out["failed"] == 1 and out["n"] == 6
    assert "no JSON list" in out["failures"][0]


def test_unknown_scorer_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown scorer 'detect'"):
        make_scorers(ClassifyConfig(scorers="embedding,detect"))


def test_embedding_scorer_ranks_related_text_first() -> None:
    """Real all-MiniLM-L6-v2: texts about colours against unrelated texts."""
    recs = [rec(["the", " red", " car"], [0.0, 9.0, 0.0]),
            rec(["a", " blue", " sky"], [0.0, 8.0, 0.0]),
            rec(["green", " and", " yellow", " paint"], [7.0, 0.0, 6.0, 0.0]),
            rec(["tax", " law", " reform"], [0.0, 0.0, 0.0]),
            rec(["the", " train", " left", " late"], [0.0, 0.0, 0.0, 0.0]),
            rec(["he", " ate", " soup"], [0.0, 0.0, 0.0])]
    good = run(EmbeddingScorer(ClassifyConfig()).score("names of colours", recs))
    assert good == {"n": 6, "n_active": 3, "failed": 0, "auroc": 1.0}
    bad = run(EmbeddingScorer(ClassifyConfig()).score("taxes, trains and soup", recs))
    assert bad["auroc"] < 0.5
