"""Prompt builders for the LLM explainers and simulators.

Templates and few-shot examples are data (``neuroscribe/data/prompts/*.json``); the builders
here are pure functions that fill them and return chat messages (a tuple of ``(role,
content)`` pairs) or, for the all-at-once simulator, one raw completion prompt.

The few-shot examples are invented records written for this project (``examples.json``, and
``summary_examples.json`` for the summary prompt, whose concepts avoid the planted ones).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from neuroscribe.formats import ActivationRecord
from neuroscribe.score.core import max_activation, normalize_activations

Message = tuple[str, str]
Messages = tuple[Message, ...]
SUMMARY_EXAMPLES = "summary_examples"  # the summary prompt's few-shot file, apart from planted
CATEGORY_EXAMPLES = "category_examples"  # the category prompt's, apart from planted too


@cache
def _text(name: str) -> str:
    return resources.files("neuroscribe").joinpath(f"data/prompts/{name}.json").read_text()


def load(name: str) -> dict[str, Any]:
    """A template file, e.g. ``load("openai")``: a fresh dict each call."""
    return json.loads(_text(name))


@dataclass(frozen=True)
class FewShotNeuron:
    """One invented neuron: its explanation, activating records and silent records."""

    explanation: str
    records: tuple[ActivationRecord, ...]
    negatives: tuple[ActivationRecord, ...] = ()
    first_revealed: tuple[int, ...] = ()  # per record: tokens before it read "unknown"


def _records(raw: list[dict[str, Any]]) -> tuple[ActivationRecord, ...]:
    return tuple(ActivationRecord(tokens=list(r["tokens"]),
                                  activations=[float(a) for a in r["activations"]]) for r in raw)


def few_shot_neurons(name: str = "examples") -> tuple[FewShotNeuron, ...]:
    """The invented neurons of ``data/prompts/{name}.json``: ``examples`` for the openai,
    highlight and contrastive explainers, ``summary_examples`` for the summary explainer."""
    return tuple(FewShotNeuron(n["explanation"], _records(n["records"]),
                               _records(n.get("negatives", [])),
                               tuple(n.get("first_revealed", ()))) for n in load(name)["neurons"])


def _examples(examples: Sequence[FewShotNeuron] | None,
              name: str = "examples") -> Sequence[FewShotNeuron]:
    return few_shot_neurons(name) if examples is None else examples


# --- token<tab>activation blocks ---------------------------------------------------------------


def _blocks(lines: Sequence[Sequence[tuple[str, str]]]) -> str:
    """``<start>`` / ``<end>`` blocks of ``token<tab>value`` lines, one block per record."""
    fmt = load("common")["records"]
    body = ["\n".join(fmt["line"].format(token=t, activation=v) for t, v in rec)
            for rec in lines]
    return fmt["start"] + fmt["between"].join(body) + fmt["end"]


def format_records(records: Sequence[ActivationRecord], max_act: float,
                   normalization: str = "floor", omit_zeros: bool = False,
                   first_revealed: Sequence[int] = ()) -> str:
    """Records as ``token<tab>activation`` lines with activations normalised to 0-10; the
    tokens of record i before ``first_revealed[i]`` read "unknown" (OpenAI's few-shot
    format for the all-at-once simulator)."""
    unknown = load("common")["records"]["unknown"]
    lines = []
    for i, r in enumerate(records):
        levels = normalize_activations(r.activations, max_act, normalization)
        hide = first_revealed[i] if i < len(first_revealed) else 0
        lines.append([(t, unknown if j < hide else str(v))
                      for j, (t, v) in enumerate(zip(r.tokens, levels))
                      if v > 0 or not omit_zeros])
    return _blocks(lines)


def format_unknown(sequences: Sequence[Sequence[str]], marker: str = "") -> str:
    """Token sequences as ``token<tab>marker`` lines (default "unknown"): the slots a
    simulator fills."""
    marker = marker or load("common")["records"]["unknown"]
    return _blocks([[(t, marker) for t in tokens] for tokens in sequences])


def nonzero_proportion(records: Sequence[ActivationRecord], max_act: float,
                       normalization: str = "floor") -> float:
    levels = [v for r in records for v in normalize_activations(r.activations, max_act,
                                                                 normalization)]
    return sum(v > 0 for v in levels) / len(levels) if levels else 0.0


# --- explainer prompts -------------------------------------------------------------------------


def _openai_neuron(records: Sequence[ActivationRecord], index: int, normalization: str,
                   t: dict[str, Any], prefix: str) -> str:
    top = max_activation(records)
    text = t["neuron"].format(index=index, records=format_records(records, top, normalization))
    if nonzero_proportion(records, top, normalization) < t["nonzero_below"]:
        text += t["nonzero"].format(records=format_records(records, top, normalization, True))
    return text + t["ask"].format(index=index, prefix=prefix)


def openai_explain_messages(records: Sequence[ActivationRecord], normalization: str = "floor",
                            examples: Sequence[FewShotNeuron] | None = None) -> Messages:
    """OpenAI's token<tab>activation explainer prompt; the reply completes the prefix
    ("... the main thing this neuron does is find")."""
    t, prefix = load("openai")["explain"], load("common")["prefix"]
    shots = _examples(examples)
    msgs: list[Message] = [("system", t["system"])]
    for i, ex in enumerate(shots):
        msgs.append(("user", _openai_neuron(ex.records, i + 1, normalization, t, prefix)))
        msgs.append(("assistant", t["answer"].format(explanation=ex.explanation)))
    msgs.append(("user", _openai_neuron(records, len(shots) + 1, normalization, t, prefix)))
    return tuple(msgs)


def highlight_text(record: ActivationRecord, max_act: float, normalization: str = "floor",
                   level: int = 1, marks: dict[str, Any] | None = None) -> str:
    """The record as text, runs of tokens at normalised ``level`` or above marked <<so>>.

    A token's leading whitespace stays outside the marks; newlines are written as ``\\n``.
    """
    m = load("highlight") if marks is None else marks
    levels = normalize_activations(record.activations, max_act, normalization)
    out: list[str] = []
    inside = False
    for token, lvl in zip(record.tokens, levels):
        tok = token.replace("\n", m["newline"])
        if lvl >= max(1, level):
            if not inside:
                lead = tok[: len(tok) - len(tok.lstrip())] if tok.strip() else ""
                tok = lead + m["open"] + tok[len(lead):]
                inside = True
        elif inside:
            out.append(m["close"])
            inside = False
        out.append(tok)
    if inside:
        out.append(m["close"])
    return "".join(out)


def _positions(records: Sequence[ActivationRecord], max_act: float, normalization: str,
               level: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(previous token stripped and lower-cased, token) of every position, split into those at
    normalised ``level`` or above (the ones ``highlight_text`` marks) and the others."""
    marked: list[tuple[str, str]] = []
    other: list[tuple[str, str]] = []
    for r in records:
        levels = normalize_activations(r.activations, max_act, normalization)
        for i, (tok, lvl) in enumerate(zip(r.tokens, levels)):
            prev = r.tokens[i - 1].strip().lower() if i else ""
            (marked if lvl >= max(1, level) else other).append((prev, tok))
    return marked, other


