"""Scorers that need no logprobs, after delphi: ``detection`` and ``fuzzing`` (an LLM labels
examples 0/1) and ``embedding`` (no LLM: AUROC of explanation-example similarity).

They see only the validation and test records, never the records the explanation was written
from. By default every definition is delphi's (``delphi/scorers/classifier``):

- activating examples: the held-out top records on which the unit fires (max activation > 0).
- non-activating examples: held-out random records on which the unit does not fire at all (max
  activation <= 0; delphi's ``not_active`` contexts). ``--classify-negatives weak`` (a
  deviation) takes instead the random records below ``active_threshold`` x the activating
  examples' peak. With no negatives a scorer fails and says so; with fewer negatives than
  activating examples its result notes it. Random records that fire are never negatives.
- a token is *active* (marked in fuzzing) where its activation reaches ``active_threshold``
  (0.3) x its own record's max activation, and is > 0.
- detection: activating examples (label 1) and non-activating ones (label 0), plain.
- fuzzing: every activating example with its active tokens marked ``<<like this>>`` (label 1),
  plus (``--classify-fuzz default``) every non-activating example, or (``active``) a copy of
  every activating example, with ``n_incorrect`` tokens marked at random among tokens that are
  not active (label 0; delphi's ``<=`` threshold could mark a token exactly at it). The
  ceiling of the mean number of tokens that fire (> 0) per activating example is
  ``n_incorrect`` (``--classify-fuzz-count marked``, a deviation: of marked tokens). A record
  with no inactive token gets no wrongly marked example (delphi shows a placeholder sentence).
  Not reproduced: delphi always marks the token at ``len - len // 4`` (its centred windows'
  activating position) and reseeds ``random`` with 22 for every example.
- embedding: the detection examples, plain; the score is the cosine similarity of each text to
  the explanation (all-MiniLM-L6-v2), and the result its AUROC.

Positives differ from delphi's in one way: delphi samples its test examples from activation
quantiles, these are the held-out top-activating records.

A reply counts only when its first ``[...]`` list holds exactly one 0 or 1 per example; one cut
short, with a wrong count or other values, is never padded, cut or rounded into answers: its
examples count as ``failed`` and the reason is listed under ``failures``.

Metrics: balanced accuracy and F1 of the 0/1 answers, and AUROC where probabilities exist (the
LLM's logprobs of its "0"/"1" answer tokens, or the embedding similarity).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord
from neuroscribe.llm.client import Client, LLMError, Request, Response, make_client
from neuroscribe.prompts import Messages, load
from neuroscribe.runs import opt
from neuroscribe.score.core import auroc, balanced_accuracy, f1_score
from neuroscribe.score.intervention import InterventionConfig, InterventionScorer
from neuroscribe.simulate.core import Embedder, SimulateConfig, SimulationError

NEGATIVES = ("zero", "weak")
FUZZ = ("default", "active")
FUZZ_COUNT = ("firing", "marked")


@dataclass
class ClassifyConfig(SimulateConfig, InterventionConfig):
    """The scorers that need no logprobs (the LLM options serve detection and fuzzing)."""

    scorers: str = opt("", "extra scorers on the valid and test records, comma-separated: "
                       "detection, fuzzing (LLM, no logprobs needed), embedding (no LLM), "
                       "intervention (steers the subject model; no LLM)")
    active_threshold: float = opt(0.3, "a token is active (marked in fuzzing) at this fraction "
                                  "of its own record's max activation (delphi: 0.3)")
    classify_negatives: str = opt("zero", "non-activating examples: 'zero' (delphi) random "
                                  "records where the unit never fires (max <= 0); 'weak' random "
                                  "records below active-threshold x the activating peak",
                                  choices=NEGATIVES)
    classify_fuzz: str = opt("default", "fuzzing's wrongly marked examples: 'default' (delphi) "
                             "the non-activating examples, 'active' copies of the activating "
                             "ones, marked at random inactive tokens", choices=FUZZ)
    classify_fuzz_count: str = opt("firing", "tokens marked wrongly: ceil of the mean count per "
                                   "activating example of tokens that fire, > 0 ('firing', "
                                   "delphi) or of marked tokens ('marked')", choices=FUZZ_COUNT)
    classify_batch: int = opt(5, "examples per detection or fuzzing prompt")
    classify_seed: int = opt(0, "seed of the example order and of the fuzzing marks")


class ClassifyError(Exception):
    """A scorer cannot score this unit, or an LLM reply is not a full list of 0/1 answers."""


@dataclass(frozen=True)
class HeldOut:
    """The records a scorer may see: the valid and test top records and random records."""

    top: tuple[ActivationRecord, ...]
    random: tuple[ActivationRecord, ...]


@dataclass(frozen=True)
class Example:
    """One record to label: its tokens, the true label, and the marked token indices."""

    tokens: tuple[str, ...]
    label: bool
    marked: tuple[int, ...] = ()


def record_max(record: ActivationRecord) -> float:
    return max(record.activations, default=0.0)


def active_tokens(record: ActivationRecord, threshold: float) -> list[int]:
    """Tokens at ``threshold`` x the record's own max or above, and > 0 (delphi's rule)."""
    cut = threshold * record_max(record)
    return [i for i, a in enumerate(record.activations) if a > 0 and a >= cut]


def activating(held: HeldOut) -> list[ActivationRecord]:
    """The activating examples: held-out top records on which the unit fires."""
    return [r for r in held.top if record_max(r) > 0]


def non_activating(held: HeldOut, negatives: str, threshold: float) -> list[ActivationRecord]:
    """The non-activating examples: random records where the unit never fires ('zero'), or
    ('weak') below ``threshold`` x the activating examples' peak."""
    if negatives == "zero":
        return [r for r in held.random if record_max(r) <= 0]
    peak = max((record_max(r) for r in activating(held)), default=0.0)
    return [r for r in held.random if record_max(r) < threshold * peak]


