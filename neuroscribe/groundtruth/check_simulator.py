"""``neuroscribe check-simulator``: is the simulator an instrument that can read at all?

Each case is a true explanation with text and the tokens where it holds:
- OpenAI's puzzles: the true explanation; a token is active where the puzzle gives it an
  activation;
- the planted concepts (``data/planted/concepts.json``): the concept's description on
  excerpts of a corpus where its firing rule holds somewhere.

The simulator predicts each case's tokens from the explanation alone; the check prints the
AUROC of its predictions against the active tokens, pooled and per case. A simulator that
reads noise scores about 0.5 (the "10 read as 1" bug would show as a low figure here).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.runs import opt, write_json
from neuroscribe.simulate.core import SimulateConfig

WORD = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\n")  # GPT-like tokens


@dataclass(frozen=True)
class Case:
    source: str  # "puzzle" or "planted"
    name: str
    explanation: str
    tokens: list[str]
    active: list[bool]


@dataclass
class CheckConfig(SimulateConfig):
    """Known (explanation, text, active tokens) cases for a simulator."""

    puzzles: str = opt("packaged", "puzzles.json in OpenAI's format ('' for none)")
    n_puzzles: int = opt(0, "first N puzzles (0: all)")
    concepts: str = opt("packaged", "planted concepts JSON ('' for none)")
    n_concepts: int = opt(0, "first N concepts that occur in the corpus (0: all)")
    corpus: str = opt("", "text file for the planted cases (default: the default corpus)")
    per_concept: int = opt(2, "excerpts per planted concept")
    excerpt_tokens: int = opt(24, "tokens per planted excerpt")
    out: str = opt("runs/check-simulator", "folder for check.json")


def puzzle_cases(path: str, n: int = 0) -> list[Case]:
    from neuroscribe.groundtruth.puzzles import load_puzzles

    out = []
    for p in load_puzzles(path)[: n or None]:
        out += [Case("puzzle", f"{p.name}/{i}", p.explanation, r.tokens,
                     [a > 0 for a in r.activations]) for i, r in enumerate(p.records)]
    return out


def planted_cases(concepts_path: str, text: str, n: int = 0, per: int = 2,
                  length: int = 24) -> tuple[list[Case], list[str]]:
    """Excerpts of ``text`` (``length`` tokens, not overlapping) where each concept fires;
    also the names of the concepts that never fire in it."""
    from neuroscribe.groundtruth.planted import load_concepts

    tokens = WORD.findall(text)
    windows = [tokens[i:i + length] for i in range(0, len(tokens) - length + 1, length)]
    out, missing, used = [], [], 0
    for c in load_concepts("" if concepts_path == "packaged" else concepts_path):
        if n and used == n:
            break
        found = [(w, f) for w in windows if any(f := c.fires(w)) and not all(f)][:per]
        if not found:
            missing.append(c.name)
            continue
        used += 1
        out += [Case("planted", f"{c.name}/{i}", c.description, w, f)
                for i, (w, f) in enumerate(found)]
    return out, missing


def check(cfg: CheckConfig, sim: Any, cases: list[Case]) -> dict[str, Any]:
    """Simulate every case; AUROC of the predictions against the active tokens."""
    import numpy as np

    from neuroscribe.score.core import auroc
    from neuroscribe.simulate.core import simulate_records

    class Rec:  # what simulate_records reads
        def __init__(self, tokens: list[str]) -> None:
            self.tokens = tokens

    t0 = time.perf_counter()
    preds: list[list[float]] = []
    for case in cases:
        sims = asyncio.run(simulate_records(sim, case.explanation, [Rec(case.tokens)]))
        preds.append(list(sims[0].expected_activations))
    per_case = {c.name: auroc(p, c.active) for c, p in zip(cases, preds)}  # NaN: no negatives
    report: dict[str, Any] = {"simulator": cfg.simulator, "n_cases": len(cases),
                              "seconds": round(time.perf_counter() - t0, 1)}
    for source in ("puzzle", "planted", "all"):
        idx = [i for i, c in enumerate(cases) if source in ("all", c.source)]
        if not idx:
            continue
        flat_p = [v for i in idx for v in preds[i]]
        flat_y = [v for i in idx for v in cases[i].active]
        report[source] = {"cases": len(idx), "auroc": auroc(flat_p, flat_y),
                          "mean_case_auroc": float(np.nanmean([per_case[cases[i].name]
                                                               for i in idx]))}
    if hasattr(sim, "report"):
        report["simulator_stats"] = sim.report()
    report["per_case"] = {k: None if v != v else round(v, 4) for k, v in per_case.items()}
    return report


def format_report(r: dict[str, Any]) -> str:
    lines = [f"simulator check: {r['simulator']}, {r['n_cases']} cases ({r['seconds']} s)"]
    for source in ("puzzle", "planted", "all"):
        if source in r:
            s = r[source]
            lines.append(f"  {source:<8} {s['cases']:>4} cases  AUROC {s['auroc']:.3f}  "
                         f"(mean per case {s['mean_case_auroc']:.3f})")
    if (mass := r.get("simulator_stats", {}).get("value_mass_mean")) is not None:
        lines.append(f"  mean value mass at the slots: {mass:.3f}")
    return "\n".join(lines)


def _cli(args: argparse.Namespace) -> None:
    from neuroscribe.cli import config_from
    from neuroscribe.corpus import default_corpus_files
    from neuroscribe.simulate.core import make_simulator

    cfg = config_from(args, CheckConfig)
    cases = puzzle_cases(cfg.puzzles, cfg.n_puzzles) if cfg.puzzles else []
    missing: list[str] = []
    if cfg.concepts:
        files = [Path(cfg.corpus)] if cfg.corpus else default_corpus_files()
        text = "\n".join(f.read_text(errors="replace") for f in files)
        more, missing = planted_cases(cfg.concepts, text, cfg.n_concepts, cfg.per_concept,
                                      cfg.excerpt_tokens)
        cases += more
    report = check(cfg, make_simulator(cfg), cases)
    report["concepts_not_in_corpus"] = missing
    write_json(Path(cfg.out) / "check.json", {"config": vars(cfg), **report})
    print(format_report(report))
    print(f"report: {Path(cfg.out) / 'check.json'}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    from neuroscribe.cli import add_config

    p = sub.add_parser("check-simulator", help="AUROC of a simulator on known cases (puzzles "
                       "and planted concepts)", description=__doc__)
    add_config(p, CheckConfig)
    p.set_defaults(func=_cli)
