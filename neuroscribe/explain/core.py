"""Explain: write one sentence per unit from its train records.

``Explainer`` is the interface every explainer implements (the LLM explainers plug in here);
``TokenStatsExplainer`` is the baseline that needs no LLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from neuroscribe.errors import UserError
from neuroscribe.formats import SPLITS_RANDOM, ActivationRecord
from neuroscribe.llm.client import LLMConfig, usage_of
from neuroscribe.registry import Registry
from neuroscribe.runs import (
    SHARD_HELP,
    claim_stage,
    in_shard,
    opt,
    parse_shard,
    parse_units,
    save_stage,
    write_json,
)
from neuroscribe.score.core import NORMALIZATIONS, max_activation, normalize_activations

log = logging.getLogger("neuroscribe")


class ExplanationError(Exception):
    """An explainer could not produce a usable explanation; the message is the reason."""


@dataclass
class ExplainConfig(LLMConfig):
    """How to explain units (the LLM options serve the LLM explainers)."""

    explainer: str = opt("tokens", "explainer: tokens (token statistics, no LLM), openai "
                         "(OpenAI's token<tab>activation prompt), highlight (delphi-style "
                         "<<marked>> excerpts), summary (highlight plus the marked tokens "
                         "counted and facts about them), category (the LLM names the "
                         "marked tokens' kind; facts appended) or contrastive (highlight "
                         "plus silent excerpts)")
    units: str = opt("first:100", "units to explain per hookpoint: all, first:N, "
                     "random:N[:SEED], or ranges like 0-49,100", scope=True)
    shard: str = opt("0/1", SHARD_HELP, scope=True)
    normalization: str = opt("floor", "activation normalisation to 0-10: floor (OpenAI) or "
                             "ceil (delphi)", choices=NORMALIZATIONS)
    active_level: int = opt(5, "normalised level (0-10) at which a token counts as active "
                            "(and is marked in highlight prompts)")
    max_terms: int = opt(5, "most tokens named in one explanation")
    n_per_split: int = opt(0, "records per split (0: all recorded, split evenly)")
    n_samples: int = opt(1, "candidate explanations per unit from an LLM explainer (one "
                         "request each, seeds 0..N-1); the score stage keeps the best on the "
                         "calibration split")
    temperature: float = opt(0.0, "sampling temperature of an LLM explainer (must be > 0 when "
                             "--n-samples > 1)")
    max_explanation_tokens: int = opt(60, "most tokens an LLM explainer may generate")
    max_words: int = opt(40, "longest usable explanation, in words")
    max_examples: int = opt(10, "most train records shown to an LLM explainer")
    max_negatives: int = opt(5, "most silent background records shown by the contrastive "
                             "explainer")
    with_output_tokens: bool = opt(False, "show each unit's top promoted and suppressed "
                                   "output tokens (logit lens, RUN/output_tokens) to the "
                                   "explainer; the tokens explainer appends them to its "
                                   "sentence")


class Explainer(Protocol):
    """Writes candidate explanations for one unit from its train records."""

    async def explain(
        self, train: Sequence[ActivationRecord], background: Sequence[ActivationRecord],
        output: dict[str, Any] | None = None,
    ) -> list[str]:
        """Candidate explanations; raises ExplanationError with the reason on failure.
        ``output``: the unit's output tokens (``--with-output-tokens``), else None."""
        ...


def _template() -> dict[str, str]:
    text = resources.files("neuroscribe").joinpath("data/baseline_explanation.json").read_text()
    return json.loads(text)


def _norm(token: str) -> str:
    return token.strip().lower()


def quote_terms(terms: Sequence[str]) -> str:
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in terms)


class TokenStatsExplainer:
    """Names the tokens (and preceding tokens) most enriched at active positions.

    A token's weight is ``count_active * log(p_active / p_background)`` with add-one
    smoothing; background is every position of the background records (random records from
    the calibration split) plus the train records' inactive positions.
    """

    def __init__(self, cfg: ExplainConfig) -> None:
        self.cfg = cfg
        self.template = _template()

    def _enriched(self, active: Counter[str], background: Counter[str]) -> list[tuple[str, float]]:
        n_a, n_b = sum(active.values()), sum(background.values())
        vocab = len(set(active) | set(background)) + 1
        out = []
        for term, c in active.items():
            p_a = (c + 1) / (n_a + vocab)
            p_b = (background[term] + 1) / (n_b + vocab)
            if p_a > p_b:
                out.append((term, c * math.log(p_a / p_b)))
        return sorted(out, key=lambda x: (-x[1], x[0]))

    async def explain(
        self, train: Sequence[ActivationRecord], background: Sequence[ActivationRecord],
        output: dict[str, Any] | None = None,
    ) -> list[str]:
        sentence = self._input_side(train, background)
        if output is not None:
            from neuroscribe.explain.output_side import output_token_terms
            from neuroscribe.prompts import load

            sentence += load("output_tokens")["sentence"].format(
                promoted=output_token_terms(output, "promoted"))
        return [sentence]

    def _input_side(self, train: Sequence[ActivationRecord],
                    background: Sequence[ActivationRecord]) -> str:
        top = max_activation(train)
        if top <= 0:
            raise ExplanationError("the unit never activates above 0 on its train records")
        active, prev_active, bg, prev_bg = Counter(), Counter(), Counter(), Counter()
        for rec in train:
            levels = normalize_activations(rec.activations, top, self.cfg.normalization)
            for i, (tok, lvl) in enumerate(zip(rec.tokens, levels)):
                prev = _norm(rec.tokens[i - 1]) if i else ""
                if lvl >= self.cfg.active_level:
                    active[_norm(tok)] += 1
                    prev_active[prev] += 1
                else:
                    bg[_norm(tok)] += 1
                    prev_bg[prev] += 1
        for rec in background:
            bg.update(_norm(t) for t in rec.tokens)
            prev_bg.update([""] + [_norm(t) for t in rec.tokens[:-1]])
        terms = [t for t, _ in self._enriched(active, bg) if t][: self.cfg.max_terms]
        if not terms:
            return str(self.template["none"])
        sentence = self.template["tokens"].format(terms=quote_terms(terms))
        prev = [t for t, _ in self._enriched(prev_active, prev_bg) if t]
        if prev and prev_active[prev[0]] >= 0.4 * sum(active.values()):
            sentence += self.template["after"].format(prev=quote_terms(prev[:1]))
        return sentence