def detection_examples(positives: Sequence[ActivationRecord],
                       negatives: Sequence[ActivationRecord]) -> list[Example]:
    return ([Example(tuple(r.tokens), True) for r in positives]
            + [Example(tuple(r.tokens), False) for r in negatives])


def n_incorrect(positives: Sequence[ActivationRecord], threshold: float, count: str) -> int:
    """Tokens to mark wrongly: the ceiling of the mean number per activating example of
    tokens that fire ('firing', delphi's ``mean_n_activations_ceil``) or of marked tokens."""
    if not positives:
        return 0
    per = [sum(a > 0 for a in r.activations) if count == "firing"
           else len(active_tokens(r, threshold)) for r in positives]
    return math.ceil(sum(per) / len(per))


def fuzzing_examples(positives: Sequence[ActivationRecord], wrong: Sequence[ActivationRecord],
                     threshold: float, n_marks: int, seed: int = 0
                     ) -> tuple[list[Example], int]:
    """Every positive marked at its active tokens (label 1) and every record of ``wrong``
    marked at ``n_marks`` random tokens that are not active (label 0; fewer if it has fewer),
    and how many records of ``wrong`` got no example because none of their tokens is inactive."""
    rng = random.Random(seed)
    out = [Example(tuple(r.tokens), True, tuple(active_tokens(r, threshold)))
           for r in positives]
    skipped = 0
    for r in wrong:
        active = set(active_tokens(r, threshold))
        pool = [i for i in range(len(r.tokens)) if i not in active]
        if not pool:
            skipped += 1
            continue
        out.append(Example(tuple(r.tokens), False,
                           tuple(sorted(rng.sample(pool, min(n_marks, len(pool)))))))
    return out, skipped


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


FIRST_LIST = re.compile(r"\[[^\[\]]*\]")


