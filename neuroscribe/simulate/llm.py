"""LLM simulators: ``openai`` (OpenAI's all-at-once prompt, read through probabilities) and
``json`` (a chat reply listing one integer per token, for models without logprobs).

``openai`` fills a raw completion prompt whose target lines are ``token<tab><slot>``. With a
local backend (llama.cpp, transformers) each slot's distribution over the values 0-10 is read
from the full logits, a split "10" included, and each slot is filled before the next is read
(``--sim-fill``: "0" by default, or the model's own expected value, or OpenAI's "unknown";
see ``value_read``). The value
mass (how much probability the values got at all) is counted per run.

An HTTP endpoint returns only the top-k prompt logprobs, so there the prompt is sent once with
every slot filled (``unknown`` or ``0``) and the digits among the top k are read (OpenAI
``echo`` semantics: entry i is the distribution of token i given the tokens before it). That
loses the values outside the top k, and on a tokenizer that splits numbers it reads "10" as
"1"; a warning says so when the values' share of the mass is small.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationScale, SequenceSimulation
from neuroscribe.llm.client import Client, Request, make_client
from neuroscribe.prompts import (
    json_simulate_messages,
    load,
    openai_simulate_prompt_many,
    openai_simulate_segments,
)
from neuroscribe.simulate.core import SimulateConfig, SimulationError, point_simulation
from neuroscribe.simulate.value_read import FILL_SELF, expected_value

log = logging.getLogger("neuroscribe")
VALUES = {str(v): v for v in range(11)}
VALUE_TEXTS = tuple(VALUES)
FILLS = (FILL_SELF, "zero", "unknown")
LOW_MASS = 0.5  # below this mean value mass a simulation is mostly noise: warn
FLAT_LIST = re.compile(r"\[[^\[\]]*\]")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def unknown_slots(tokens: Sequence[str], marker: str = "unknown", sep: str = "\t") -> list[int]:
    """Indices of the tokens that start an activation slot: text right after ``sep`` that
    begins with ``marker`` (the marker may span several tokens)."""
    starts, pos = [], 0
    for tok in tokens:
        starts.append(pos)
        pos += len(tok)
    text = "".join(tokens)
    return [i for i, s in enumerate(starts)
            if s > 0 and text[s - 1] == sep and text.startswith(marker, s)]


def digit_distribution(top: dict[str, float]) -> tuple[list[float], list[float], float, float]:
    """Values 0-10 among the top tokens, their probabilities renormalised over those tokens,
    the expected value (0 with an empty distribution when no digit token is there) and the
    values' share of the probability mass."""
    probs: dict[int, float] = {}
    for token, logprob in top.items():
        value = VALUES.get(token.strip())
        if value is not None:
            probs[value] = probs.get(value, 0.0) + math.exp(logprob)
    total = sum(probs.values())
    if total <= 0:
        return [], [], 0.0, 0.0
    values = sorted(probs)
    p = [probs[v] / total for v in values]
    return [float(v) for v in values], p, sum(v * q for v, q in zip(values, p)), total


def simulation_from_value_probs(tokens: Sequence[str],
                                probs: Sequence[Sequence[float]]) -> SequenceSimulation:
    """A simulation from each token's probabilities of the values 0, 1, ... (not
    normalised: their sum is the value mass)."""
    dist = [[q / s for q in p] if (s := sum(p)) > 0 else [] for p in probs]
    return SequenceSimulation(
        tokens=list(tokens), expected_activations=[expected_value(p) for p in probs],
        activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
        distribution_values=[[float(v) for v in range(len(d))] for d in dist],
        distribution_probabilities=dist)


def simulation_from_logprobs(echo_tokens: Sequence[str], top_logprobs: Sequence[dict[str, float]],
                             tokens: Sequence[str], marker: str = "unknown") -> SequenceSimulation:
    """Read the last ``len(tokens)`` slots of an echoed prompt into a simulation."""
    return simulations_from_logprobs(echo_tokens, top_logprobs, [tokens], marker)[0]


