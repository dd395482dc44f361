"""Scorers that need no logprobs, after delphi: ``detection`` and ``fuzzing`` (an LLM labels
examples 0/1) and ``embedding`` (no LLM: AUROC of explanation-example similarity).

They see only the validation and test records, never the records the explanation was written
from. A record is *active* when its peak activation reaches ``active_threshold`` times the
peak over those records; a token is active by the same rule.

- detection: every record, plain; the label is whether it is active.
- fuzzing: the active records, half with their active tokens marked ``<<like this>>`` (label 1)
  and half with as many tokens marked at random, avoiding active ones (label 0).
- embedding: every record, plain; the score is the cosine similarity of its text to the
  explanation (all-MiniLM-L6-v2), and the result its AUROC.

Metrics: balanced accuracy and F1 of the 0/1 answers, and AUROC where probabilities exist (the
LLM's logprobs of its "0"/"1" answer tokens, or the embedding similarity).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import UserError
from .formats import ActivationRecord
from .llm import Client, LLMError, Request, Response, make_client
from .prompts import Messages, load
from .runs import opt
from .score import auroc, balanced_accuracy, f1_score
from .simulate import Embedder, SimulateConfig, SimulationError
from .simulate_llm import parse_json_values


@dataclass
class ClassifyConfig(SimulateConfig):
    """The scorers that need no logprobs (the LLM options serve detection and fuzzing)."""

    scorers: str = opt("", "extra scorers on the valid and test records, comma-separated: "
                       "detection, fuzzing (LLM, no logprobs needed), embedding (no LLM)")
    active_threshold: float = opt(0.25, "a record or token is active at this fraction of the "
                                  "peak activation")
    classify_batch: int = opt(5, "examples per detection or fuzzing prompt")
    classify_seed: int = opt(0, "seed of the example order and of the fuzzing marks")


@dataclass(frozen=True)
class Example:
    """One record to label: its tokens, the true label, and the marked token indices."""

    tokens: tuple[str, ...]
    label: bool
    marked: tuple[int, ...] = ()


def peak(records: Sequence[ActivationRecord]) -> float:
    return max((max(r.activations, default=0.0) for r in records), default=0.0)


def active_tokens(record: ActivationRecord, max_act: float, threshold: float) -> list[int]:
    if max_act <= 0:
        return []
    return [i for i, a in enumerate(record.activations) if a >= threshold * max_act]


def detection_examples(records: Sequence[ActivationRecord], threshold: float) -> list[Example]:
    top = peak(records)
    return [Example(tuple(r.tokens), bool(active_tokens(r, top, threshold))) for r in records]


def fuzzing_examples(records: Sequence[ActivationRecord], threshold: float,
                     seed: int = 0) -> list[Example]:
    """Active records only: the first half (in a seeded order) marked where the unit fires,
    the rest marked at as many random inactive tokens."""
    top, rng = peak(records), random.Random(seed)
    active = [(r, active_tokens(r, top, threshold)) for r in records]
    active = [(r, idx) for r, idx in active if idx]
    rng.shuffle(active)
    out = []
    for i, (r, idx) in enumerate(active):
        if i < (len(active) + 1) // 2:
            out.append(Example(tuple(r.tokens), True, tuple(idx)))
            continue
        pool = [j for j in range(len(r.tokens)) if j not in set(idx)] or list(range(len(r.tokens)))
        out.append(Example(tuple(r.tokens), False,
                           tuple(sorted(rng.sample(pool, min(len(idx), len(pool)))))))
    return out


def mark_text(tokens: Sequence[str], marked: Sequence[int]) -> str:
    """Tokens joined, with each run of marked tokens wrapped once in the highlight marks."""
    h, on, parts = load("classify")["highlight"], set(marked), []
    for i, tok in enumerate(tokens):
        if i in on and i - 1 not in on:
            parts.append(h["open"])
        parts.append(tok)
        if i in on and i + 1 not in on:
            parts.append(h["close"])
    return "".join(parts)


def classify_messages(kind: str, explanation: str, examples: Sequence[Example]) -> Messages:
    """The ``detection`` or ``fuzzing`` chat prompt for a batch of examples."""
    t = load("classify")
    listed = "\n".join(t["example"].format(index=i + 1, text=json.dumps(
        mark_text(e.tokens, e.marked), ensure_ascii=False)) for i, e in enumerate(examples))
    user = t[kind]["user"].format(prefix=load("common")["prefix"],
                                  explanation=explanation.strip(), examples=listed,
                                  n=len(examples))
    return (("system", t[kind]["system"]), ("user", user))


def answer_probabilities(resp: Response, n: int) -> list[float] | None:
    """P(1) for each answer, read from the logprobs of the generated "0"/"1" tokens of a chat
    reply; None when the reply has no logprobs or not exactly ``n`` such tokens."""
    if not resp.tokens or len(resp.top_logprobs) != len(resp.tokens):
        return None
    probs = []
    for tok, top in zip(resp.tokens, resp.top_logprobs):
        if tok.strip() not in ("0", "1"):
            continue
        p = {"0": 0.0, "1": 0.0}
        for k, v in top.items():
            if k.strip() in p:
                p[k.strip()] += math.exp(v)
        total = p["0"] + p["1"]
        probs.append(p["1"] / total if total > 0 else float(tok.strip() == "1"))
    return probs if len(probs) == n else None


def metrics(labels: Sequence[bool], predicted: Sequence[bool] | None,
            probabilities: Sequence[float] | None, failed: int = 0) -> dict[str, Any]:
    def clean(x: float) -> float | None:
        return None if not math.isfinite(x) else round(x, 6)

    out: dict[str, Any] = {"n": len(labels), "n_active": int(sum(labels)), "failed": failed}
    if predicted is not None:
        out["balanced_accuracy"] = clean(balanced_accuracy(predicted, labels))
        out["f1"] = clean(f1_score(predicted, labels))
    out["auroc"] = None if probabilities is None else clean(auroc(probabilities, labels))
    return out


class Scorer(Protocol):
    async def score(self, explanation: str, records: Sequence[ActivationRecord]) -> dict[str, Any]:
        """Metrics of the explanation on these (validation and test) records."""
        ...


class LLMClassifier:
    """Labels examples in batches of ``classify_batch`` through an LLM client."""

    kind = ""

    def __init__(self, cfg: ClassifyConfig, client: Client | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else make_client(cfg)

    def examples(self, records: Sequence[ActivationRecord]) -> list[Example]:
        raise NotImplementedError

    async def _batch(self, explanation: str, batch: Sequence[Example]
                     ) -> tuple[list[bool], list[float] | None]:
        resp = await self.client.complete(Request(
            messages=classify_messages(self.kind, explanation, batch),
            max_tokens=4 * len(batch) + 16, top_logprobs=5, stage="score"))
        values, _ = parse_json_values(resp.text, len(batch))
        return [v >= 0.5 for v in values], answer_probabilities(resp, len(batch))

    async def score(self, explanation: str, records: Sequence[ActivationRecord]) -> dict[str, Any]:
        examples = self.examples(records)
        random.Random(self.cfg.classify_seed).shuffle(examples)
        size = max(1, self.cfg.classify_batch)
        batches = [examples[i:i + size] for i in range(0, len(examples), size)]
        results = await asyncio.gather(*[self._batch(explanation, b) for b in batches],
                                       return_exceptions=True)
        labels, predicted, probs, failed, reasons = [], [], [], 0, []
        for batch, res in zip(batches, results):
            if isinstance(res, (SimulationError, LLMError)):
                failed += len(batch)
                reasons.append(f"{type(res).__name__}: {res}")
                continue
            if isinstance(res, BaseException):
                raise res
            labels += [e.label for e in batch]
            predicted += res[0]
            probs = None if probs is None or res[1] is None else probs + res[1]
        out = metrics(labels, predicted, probs, failed)
        return {**out, "failures": reasons} if reasons else out


class DetectionScorer(LLMClassifier):
    kind = "detection"

    def examples(self, records: Sequence[ActivationRecord]) -> list[Example]:
        return detection_examples(records, self.cfg.active_threshold)


class FuzzingScorer(LLMClassifier):
    kind = "fuzzing"

    def examples(self, records: Sequence[ActivationRecord]) -> list[Example]:
        return fuzzing_examples(records, self.cfg.active_threshold, self.cfg.classify_seed)


class EmbeddingScorer:
    """AUROC of the cosine similarity between the explanation and each record's text."""

    def __init__(self, cfg: ClassifyConfig, client: Client | None = None) -> None:
        self.cfg = cfg
        self.embed = Embedder(cfg.embed_device)

    async def score(self, explanation: str, records: Sequence[ActivationRecord]) -> dict[str, Any]:
        examples = detection_examples(records, self.cfg.active_threshold)
        vecs = self.embed(["".join(e.tokens) for e in examples])
        sims = (vecs @ self.embed([explanation])[0]).tolist() if examples else []
        return metrics([e.label for e in examples], None, sims)