def parse_answers(text: str, n: int) -> list[bool]:
    """The 0/1 answers in a reply's first ``[...]`` list (text around it is allowed, as in
    delphi). Raises ClassifyError unless that list holds exactly ``n`` values, each 0 or 1: a
    reply cut short, too short or too long is never padded or cut into answers."""
    found = FIRST_LIST.search(text)
    if found is None:
        if "[" in text:
            raise ClassifyError(f"reply cut short (no closing ']'): {text[-80:]!r}")
        raise ClassifyError(f"no JSON list in the reply: {text[:80]!r}")
    try:
        data = json.loads(found.group(0))
    except json.JSONDecodeError:
        raise ClassifyError(f"the reply's list is not JSON: {found.group(0)[:80]!r}") from None
    if len(data) != n:
        raise ClassifyError(f"{len(data)} answers for {n} examples: {found.group(0)[:80]!r}")
    if not all(isinstance(x, (int, float)) and x in (0, 1) for x in data):
        raise ClassifyError(f"answers other than 0 or 1: {found.group(0)[:80]!r}")
    return [x == 1 for x in data]


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


def check_options(cfg: ClassifyConfig) -> None:
    for name, known in (("classify_negatives", NEGATIVES), ("classify_fuzz", FUZZ),
                        ("classify_fuzz_count", FUZZ_COUNT)):
        if getattr(cfg, name) not in known:
            raise UserError(f"unknown {name} {getattr(cfg, name)!r}; have {list(known)}")


def labelled(held: HeldOut, cfg: ClassifyConfig, negatives: bool = True
             ) -> tuple[list[ActivationRecord], list[ActivationRecord], list[str]]:
    """Activating and (if ``negatives``) non-activating examples, and notes on what is short;
    raises ClassifyError when either kind is missing."""
    pos = activating(held)
    if not pos:
        raise ClassifyError(f"no activating examples: the unit fires on none of the "
                            f"{len(held.top)} held-out top records")
    if not negatives:
        return pos, [], []
    neg = non_activating(held, cfg.classify_negatives, cfg.active_threshold)
    if not neg:
        raise ClassifyError(
            f"no non-activating examples: none of the {len(held.random)} held-out random records "
            + ("has max activation <= 0; try --classify-negatives weak"
               if cfg.classify_negatives == "zero" else
               f"is below {cfg.active_threshold} x the activating peak"))
    notes = ([f"only {len(neg)} non-activating examples for {len(pos)} activating ones"]
             if len(neg) < len(pos) else [])
    return pos, neg, notes


class Scorer(Protocol):
    async def score(self, explanation: str, held: HeldOut) -> dict[str, Any]:
        """Metrics of the explanation on these (validation and test) records."""
        ...


class LLMClassifier:
    """Labels examples in batches of ``classify_batch`` through an LLM client."""

    kind = ""

    def __init__(self, cfg: ClassifyConfig, client: Client | None = None) -> None:
        check_options(cfg)
        self.cfg = cfg
        self.client = client if client is not None else make_client(cfg)

    def examples(self, held: HeldOut) -> tuple[list[Example], list[str]]:
        raise NotImplementedError

    async def _batch(self, explanation: str, batch: Sequence[Example]
                     ) -> tuple[list[bool], list[float] | None]:
        resp = await self.client.complete(Request(
            messages=classify_messages(self.kind, explanation, batch),
            max_tokens=4 * len(batch) + 16, top_logprobs=5, stage="score"))
        return parse_answers(resp.text, len(batch)), answer_probabilities(resp, len(batch))

    async def score(self, explanation: str, held: HeldOut) -> dict[str, Any]:
        examples, notes = self.examples(held)
        random.Random(self.cfg.classify_seed).shuffle(examples)
        size = max(1, self.cfg.classify_batch)
        batches = [examples[i:i + size] for i in range(0, len(examples), size)]
        results = await asyncio.gather(*[self._batch(explanation, b) for b in batches],
                                       return_exceptions=True)
        labels: list[bool] = []
        predicted: list[bool] = []
        probs: list[float] | None = []
        failed, reasons = 0, []
        for batch, res in zip(batches, results):
            if isinstance(res, (ClassifyError, LLMError)):
                failed += len(batch)
                reasons.append(f"{type(res).__name__}: {res}")
                continue
            if isinstance(res, BaseException):
                raise res
            labels += [e.label for e in batch]
            predicted += res[0]
            probs = None if probs is None or res[1] is None else probs + res[1]
        out = metrics(labels, predicted, probs, failed)
        return {**out, **({"failures": reasons} if reasons else {}),
                **({"notes": notes} if notes else {})}