def _key(token: str) -> str:
    """A token as counted: stripped, unless it is all whitespace (a newline stays a newline)."""
    return token.strip() or token


def marked_counts(records: Sequence[ActivationRecord], max_act: float, normalization: str,
                  level: int, blank: bool = False) -> list[tuple[str, int]]:
    """The tokens at normalised ``level`` or above (stripped), counted, most frequent first;
    all-whitespace tokens are left out unless ``blank``."""
    marked, _ = _positions(records, max_act, normalization, level)
    counts = Counter(_key(tok) for _, tok in marked if blank or tok.strip())
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _fact_matches(records: Sequence[ActivationRecord], max_act: float, normalization: str,
                  level: int, f: dict[str, Any]) -> list[tuple[str, int, int, dict[str, str]]]:
    """(kind, n, total, fields) of each fact that holds: ``n`` of the ``total`` marked tokens
    have it, at least ``min_count`` and ``min_share`` of them, and ``min_ratio`` times the
    share of unmarked tokens that have it. Kinds: ``previous`` (the most common token right
    before a marked one) and ``form`` (a regex of ``forms`` searched in the token)."""
    marked, other = _positions(records, max_act, normalization, level)
    if not marked:
        return []

    def holds(n: int, base: int) -> bool:
        share = n / len(marked)
        return (n >= f["min_count"] and share >= f["min_share"]
                and share >= f["min_ratio"] * base / max(1, len(other)))

    found: list[tuple[str, int, int, dict[str, str]]] = []
    before = Counter(p for p, _ in marked if p)
    if before:
        word, n = max(before.items(), key=lambda kv: (kv[1], kv[0]))
        if holds(n, sum(p == word for p, _ in other)):
            found.append(("previous", n, len(marked), {"token": word}))
    for form, pattern in f["forms"].items():
        n = sum(bool(re.search(pattern, tok)) for _, tok in marked)
        if holds(n, sum(bool(re.search(pattern, tok)) for _, tok in other)):
            found.append(("form", n, len(marked), {"form": form}))
    return found


