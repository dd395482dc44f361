"""The score stage and ``run`` (record -> explain -> score), each writing plain files."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .explain import ExplainConfig, explain
from .formats import NeuronSimulationResults, ScoredExplanation, dumps
from .record import RecordConfig, RecordStore, record
from .runs import atomic_write_text, claim_stage, opt, save_stage, write_json
from .score import LinearCalibration, flatten, score_records
from .simulate import SimulateConfig, Simulator, make_simulator

log = logging.getLogger("neuroscribe")
VARIANTS = ("all", "top", "random")


@dataclass
class ScoreConfig(SimulateConfig):
    """How to score explanations (simulator options plus the splits)."""

    n_per_split: int = opt(0, "records per split (0: all recorded, split evenly)")
    calibrate: bool = opt(True, "fit a linear calibration on the calibration split (OpenAI)")


def score_path(run_dir: Path, hookpoint: str, unit: int, kind: str = "") -> Path:
    name = f"{unit}.{kind}.json" if kind else f"{unit}.json"
    return run_dir / "scores" / hookpoint.replace(":", "__") / name


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


async def score_unit(sim: Simulator, explanation: str, nr: Any, cfg: ScoreConfig) -> dict[str, Any]:
    """Calibrate on the calibration split, score valid and test: all, top-only, random-only."""
    n = cfg.n_per_split or None
    cal = nr.split("calibration", n)

    async def run(records: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*[sim.simulate(explanation, r.tokens) for r in records]))

    calibration = None
    if cfg.calibrate:
        cal_sims = await run(cal)
        calibration = LinearCalibration.fit(
            flatten([s.expected_activations for s in cal_sims]),
            flatten([r.activations for r in cal]))
    scores: dict[str, Any] = {}
    results = None
    for split in ("valid", "test"):
        top, rnd = nr.top_split(split, n), nr.random_split(split, n)
        sims = await run(top + rnd)
        parts = {"all": (top + rnd, sims), "top": (top, sims[: len(top)]),
                 "random": (rnd, sims[len(top):])}
        for variant, (recs, ss) in parts.items():
            scored = score_records(recs, ss, calibration)
            scores[f"{split}_{variant}"] = {
                "ev_correlation_score": _clean(scored.ev_correlation_score),
                "rsquared_score": _clean(scored.rsquared_score),
                "absolute_dev_explained_score": _clean(scored.absolute_dev_explained_score)}
            if split == "valid" and variant == "all":
                results = scored
    return {"scores": scores, "scored_simulation": results,
            "calibration": None if calibration is None else
            {"slope": calibration.slope, "intercept": calibration.intercept}}


def score(cfg: ScoreConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Score every explained unit; write NeuronSimulationResults JSON per unit, then index."""
    from tqdm import tqdm

    from .results import index_run, summarize

    store = RecordStore(run_dir)
    claim_stage(run_dir, "score", cfg, resume)
    sim = make_simulator(cfg)
    todo = sorted((run_dir / "explanations").glob("*/*.json"))
    # Saved before the first unit, so an interrupted stage still guards its config.
    save_stage(run_dir, "score", cfg, complete=False)
    scored = skipped = 0
    for path in tqdm(todo, desc="score", unit="unit", disable=None):
        entry = json.loads(path.read_text())
        hp, unit = entry["hookpoint"], entry["unit"]
        out = score_path(run_dir, hp, unit)
        if "explanation" not in entry or (resume and out.exists()):
            skipped += 1
            continue
        nr = store.neuron_record(hp, unit)
        res = asyncio.run(score_unit(sim, entry["explanation"], nr, cfg))
        write_json(score_path(run_dir, hp, unit, "scores"),
                   {"hookpoint": hp, "unit": unit, "explanation": entry["explanation"],
                    "simulator": cfg.simulator, "calibration": res["calibration"],
                    "scores": res["scores"]})
        atomic_write_text(out, dumps(NeuronSimulationResults(
            neuron_id=nr.neuron_id,
            scored_explanations=[ScoredExplanation(entry["explanation"],
                                                   res["scored_simulation"])])))
        scored += 1
    save_stage(run_dir, "score", cfg, complete=True, scored=scored)
    index_run(run_dir)
    return summarize(run_dir)


def run(rc: RecordConfig, ec: ExplainConfig, sc: ScoreConfig, run_dir: Path,
        resume: bool = False) -> dict[str, Any]:
    from .explain import EXPLAINERS
    from .simulate import SIMULATORS

    # Fail on a bad name before the slow stages, not after them.
    for name, known, flag in ((ec.explainer, EXPLAINERS, "explainer"),
                              (sc.simulator, SIMULATORS, "simulator")):
        if name not in known:
            raise UserError(f"unknown {flag} {name!r}; have {sorted(known)}")
    record(rc, run_dir, resume)
    explain(ec, run_dir, resume)
    return score(sc, run_dir, resume)