class DetectionScorer(LLMClassifier):
    kind = "detection"

    def examples(self, held: HeldOut) -> tuple[list[Example], list[str]]:
        pos, neg, notes = labelled(held, self.cfg)
        return detection_examples(pos, neg), notes


class FuzzingScorer(LLMClassifier):
    kind = "fuzzing"

    def examples(self, held: HeldOut) -> tuple[list[Example], list[str]]:
        cfg, copies = self.cfg, self.cfg.classify_fuzz == "active"
        pos, neg, notes = labelled(held, cfg, negatives=not copies)
        wrong = pos if copies else neg
        k = n_incorrect(pos, cfg.active_threshold, cfg.classify_fuzz_count)
        examples, skipped = fuzzing_examples(pos, wrong, cfg.active_threshold, k,
                                             cfg.classify_seed)
        if not any(not e.label for e in examples):
            raise ClassifyError(f"no wrongly marked examples: none of the {len(wrong)} records "
                                "to mark wrongly has an inactive token")
        if skipped:
            notes = [*notes, f"{skipped} records have no inactive token: no wrongly marked "
                     "example for them"]
        return examples, notes


class EmbeddingScorer:
    """AUROC of the cosine similarity between the explanation and each record's text."""

    def __init__(self, cfg: ClassifyConfig, client: Client | None = None) -> None:
        check_options(cfg)
        self.cfg = cfg
        self.embed = Embedder(cfg.embed_device)

    async def score(self, explanation: str, held: HeldOut) -> dict[str, Any]:
        pos, neg, notes = labelled(held, self.cfg)
        examples = detection_examples(pos, neg)
        vecs = self.embed(["".join(e.tokens) for e in examples])
        sims = (vecs @ self.embed([explanation])[0]).tolist()
        out = metrics([e.label for e in examples], None, sims)
        return {**out, "notes": notes} if notes else out


SCORERS: dict[str, type] = {"detection": DetectionScorer, "fuzzing": FuzzingScorer,
                            "embedding": EmbeddingScorer, "intervention": InterventionScorer}


def scorer_names(cfg: ClassifyConfig) -> list[str]:
    names = [s.strip() for s in cfg.scorers.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCORERS]
    if unknown:
        raise UserError(f"unknown scorer {unknown[0]!r}; have {sorted(SCORERS)}")
    check_options(cfg)
    return names


def held_out(nr: Any, n_per_split: int | None = None) -> HeldOut:
    """The unit's validation and test records, top and random."""
    return HeldOut(tuple(r for s in ("valid", "test") for r in nr.top_split(s, n_per_split)),
                   tuple(r for s in ("valid", "test") for r in nr.random_split(s, n_per_split)))


async def classify_unit(scorers: dict[str, Scorer], explanation: str, nr: Any,
                        n_per_split: int | None = None, hookpoint: str = "",
                        unit: int = -1) -> dict[str, Any]:
    """Each scorer's metrics on the unit's validation and test records (top and random), or
    for a scorer with ``score_unit`` (intervention), on the unit itself; a failure is
    recorded under the scorer's name, never raised."""
    held = held_out(nr, n_per_split)
    out: dict[str, Any] = {}
    for name, scorer in scorers.items():
        try:
            if hasattr(scorer, "score_unit"):
                out[name] = await scorer.score_unit(explanation, hookpoint, unit, nr)
                continue
            out[name] = await scorer.score(explanation, held)
        except (ClassifyError, SimulationError, LLMError) as e:
            out[name] = {"failure": f"{type(e).__name__}: {e}"}
    return out


def make_scorers(cfg: ClassifyConfig, client: Client | None = None) -> dict[str, Scorer]:
    """The configured scorers; the LLM ones share ``client`` (one local model in memory)."""
    names = scorer_names(cfg)
    if client is None and any(issubclass(SCORERS[n], LLMClassifier) for n in names):
        client = make_client(cfg)
    return {n: SCORERS[n](cfg, client) for n in names}