def marked_facts(records: Sequence[ActivationRecord], max_act: float, normalization: str,
                 level: int, t: dict[str, Any] | None = None) -> list[str]:
    """Facts that hold for most tokens at normalised ``level`` or above and far less often
    for the others (``_fact_matches``), as sentences. Thresholds and wording come from the
    ``facts`` entry of the template; the ``*_all`` wording is used when every marked token
    has the fact."""
    f = (load("highlight") if t is None else t)["facts"]
    return [f[f"{kind}_all" if n == total else kind].format(n=n, total=total, **kw)
            for kind, n, total, kw in _fact_matches(records, max_act, normalization, level, f)]


def marked_excerpt(records: Sequence[ActivationRecord], token: str, max_act: float,
                   normalization: str, level: int, before: int, after: int,
                   t: dict[str, Any]) -> str:
    """A few tokens around the first marked occurrence of ``token`` (as ``_key``), marked."""
    for r in records:
        levels = normalize_activations(r.activations, max_act, normalization)
        for i, (tok, lvl) in enumerate(zip(r.tokens, levels)):
            if lvl >= max(1, level) and _key(tok) == token:
                a, b = max(0, i - before), i + after + 1
                part = ActivationRecord(tokens=r.tokens[a:b], activations=r.activations[a:b])
                return highlight_text(part, max_act, normalization, level, t).strip()
    return token


def _category_user(records: Sequence[ActivationRecord], normalization: str, level: int,
                   t: dict[str, Any], marks: dict[str, Any]) -> str:
    top = max_activation(records)
    lines = [t["header"]]
    for tok, n in marked_counts(records, top, normalization, level, True)[: t["max_tokens"]]:
        excerpt = marked_excerpt(records, tok, top, normalization, level, t["before"],
                                 t["after"], marks)
        lines.append(t["line"].format(token=tok.replace("\n", marks["newline"]), count=n,
                                      excerpt=excerpt))
    return "\n".join([*lines, "", t["ask"]])


def category_explain_messages(records: Sequence[ActivationRecord], normalization: str = "floor",
                              level: int = 1,
                              examples: Sequence[FewShotNeuron] | None = None) -> Messages:
    """The category prompt: only the marked tokens, counted, each with a short excerpt; the
    LLM names their kind. Few-shot neurons default to ``CATEGORY_EXAMPLES``."""
    t, marks = load("category"), load("highlight")
    msgs: list[Message] = [("system", t["system"])]
    for ex in _examples(examples, CATEGORY_EXAMPLES):
        msgs.append(("user", _category_user(ex.records, normalization, level, t, marks)))
        msgs.append(("assistant", t["answer"].format(explanation=ex.explanation)))
    msgs.append(("user", _category_user(records, normalization, level, t, marks)))
    return tuple(msgs)


