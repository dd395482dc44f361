"""OpenAI's neuron puzzles: check scorers and explainers against a known true explanation.

Each puzzle has token activations, a true explanation and false ones
(``puzzles.json`` from openai/automated-interpretability, MIT; shipped as package data with its
license in ``data/puzzles/``).

- Scorer check: simulate every explanation on the puzzle's records and count the puzzles where
  the true explanation scores highest (correlation over all tokens).
- Explainer check: explain each puzzle and count how often the explanation is closer, by
  sentence embedding, to the true explanation than to every false one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord
from neuroscribe.runs import opt, write_json
from neuroscribe.score.core import correlation_score, flatten
from neuroscribe.simulate.core import simulate_records

PACKAGED = "packaged"  # OpenAI's puzzles.json as shipped in data/puzzles


@dataclass(frozen=True)
class Puzzle:
    name: str
    explanation: str
    false_explanations: list[str]
    records: list[ActivationRecord]


@dataclass
class PuzzleConfig:
    """Which puzzles, simulators and explainers to check."""

    puzzles: str = opt(PACKAGED, "path of a puzzles.json in OpenAI's format (default: OpenAI's "
                       "19 puzzles, shipped with neuroscribe)")
    simulators: str = opt("tokens,embedding", "comma-separated simulators to rank explanations")
    explainers: str = opt("tokens", "comma-separated explainers to check")
    out: str = opt("runs/puzzles", "folder for puzzles.json report and table")


def load_puzzles(path: str | Path) -> list[Puzzle]:
    """Sentences are token lists where an activating token is ``[token, activation]``."""
    if path in ("", PACKAGED):
        from importlib import resources

        raw = json.loads(resources.files("neuroscribe").joinpath(
            "data/puzzles/puzzles.json").read_text())
    elif not Path(path).is_file():
        raise UserError(f"puzzles file not found: {path} (OpenAI's puzzles.json)")
    else:
        raw = json.loads(Path(path).read_text())
    out = []
    for key, d in raw.items():
        records = []
        for sentence in d["sentences"]:
            toks = [t[0] if isinstance(t, list) else t for t in sentence]
            acts = [float(t[1]) if isinstance(t, list) else 0.0 for t in sentence]
            records.append(ActivationRecord(tokens=toks, activations=acts))
        out.append(Puzzle(d.get("name", key), d["explanation"], list(d["false_explanations"]),
                          records))
    return out


async def rank_explanations(sim: Any, puzzle: Puzzle,
                            failures: dict[str, str] | None = None) -> list[float]:
    """Correlation of each explanation (true first) with the puzzle's activations. An
    explanation the simulator fails on scores -1 (ranks last); its reason goes to
    ``failures``."""
    from neuroscribe.llm.client import LLMError
    from neuroscribe.simulate.core import SimulationError

    real = flatten([r.activations for r in puzzle.records])
    scores = []
    for expl in [puzzle.explanation, *puzzle.false_explanations]:
        try:
            sims = await simulate_records(sim, expl, puzzle.records)
        except (SimulationError, LLMError) as e:
            if failures is not None:
                failures[expl] = str(e)
            scores.append(-1.0)
            continue
        s = correlation_score(real, flatten([x.expected_activations for x in sims]))
        scores.append(-1.0 if s != s else s)  # an undefined score ranks last
    return scores


def true_ranks_first(scores: list[float]) -> bool:
    return all(scores[0] > s for s in scores[1:])


def closer_to_truth(embed: Any, explanation: str, puzzle: Puzzle) -> tuple[bool, list[float]]:
    """Is the explanation's embedding closer to the true explanation than to each false one?"""
    vecs = embed([explanation, puzzle.explanation, *puzzle.false_explanations])
    sims = [float(vecs[0] @ v) for v in vecs[1:]]
    return all(sims[0] > s for s in sims[1:]), sims


def check(cfg: PuzzleConfig, make_simulator: Any, make_explainer: Any) -> dict[str, Any]:
    """Run both checks; ``make_*`` turn a registry name into a simulator or explainer."""
    from neuroscribe.simulate.core import Embedder

    puzzles = load_puzzles(cfg.puzzles)
    report: dict[str, Any] = {"n_puzzles": len(puzzles), "scorer": {}, "explainer": {}}
    for name in [s for s in cfg.simulators.split(",") if s]:
        sim, t0 = make_simulator(name), time.perf_counter()
        failures: dict[str, str] = {}
        per = {p.name: asyncio.run(rank_explanations(sim, p, failures)) for p in puzzles}
        wins = [k for k, v in per.items() if true_ranks_first(v)]
        report["scorer"][name] = {"true_ranks_first": len(wins), "solved": wins,
                                  "scores": per, "failures": failures,
                                  "seconds": round(time.perf_counter() - t0, 1)}
        if (program_of := getattr(sim, "program_of", None)) is not None:  # simulator's code
            report["scorer"][name]["programs"] = {
                e: program_of(e) for p in puzzles for e in [p.explanation, *p.false_explanations]}
    embed = Embedder()
    for name in [e for e in cfg.explainers.split(",") if e]:
        explainer, t0 = make_explainer(name), time.perf_counter()
        per_e: dict[str, Any] = {}
        for p in puzzles:
            try:
                text = asyncio.run(explainer.explain(p.records, []))[0]
            except UserError:  # a setup error (401, 403, 404) fails every puzzle alike
                raise
            except Exception as e:  # noqa: BLE001 - a failed puzzle is counted, not fatal
                per_e[p.name] = {"explanation": None, "failure": str(e), "closer": False}
                continue
            ok, sims = closer_to_truth(embed, text, p)
            per_e[p.name] = {"explanation": text, "closer": ok, "similarities": sims}
        report["explainer"][name] = {
            "closer_to_truth": sum(v["closer"] for v in per_e.values()), "per_puzzle": per_e,
            "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(cfg.out)
    write_json(out / "puzzles.json", report)
    (out / "puzzles.txt").write_text(format_report(report) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    n = report["n_puzzles"]
    lines = [f"OpenAI neuron puzzles ({n})",
             "(a) scorer check: puzzles where the true explanation ranks first"]
    lines += [f"  {k:<16}{v['true_ranks_first']:>3} / {n}   ({v['seconds']} s)"
              for k, v in report["scorer"].items()]
    lines.append("(b) explainer check: explanations closer to the truth than to every false one")
    lines += [f"  {k:<16}{v['closer_to_truth']:>3} / {n}   ({v['seconds']} s)"
              for k, v in report["explainer"].items()]
    return "\n".join(lines)