def simulations_from_logprobs(echo_tokens: Sequence[str],
                              top_logprobs: Sequence[dict[str, float]],
                              sequences: Sequence[Sequence[str]],
                              marker: str = "unknown",
                              masses: list[float] | None = None) -> list[SequenceSimulation]:
    """Read the last slots of an echoed prompt, in order, into one simulation per sequence;
    each slot's value mass is appended to ``masses``."""
    if not echo_tokens or len(top_logprobs) < len(echo_tokens):
        raise SimulationError(f"the backend returned {len(top_logprobs)} prompt logprobs for "
                              f"{len(echo_tokens)} echoed tokens; the openai simulator needs "
                              "prompt logprobs (use the json simulator otherwise)")
    slots = unknown_slots(echo_tokens, marker)
    total = sum(len(t) for t in sequences)
    if len(slots) < total:
        raise SimulationError(f"found {len(slots)} '{marker}' slots in the echoed prompt for "
                              f"{total} tokens (the simulator's tokenizer merged the tab "
                              "with the marker?)")
    dists = [digit_distribution(top_logprobs[i]) for i in slots[len(slots) - total:]]
    if masses is not None:
        masses.extend(d[3] for d in dists)
    out, start = [], 0
    for tokens in sequences:
        part, start = dists[start:start + len(tokens)], start + len(tokens)
        out.append(SequenceSimulation(
            tokens=list(tokens), expected_activations=[d[2] for d in part],
            activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
            distribution_values=[d[0] for d in part],
            distribution_probabilities=[d[1] for d in part]))
    return out


def chunks_by_tokens(sequences: Sequence[Sequence[str]], budget: int) -> list[list[int]]:
    """Consecutive groups of sequence indices whose token counts sum to at most ``budget``
    (a longer sequence gets a group of its own; budget 0 puts each in its own group)."""
    groups: list[list[int]] = []
    used = 0
    for i, seq in enumerate(sequences):
        if not groups or budget <= 0 or used + len(seq) > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += len(seq)
    return groups


def parse_json_values(text: str, n: int) -> tuple[list[float], str]:
    """Values 0-10 for ``n`` tokens from a reply, and what was repaired ('' when nothing).

    A reply that is not exactly a JSON list of ``n`` numbers in 0-10 is repaired: the first
    flat ``[...]`` list is taken, its numbers padded with 0 or truncated to ``n`` and clamped
    to 0-10. Raises SimulationError when there is no list or it holds no number.
    """
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError:
        data = None
    if (isinstance(data, list) and len(data) == n and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 10
            for x in data)):
        return [float(x) for x in data], ""
    found = FLAT_LIST.search(text)
    notes = [] if isinstance(data, list) else ["list extracted from the reply"]
    if found is not None:
        body = found.group(0)
    elif "[" in text:  # cut off before its "]" (the reply ran out of tokens)
        body, notes = text[text.rindex("["):], ["unterminated list"]
    else:
        raise SimulationError(f"no JSON list in the reply: {text[:80]!r}")
    nums = [float(x) for x in NUMBER.findall(body)]
    if n and not nums:
        raise SimulationError(f"the reply's list holds no numbers: {body[:80]!r}")
    return fit_values(nums, n, notes), "; ".join(notes) or "repaired"


def fit_values(values: list[float], n: int, notes: list[str]) -> list[float]:
    """``values`` padded with 0 or cut to ``n`` and clamped to 0-10; what changed is appended
    to ``notes``."""
    if len(values) != n:
        notes.append(f"{len(values)} values for {n} tokens")
    values = (values + [0.0] * n)[:n]
    clamped = [min(10.0, max(0.0, v)) for v in values]
    if clamped != values:
        notes.append("clamped to 0-10")
    return clamped


class LLMSimulator:
    """A simulator that calls an LLM through a Client; ``stats`` counts outcomes."""

    def __init__(self, cfg: SimulateConfig, client: Client | None = None) -> None:
        self.cfg = cfg
        self.client = client if client is not None else make_client(cfg)
        self.stats: Counter[str] = Counter()

    def report(self) -> dict[str, float]:
        """The counts, and for value-reading simulators the mean value mass per slot."""
        out: dict[str, float] = dict(self.stats)
        if self.stats["value_slots"]:
            out["value_mass_mean"] = round(self.stats["value_mass"] / self.stats["value_slots"], 4)
        return out