EXPLAINERS = Registry({"tokens": TokenStatsExplainer, **{
    name: f"neuroscribe.explain.llm:{cls}" for name, cls in (
        ("openai", "OpenAIExplainer"), ("highlight", "HighlightExplainer"),
        ("summary", "SummaryExplainer"), ("category", "CategoryExplainer"),
        ("contrastive", "ContrastiveExplainer"))}})


def make_explainer(cfg: ExplainConfig) -> Explainer:
    if cfg.explainer not in EXPLAINERS:
        raise UserError(f"unknown explainer {cfg.explainer!r}; have {sorted(EXPLAINERS)}")
    return EXPLAINERS[cfg.explainer](cfg)


def explanation_path(run_dir: Path, hookpoint: str, unit: int) -> Path:
    from neuroscribe.models import safe_name

    return run_dir / "explanations" / safe_name(hookpoint) / f"{unit}.json"


def explain(cfg: ExplainConfig, run_dir: Path, resume: bool = False,
            explainer: Explainer | None = None) -> dict[str, Any]:
    """Explain the chosen units of every recorded hookpoint; one JSON file per unit.

    Units run concurrently on one event loop (an LLM client bounds the requests in flight);
    each unit's file is written as soon as it finishes. ``explainer`` overrides the configured
    one (tests pass one built on a fake LLM backend).
    """
    from neuroscribe.record.core import RecordStore

    store = RecordStore(run_dir)
    if cfg.normalization not in NORMALIZATIONS:
        raise UserError(f"--normalization must be one of {NORMALIZATIONS}")
    shard = parse_shard(cfg.shard)
    claim_stage(run_dir, "explain", cfg, resume)
    explainer = explainer or make_explainer(cfg)
    todo = [(hp, u) for hp in store.hookpoints for u in parse_units(cfg.units, store.units[hp])
            if in_shard(hp, u, shard)]
    # Saved before the first unit, so an interrupted stage still guards its config.
    save_stage(run_dir, "explain", cfg, complete=False)
    outputs = _output_tokens(run_dir, store.hookpoints) if cfg.with_output_tokens else {}
    outcomes = asyncio.run(_explain_units(cfg, run_dir, store, explainer, todo, resume,
                                          outputs))
    done, failed = sum(outcomes), len(outcomes) - sum(outcomes)
    save_stage(run_dir, "explain", cfg, complete=True, explained=done, failed=failed,
               llm_usage=usage_of(explainer))
    log.info("explain: %d explained, %d failed", done, failed)
    return {"explained": done, "failed": failed}


def _output_tokens(run_dir: Path, hookpoints: list[str]) -> dict[str, list[dict[str, Any]]]:
    from neuroscribe.record.output_tokens import load_output_tokens

    out = {}
    for hp in hookpoints:
        if (units := load_output_tokens(run_dir, hp)) is None:
            raise UserError(f"--with-output-tokens: {run_dir} has no output tokens for {hp}; "
                            f"run `neuroscribe output-tokens {run_dir}` first")
        out[hp] = units
    return out


async def _explain_units(cfg: ExplainConfig, run_dir: Path, store: Any, explainer: Explainer,
                         todo: list[tuple[str, int]], resume: bool,
                         outputs: dict[str, list[dict[str, Any]]] | None = None) -> list[bool]:
    """Explain every unit of ``todo``; True for each unit that has an explanation."""
    from tqdm import tqdm

    in_flight = asyncio.Semaphore(2 * max(1, cfg.concurrency or 4))  # bounds records in memory
    bar = tqdm(total=len(todo), desc="explain", unit="unit", disable=None)

    async def one(hp: str, unit: int) -> bool:
        path = explanation_path(run_dir, hp, unit)
        if resume and path.exists() and "explanation" in json.loads(path.read_text()):
            bar.update()
            return True
        async with in_flight:
            nr = store.neuron_record(hp, unit)
            train = nr.split("train", cfg.n_per_split or None)
            background = nr.random_split(SPLITS_RANDOM[0], cfg.n_per_split or None)
            entry: dict[str, Any] = {"hookpoint": hp, "unit": unit, "explainer": cfg.explainer}
            try:
                if outputs:
                    candidates = await explainer.explain(train, background,
                                                         outputs[hp][unit])
                else:
                    candidates = await explainer.explain(train, background)
                entry.update(explanation=candidates[0], candidates=candidates)
            except ExplanationError as e:
                entry["failure"] = str(e)
            write_json(path, entry)
        bar.update()
        return "explanation" in entry

    try:
        return list(await asyncio.gather(*[one(hp, u) for hp, u in todo]))
    finally:
        bar.close()