def with_facts(category: str, records: Sequence[ActivationRecord], normalization: str = "floor",
               level: int = 1) -> str:
    """The category followed by the facts that hold for the marked tokens, as phrases
    (``category`` alone when none holds): 'nouns, right after "the"'."""
    t, f = load("category"), load("highlight")["facts"]
    found = _fact_matches(records, max_activation(records), normalization, level, f)
    if not found:
        return category
    facts = t["fact_separator"].join(t["phrases"][kind].format(**kw) for kind, _, _, kw in found)
    return t["joined"].format(category=category, facts=facts)


def _highlight_user(records: Sequence[ActivationRecord],
                    negatives: Sequence[ActivationRecord] | None, normalization: str,
                    level: int, t: dict[str, Any], counted: bool = False) -> str:
    top = max_activation(records)
    parts = [t["activating_header"]]
    parts += [t["example"].format(index=i + 1, text=highlight_text(r, top, normalization, level, t))
              for i, r in enumerate(records)]
    if negatives:
        silent = 10 ** 9  # a level no token reaches: plain text
        parts += ["", t["negative_header"]]
        parts += [t["example"].format(index=i + 1, text=highlight_text(r, top, normalization,
                                                                       silent, t))
                  for i, r in enumerate(negatives)]
    if counted:
        terms = marked_counts(records, top, normalization, level)[: t["max_counted"]]
        parts += ["", t["counts"].format(terms=", ".join(
            t["count_term"].format(token=tok.replace("\n", t["newline"]), count=n)
            for tok, n in terms))]
        parts += marked_facts(records, top, normalization, level, t)
    return "\n".join([*parts, "", t["ask"]])


def _highlight_messages(records: Sequence[ActivationRecord],
                        negatives: Sequence[ActivationRecord] | None, normalization: str,
                        level: int, examples: Sequence[FewShotNeuron] | None,
                        counted: bool = False) -> Messages:
    t = load("highlight")
    contrastive = negatives is not None
    system = (t["system"] + (t["contrastive_system"] if contrastive else "")
              + (t["summary_system"] if counted else ""))
    msgs: list[Message] = [("system", system)]
    for ex in _examples(examples, SUMMARY_EXAMPLES if counted else "examples"):
        msgs.append(("user", _highlight_user(ex.records, ex.negatives if contrastive else None,
                                             normalization, level, t, counted)))
        msgs.append(("assistant", t["answer"].format(explanation=ex.explanation)))
    msgs.append(("user", _highlight_user(records, negatives, normalization, level, t, counted)))
    return tuple(msgs)


def highlight_explain_messages(records: Sequence[ActivationRecord], normalization: str = "floor",
                               level: int = 1,
                               examples: Sequence[FewShotNeuron] | None = None) -> Messages:
    """Delphi-style prompt: activating excerpts as text with <<marked>> tokens."""
    return _highlight_messages(records, None, normalization, level, examples)


def summary_explain_messages(records: Sequence[ActivationRecord], normalization: str = "floor",
                             level: int = 1,
                             examples: Sequence[FewShotNeuron] | None = None) -> Messages:
    """The highlight prompt plus the marked tokens counted, most frequent first, and the facts
    of ``marked_facts`` (the token statistics a small model misses when it reads the
    excerpts); its few-shot neurons come from ``SUMMARY_EXAMPLES``."""
    return _highlight_messages(records, None, normalization, level, examples, counted=True)


def contrastive_explain_messages(records: Sequence[ActivationRecord],
                                 negatives: Sequence[ActivationRecord],
                                 normalization: str = "floor", level: int = 1,
                                 examples: Sequence[FewShotNeuron] | None = None) -> Messages:
    """The highlight prompt plus excerpts where the neuron stays silent, labelled so."""
    return _highlight_messages(records, list(negatives), normalization, level, examples)