SCORERS: dict[str, type] = {"detection": DetectionScorer, "fuzzing": FuzzingScorer,
                            "embedding": EmbeddingScorer}


def scorer_names(cfg: ClassifyConfig) -> list[str]:
    names = [s.strip() for s in cfg.scorers.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCORERS]
    if unknown:
        raise UserError(f"unknown scorer {unknown[0]!r}; have {sorted(SCORERS)}")
    return names


async def classify_unit(scorers: dict[str, Scorer], explanation: str, nr: Any,
                        n_per_split: int | None = None) -> dict[str, Any]:
    """Each scorer's metrics on the unit's validation and test records (top and random); a
    failure is recorded under the scorer's name, never raised."""
    records = [r for split in ("valid", "test")
               for r in nr.top_split(split, n_per_split) + nr.random_split(split, n_per_split)]
    out: dict[str, Any] = {}
    for name, scorer in scorers.items():
        try:
            out[name] = await scorer.score(explanation, records)
        except (SimulationError, LLMError) as e:
            out[name] = {"failure": f"{type(e).__name__}: {e}"}
    return out


def make_scorers(cfg: ClassifyConfig, client: Client | None = None) -> dict[str, Scorer]:
    """The configured scorers; the LLM ones share ``client`` (one local model in memory)."""
    names = scorer_names(cfg)
    if client is None and any(issubclass(SCORERS[n], LLMClassifier) for n in names):
        client = make_client(cfg)
    return {n: SCORERS[n](cfg, client) for n in names}