class OpenAISimulator(LLMSimulator):
    """OpenAI's all-at-once simulator: one request per sequence, or per group of sequences up
    to ``sim_batch_tokens`` record tokens (``simulate_many``)."""

    def __init__(self, cfg: SimulateConfig, client: Client | None = None) -> None:
        super().__init__(cfg, client)
        if cfg.sim_fill not in FILLS:
            raise UserError(f"unknown --sim-fill {cfg.sim_fill!r}; have {list(FILLS)}")
        self.reads_values = bool(getattr(self.client.backend, "reads_values", False))
        self.warned = self.warned_echo = False

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> SequenceSimulation:
        return (await self._prompt(explanation, [tokens]))[0]

    async def simulate_many(self, explanation: str,
                            sequences: Sequence[Sequence[str]]) -> list[SequenceSimulation]:
        groups = chunks_by_tokens(sequences, self.cfg.sim_batch_tokens)
        done = await asyncio.gather(*[self._prompt(explanation, [sequences[i] for i in g])
                                      for g in groups])
        return [s for part in done for s in part]

    @property
    def fill_text(self) -> str:
        unknown = load("common")["records"]["unknown"]
        return {"zero": "0", "unknown": unknown}.get(self.cfg.sim_fill, FILL_SELF)

    async def _prompt(self, explanation: str,
                      sequences: Sequence[Sequence[str]]) -> list[SequenceSimulation]:
        try:
            if self.reads_values:
                sims, masses = await self._read(explanation, sequences)
            else:
                sims, masses = await self._echo(explanation, sequences)
        except SimulationError:
            self.stats["failed"] += 1
            raise
        self.stats["simulated"] += len(sims)
        self.stats["value_mass"] += sum(masses)
        self.stats["value_slots"] += len(masses)
        if masses and sum(masses) / len(masses) < LOW_MASS and not self.warned:
            self.warned = True
            log.warning("openai simulator: the values 0-10 got %.3f of the probability at the "
                        "slots on average, so the simulation is mostly noise (mean value mass "
                        "is in the score stage's simulator_stats)", sum(masses) / len(masses))
        return sims

    async def _read(self, explanation: str, sequences: Sequence[Sequence[str]]
                    ) -> tuple[list[SequenceSimulation], list[float]]:
        """Full distributions, slot by slot (local backends)."""
        fill = self.fill_text
        segments = openai_simulate_segments(explanation, sequences,
                                            reveal=fill == load("common")["records"]["unknown"])
        resp = await self.client.complete(Request(
            segments=tuple(segments), values=VALUE_TEXTS, fill=fill, stage="score"))
        total = sum(len(t) for t in sequences)
        if len(resp.value_probs) != total:
            raise SimulationError(f"the backend read {len(resp.value_probs)} slots for {total} "
                                  "tokens")
        out, start = [], 0
        for tokens in sequences:
            out.append(simulation_from_value_probs(
                tokens, resp.value_probs[start:start + len(tokens)]))
            start += len(tokens)
        return out, [sum(p) for p in resp.value_probs]

    async def _echo(self, explanation: str, sequences: Sequence[Sequence[str]]
                    ) -> tuple[list[SequenceSimulation], list[float]]:
        """Top-k prompt logprobs of one filled prompt (HTTP endpoints)."""
        marker = self.fill_text
        if marker == FILL_SELF:
            marker = load("common")["records"]["unknown"]
            if not self.warned_echo:
                self.warned_echo = True
                log.warning("openai simulator: %s returns only top-k prompt logprobs, so the "
                            "slots are filled with %r, not read one by one; a split '10' reads "
                            "as '1' and values outside the top %d are lost",
                            self.client.backend.name, marker, self.cfg.sim_top_logprobs)
        prompt = openai_simulate_prompt_many(explanation, sequences, marker=marker,
                                             reveal=marker == "unknown")
        resp = await self.client.complete(Request(
            prompt=prompt, max_tokens=1, prompt_logprobs=self.cfg.sim_top_logprobs,
            stage="score"))
        masses: list[float] = []
        sims = simulations_from_logprobs(resp.tokens, resp.top_logprobs, sequences, marker,
                                         masses)
        return sims, masses


class JSONSimulator(LLMSimulator):
    """Asks a chat model for a JSON list of 0-10 integers, one per token; repairs what it
    can (see ``parse_json_values``) and raises SimulationError otherwise."""

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> SequenceSimulation:
        msgs = json_simulate_messages(explanation, tokens)
        resp = await self.client.complete(Request(
            messages=msgs, max_tokens=4 * len(tokens) + 32, temperature=0.0, stage="score"))
        try:
            values, repaired = parse_json_values(resp.text, len(tokens))
        except SimulationError:
            self.stats["failed"] += 1
            raise
        if repaired:
            log.info("json simulator: repaired a reply (%s)", repaired)
        self.stats["repaired" if repaired else "exact"] += 1
        return point_simulation(tokens, values)