# --- simulator prompts -------------------------------------------------------------------------


def openai_simulate_prompt(explanation: str, tokens: Sequence[str],
                           examples: Sequence[FewShotNeuron] | None = None,
                           normalization: str = "floor") -> str:
    """OpenAI's all-at-once simulation prompt as one raw completion string: few-shot neurons
    with their activations, then the explanation and ``token<tab>unknown`` lines whose slots
    are read through prompt logprobs."""
    return openai_simulate_prompt_many(explanation, [tokens], examples, normalization)


def openai_simulate_prompt_many(explanation: str, sequences: Sequence[Sequence[str]],
                                examples: Sequence[FewShotNeuron] | None = None,
                                normalization: str = "floor", marker: str = "",
                                reveal: bool = True) -> str:
    """The same prompt with several sequences to fill at once (the few-shot part is paid once
    per prompt instead of once per sequence). ``marker`` fills the slots (default
    "unknown"); ``reveal`` hides each few-shot record's tokens before its first revealed
    index behind "unknown", as OpenAI's few-shot set does."""
    t, prefix = load("openai")["simulate"], load("common")["prefix"]
    shots = _examples(examples)
    parts = [t["system"]]
    for i, ex in enumerate(shots):
        parts.append(t["explanation"].format(index=i + 1, prefix=prefix,
                                             explanation=ex.explanation))
        parts.append(t["activations"].format(records=format_records(
            ex.records, max_activation(ex.records), normalization,
            first_revealed=ex.first_revealed if reveal else ())))
    n = len(shots) + 1
    parts.append(t["explanation"].format(index=n, prefix=prefix, explanation=explanation.strip()))
    parts.append(t["target"].format(records=format_unknown(sequences, marker)))
    return "".join(parts)


SLOT = "\x00"  # stands in for a slot while the prompt is cut into segments


def openai_simulate_segments(explanation: str, sequences: Sequence[Sequence[str]],
                             examples: Sequence[FewShotNeuron] | None = None,
                             normalization: str = "floor", reveal: bool = False) -> list[str]:
    """The openai simulation prompt cut at its slots: segment i is the text before slot i
    (segment 0 holds the whole few-shot part). For backends that read values slot by slot."""
    text_in = "".join([explanation, *(tok for tokens in sequences for tok in tokens)])
    # a marker that no token holds (C code has "\x00" tokens): NUL, else a private-use char
    marker = next(m for m in (SLOT, *map(chr, range(0xE000, 0xF900))) if m not in text_in)
    text = openai_simulate_prompt_many(explanation, sequences, examples, normalization,
                                       marker=marker, reveal=reveal)
    return text.split(marker)[:-1]


def _json_user(explanation: str, tokens: Sequence[str], t: dict[str, Any], prefix: str) -> str:
    lines = "\n".join(t["token_line"].format(index=i, token=json.dumps(tok, ensure_ascii=False))
                      for i, tok in enumerate(tokens))
    return t["user"].format(prefix=prefix, explanation=explanation.strip(), n=len(tokens),
                            tokens=lines)


def json_simulate_messages(explanation: str, tokens: Sequence[str],
                           examples: Sequence[FewShotNeuron] | None = None,
                           normalization: str = "floor") -> Messages:
    """Chat prompt whose reply is a JSON list of integers 0-10, one per token (no logprobs).
    Each few-shot neuron contributes its first record."""
    t, prefix = load("json_simulate"), load("common")["prefix"]
    msgs: list[Message] = [("system", t["system"])]
    for ex in _examples(examples):
        rec = ex.records[0]
        levels = normalize_activations(rec.activations, max_activation(ex.records), normalization)
        msgs.append(("user", _json_user(ex.explanation, rec.tokens, t, prefix)))
        msgs.append(("assistant", json.dumps(levels)))
    msgs.append(("user", _json_user(explanation, tokens, t, prefix)))
    return tuple(msgs)

