"""OpenAI's neuron puzzles: loading, ranking and the explainer check's geometry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord, ActivationScale, SequenceSimulation
from neuroscribe.groundtruth.puzzles import (
    Puzzle,
    closer_to_truth,
    load_puzzles,
    rank_explanations,
    true_ranks_first,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "puzzles" / "puzzles.json"


def test_load_puzzle_format(tmp_path: Path) -> None:
    # A token with an activation is written [token, value]; the rest are plain strings.
    raw = {"p": {"name": "colors", "explanation": "colour words", "false_explanations": ["x"],
                 "sentences": [[["Red", 9], " car", [" blue", 10]]]}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    (p,) = load_puzzles(path)
    assert p.name == "colors"
    assert p.records == [ActivationRecord(tokens=["Red", " car", " blue"],
                                          activations=[9.0, 0.0, 10.0])]


def test_missing_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="puzzles file not found"):
        load_puzzles(tmp_path / "nope.json")


@pytest.mark.skipif(not SHARED.exists(), reason="shared puzzles.json not present")
def test_shared_puzzles_load() -> None:
    puzzles = load_puzzles(SHARED)
    assert len(puzzles) == 19
    assert all(p.false_explanations and p.records for p in puzzles)
    assert all(len(r.tokens) == len(r.activations) for p in puzzles for r in p.records)


def test_true_ranks_first_is_strict() -> None:
    assert true_ranks_first([0.9, 0.1, 0.5])
    assert not true_ranks_first([0.5, 0.5])  # a tie is not a win
    assert not true_ranks_first([0.2, 0.3])


class _Oracle:
    """Simulates the true activations for the explanation 'truth', zeros plus noise otherwise."""

    def __init__(self, puzzle: Puzzle) -> None:
        self.acts = {tuple(r.tokens): r.activations for r in puzzle.records}

    async def simulate(self, explanation: str, tokens: list[str]) -> SequenceSimulation:
        real = self.acts[tuple(tokens)]
        vals = real if explanation == "truth" else [float(len(t) % 3) for t in tokens]
        return SequenceSimulation(tokens, list(vals), ActivationScale.NEURON_ACTIVATIONS,
                                  [[v] for v in vals], [[1.0] for _ in vals])


def test_rank_explanations_scores_truth_first() -> None:
    rec = ActivationRecord(tokens=["a", "bb", "ccc", "d"], activations=[0.0, 5.0, 0.0, 1.0])
    p = Puzzle("t", "truth", ["lie"], [rec])
    scores = asyncio.run(rank_explanations(_Oracle(p), p))
    assert scores[0] == pytest.approx(1.0)  # the oracle reproduces the activations exactly
    assert true_ranks_first(scores)


def test_closer_to_truth_uses_cosine() -> None:
    vecs = {"e": [1.0, 0.0], "t": [0.8, 0.6], "f1": [0.0, 1.0], "f2": [0.6, 0.8]}

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([vecs[t] for t in texts])

    ok, sims = closer_to_truth(embed, "e", Puzzle("x", "t", ["f1", "f2"], []))
    # cos(e, t) = 0.8 > cos(e, f2) = 0.6 > cos(e, f1) = 0
    assert ok and sims == pytest.approx([0.8, 0.0, 0.6])
    ok, _ = closer_to_truth(embed, "e", Puzzle("x", "f1", ["t"], []))
    assert not ok
