"""LLM explainers: ``openai`` (token<tab>activation prompt), ``highlight`` (delphi-style
<<marked>> excerpts), ``summary`` (highlight plus the marked tokens counted and facts about
them), ``category`` (only the marked tokens, named by the LLM, then the facts appended) and
``contrastive`` (highlight plus silent excerpts).

Each asks the LLM ``n_samples`` times (seeds 0..N-1), cleans every reply into one phrase
(prefix, first line and sentence, trailing period) and drops unusable ones (empty, too long,
refusals, repeated prompt text or a copied few-shot explanation). When none is usable the unit
fails with an ``ExplanationError`` that lists the reasons.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.explain.core import ExplainConfig, ExplanationError
from neuroscribe.explain.output_side import with_output_tokens
from neuroscribe.formats import ActivationRecord
from neuroscribe.llm.client import Client, LLMError, Request, make_client
from neuroscribe.prompts import (
    CATEGORY_EXAMPLES,
    SUMMARY_EXAMPLES,
    Messages,
    category_explain_messages,
    contrastive_explain_messages,
    few_shot_neurons,
    highlight_explain_messages,
    load,
    openai_explain_messages,
    summary_explain_messages,
    with_facts,
)
from neuroscribe.score.core import max_activation, normalize_activations

log = logging.getLogger("neuroscribe")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@dataclass(frozen=True)
class CleaningRules:
    """``cleaning.json`` compiled: what is dropped, stripped and rejected in a reply."""

    drop: tuple[re.Pattern[str], ...]
    prefixes: tuple[re.Pattern[str], ...]
    refusals: tuple[re.Pattern[str], ...]
    scaffolding: tuple[re.Pattern[str], ...]
    strip: str
    quotes: tuple[str, ...]  # opening + closing character of each kind of quotes

    @classmethod
    def load(cls) -> CleaningRules:
        raw = load("cleaning")

        def comp(key: str) -> tuple[re.Pattern[str], ...]:
            return tuple(re.compile(p, re.IGNORECASE) for p in raw[key])

        return cls(comp("drop"), comp("prefixes"), comp("refusals"), comp("scaffolding"),
                   raw["strip"], tuple(raw["quotes"]))

    def unquote(self, line: str) -> str:
        """Without quotes that wrap the whole line ('"pets"', not '"cat" or "dog"')."""
        for pair in self.quotes:
            if (len(line) >= 2 and line[0] == pair[0] and line[-1] == pair[1]
                    and pair[0] not in line[1:-1] and pair[1] not in line[1:-1]):
                return line[1:-1].strip()
        return line


def near_copy(text: str, example: str, overlap: float = 0.7) -> bool:
    """True when the two share at least ``overlap`` of their words (Jaccard): small models
    often hand back the last few-shot explanation with a word changed."""
    a, b = (set(re.findall(r"[a-z0-9']+", x.lower())) for x in (text, example))
    return bool(a | b) and len(a & b) / len(a | b) >= overlap


def clean_explanation(raw: str, rules: CleaningRules, max_words: int = 40,
                      copies: Sequence[str] = ()) -> str:
    """One reply as one explanation phrase; raises ExplanationError saying why it is unusable.

    ``copies`` are texts the reply must not repeat (the few-shot explanations).
    """
    text = raw
    for pattern in rules.drop:
        text = pattern.sub("", text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip(" \t*#>-")), "")
    for pattern in rules.refusals:
        if pattern.search(line):
            raise ExplanationError(f"refusal: {line[:60]!r}")
    changed = True
    while changed:
        before = line
        for pattern in rules.prefixes:
            line = pattern.sub("", line, count=1).strip()
        line = rules.unquote(line.strip(rules.strip))
        changed = line != before
    line = SENTENCE_END.split(line, maxsplit=1)[0]
    line = rules.unquote(line.rstrip(" .").strip(rules.strip)).rstrip(" .")
    if not line:
        raise ExplanationError(f"empty reply: {raw[:60]!r}")
    for pattern in rules.scaffolding:
        if pattern.search(line):
            raise ExplanationError(f"repeats prompt text: {line[:60]!r}")
    if any(near_copy(line, c) for c in copies):
        raise ExplanationError(f"copies a few-shot explanation: {line!r}")
    n_words = len(line.split())
    if n_words > max_words:
        raise ExplanationError(f"too long ({n_words} words > {max_words})")
    return line


def summarize_failures(reasons: Sequence[str]) -> str:
    counts = Counter(reasons)
    return "; ".join(r if n == 1 else f"{r} (x{n})" for r, n in counts.items())


def silent_records(background: Sequence[ActivationRecord], max_act: float, normalization: str,
                   level: int) -> list[ActivationRecord]:
    """Background records on which no token reaches the active level (train's scale)."""
    return [r for r in background
            if max(normalize_activations(r.activations, max_act, normalization), default=0)
            < max(1, level)]


class LLMExplainer:
    """Sampling, cleaning and rejection shared by the LLM explainers; a subclass only builds
    the prompt."""

    shots = "examples"  # the few-shot file its prompt shows, whose explanations it must not copy

    def __init__(self, cfg: ExplainConfig, client: Client | None = None) -> None:
        if cfg.n_samples < 1:
            raise UserError("--n-samples must be at least 1")
        if cfg.n_samples > 1 and cfg.temperature <= 0:
            raise UserError("--n-samples > 1 needs --temperature > 0 (greedy samples are equal)")
        self.cfg = cfg
        self.client = client if client is not None else make_client(cfg)
        self.rules = CleaningRules.load()
        self.copies = tuple(n.explanation for n in few_shot_neurons(self.shots))

    def messages(self, train: Sequence[ActivationRecord],
                 background: Sequence[ActivationRecord]) -> Messages:
        raise NotImplementedError

    def finish(self, text: str, shown: Sequence[ActivationRecord]) -> str:
        """The explanation made from a cleaned reply (the reply itself, unless overridden)."""
        return text

    async def _sample(self, msgs: Messages, seed: int) -> str:
        req = Request(messages=msgs, max_tokens=self.cfg.max_explanation_tokens,
                      temperature=self.cfg.temperature, seed=seed, stage="explain")
        try:
            resp = await self.client.complete(req)
        except LLMError as e:
            raise ExplanationError(f"LLM failed: {e}") from e
        text = clean_explanation(resp.text, self.rules, self.cfg.max_words, self.copies)
        truncated = resp.completion_tokens >= self.cfg.max_explanation_tokens > 0
        if truncated and not re.search(r"[.!?\n]", resp.text.strip()):
            raise ExplanationError(f"cut off at {self.cfg.max_explanation_tokens} tokens")
        return text

    async def explain(self, train: Sequence[ActivationRecord],
                      background: Sequence[ActivationRecord],
                      output: dict[str, Any] | None = None) -> list[str]:
        shown = list(train)[: max(1, self.cfg.max_examples)]
        if not shown or max_activation(shown) <= 0:
            raise ExplanationError("the unit never activates above 0 on its train records")
        msgs = self.messages(shown, background)
        if output is not None:  # --with-output-tokens
            msgs = with_output_tokens(msgs, output)
        outcomes = await asyncio.gather(
            *[self._sample(msgs, seed) for seed in range(self.cfg.n_samples)],
            return_exceptions=True)
        candidates: list[str] = []
        reasons: list[str] = []
        for out in outcomes:
            if isinstance(out, ExplanationError):
                reasons.append(str(out))
            elif isinstance(out, BaseException):
                raise out
            elif (text := self.finish(out, shown)) not in candidates:
                candidates.append(text)
        if reasons:
            log.info("explain: %d of %d samples unusable: %s", len(reasons), len(outcomes),
                     summarize_failures(reasons))
        if not candidates:
            raise ExplanationError(f"no usable explanation in {len(outcomes)} sample(s): "
                                   + summarize_failures(reasons))
        return candidates


class OpenAIExplainer(LLMExplainer):
    """OpenAI's prompt: few-shot neurons as token<tab>activation lines (0-10)."""

    def messages(self, train: Sequence[ActivationRecord],
                 background: Sequence[ActivationRecord]) -> Messages:
        return openai_explain_messages(train, self.cfg.normalization)


class HighlightExplainer(LLMExplainer):
    """Delphi-style prompt: excerpts as text, tokens at --active-level or above <<marked>>."""

    def messages(self, train: Sequence[ActivationRecord],
                 background: Sequence[ActivationRecord]) -> Messages:
        return highlight_explain_messages(train, self.cfg.normalization, self.cfg.active_level)


class SummaryExplainer(LLMExplainer):
    """The highlight prompt plus the marked tokens counted, most frequent first, and facts
    that hold for most of them; its few-shot neurons avoid the planted concepts."""

    shots = SUMMARY_EXAMPLES

    def messages(self, train: Sequence[ActivationRecord],
                 background: Sequence[ActivationRecord]) -> Messages:
        return summary_explain_messages(train, self.cfg.normalization, self.cfg.active_level)


class CategoryExplainer(LLMExplainer):
    """Only the marked tokens, counted, each with a short excerpt: the LLM names what kind of
    token they are, and the facts that hold for them (the token before, a capital letter) are
    appended as phrases, so a small model need not notice the context itself."""

    shots = CATEGORY_EXAMPLES

    def messages(self, train: Sequence[ActivationRecord],
                 background: Sequence[ActivationRecord]) -> Messages:
        return category_explain_messages(train, self.cfg.normalization, self.cfg.active_level)

    def finish(self, text: str, shown: Sequence[ActivationRecord]) -> str:
        return with_facts(text, shown, self.cfg.normalization, self.cfg.active_level)


class ContrastiveExplainer(LLMExplainer):
    """The highlight prompt plus background records where the unit stays below the active
    level, labelled as excerpts where it does not fire."""

    def messages(self, train: Sequence[ActivationRecord],
                 background: Sequence[ActivationRecord]) -> Messages:
        cfg = self.cfg
        silent = silent_records(background, max_activation(train), cfg.normalization,
                                cfg.active_level)[: cfg.max_negatives]
        return contrastive_explain_messages(train, silent, cfg.normalization, cfg.active_level)
