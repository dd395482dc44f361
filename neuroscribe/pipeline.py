"""The score stage and ``run`` (record -> explain -> score), each writing plain files."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.explain.core import ExplainConfig, explain
from neuroscribe.formats import NeuronSimulationResults, ScoredExplanation, dumps
from neuroscribe.llm.client import LLMError, concurrency_of, usage_of
from neuroscribe.record.core import RecordConfig, RecordStore, record
from neuroscribe.runs import (
    SHARD_HELP,
    atomic_write_text,
    claim_stage,
    in_shard,
    load_stage,
    opt,
    parse_shard,
    save_stage,
    write_json,
)
from neuroscribe.score.classify import (
    ClassifyConfig,
    Scorer,
    classify_unit,
    make_scorers,
    scorer_names,
)
from neuroscribe.score.core import LinearCalibration, correlation_score, flatten, score_records
from neuroscribe.simulate.core import SimulationError, Simulator, make_simulator, simulate_records

log = logging.getLogger("neuroscribe")
VARIANTS = ("all", "top", "random")


@dataclass
class ScoreConfig(ClassifyConfig):
    """How to score explanations (simulator and extra scorer options plus the splits)."""

    n_per_split: int = opt(0, "records per split (0: all recorded, split evenly)")
    calibrate: bool = opt(True, "fit a linear calibration on the calibration split (OpenAI)")
    shard: str = opt("0/1", SHARD_HELP, scope=True)


def score_path(run_dir: Path, hookpoint: str, unit: int, kind: str = "") -> Path:
    name = f"{unit}.{kind}.json" if kind else f"{unit}.json"
    from neuroscribe.models import safe_name

    return run_dir / "scores" / safe_name(hookpoint) / name


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


SIMULATION_ERRORS = (SimulationError, LLMError)


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


async def rank_candidates(sim: Simulator, candidates: Sequence[str],
                          cal: Sequence[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Each candidate's correlation on the calibration records (a failure is recorded, not
    raised), and its simulations (None where it failed)."""
    async def one(expl: str) -> tuple[dict[str, Any], Any]:
        try:
            sims = await simulate_records(sim, expl, cal)
        except SIMULATION_ERRORS as e:
            return {"explanation": expl, "calibration_ev_correlation": None,
                    "failure": _failure(e)}, None
        score = correlation_score(flatten([r.activations for r in cal]),
                                  flatten([s.expected_activations for s in sims]))
        return {"explanation": expl, "calibration_ev_correlation": _clean(score)}, sims

    out = await asyncio.gather(*[one(c) for c in candidates])
    return [d for d, _ in out], [s for _, s in out]


def best_candidate(ranked: Sequence[dict[str, Any]]) -> int | None:
    """Index of the highest calibration correlation (undefined ranks last, ties go to the
    earlier candidate); None when every candidate failed."""
    ok = [i for i, d in enumerate(ranked) if "failure" not in d]
    if not ok:
        return None

    def key(i: int) -> tuple[float, int]:
        v = ranked[i]["calibration_ev_correlation"]
        return (-math.inf if v is None else v, -i)

    return max(ok, key=key)


async def score_unit(sim: Simulator, explanations: str | Sequence[str], nr: Any,
                     cfg: ScoreConfig) -> dict[str, Any]:
    """Pick the best candidate on the calibration split (and calibrate on it), then score the
    chosen one on valid and test: all, top-only, random-only.

    The valid and test splits never influence the choice. A simulation failure is returned as
    ``failure`` (with the candidates ranked so far), never raised.
    """
    candidates = ([explanations] if isinstance(explanations, str)
                  else list(dict.fromkeys(explanations)))
    n = cfg.n_per_split or None
    cal = nr.split("calibration", n)
    if cfg.calibrate or len(candidates) > 1:
        ranked, cal_sims = await rank_candidates(sim, candidates, cal)
    else:  # one candidate and no calibration: nothing to simulate on the calibration split
        ranked, cal_sims = [{"explanation": candidates[0],
                             "calibration_ev_correlation": None}], [None]
    choice = best_candidate(ranked)
    if choice is None:
        return {"failure": "every candidate failed to simulate: "
                + "; ".join(d["failure"] for d in ranked), "candidates": ranked}
    explanation = candidates[choice]
    calibration = None
    if cfg.calibrate:
        calibration = LinearCalibration.fit(
            flatten([s.expected_activations for s in cal_sims[choice]]),
            flatten([r.activations for r in cal]))
    scores: dict[str, Any] = {}
    results = None
    for split in ("valid", "test"):
        top, rnd = nr.top_split(split, n), nr.random_split(split, n)
        try:
            sims = await simulate_records(sim, explanation, top + rnd)
        except SIMULATION_ERRORS as e:
            return {"failure": f"{split} split: {_failure(e)}", "explanation": explanation,
                    "candidates": ranked}
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
    return {"explanation": explanation, "candidates": ranked, "scores": scores,
            "scored_simulation": results,
            "calibration": None if calibration is None else
            {"slope": calibration.slope, "intercept": calibration.intercept}}


def score(cfg: ScoreConfig, run_dir: Path, resume: bool = False,
          sim: Simulator | None = None) -> dict[str, Any]:
    """Score every explained unit; write NeuronSimulationResults JSON per unit, then index.

    ``sim`` overrides the configured simulator (tests pass one built on a fake backend).
    """
    from neuroscribe.results import index_run, summarize

    store = RecordStore(run_dir)
    parse_shard(cfg.shard)  # a bad --shard fails before anything is written
    claim_stage(run_dir, "score", cfg, resume)
    sim = sim or make_simulator(cfg)
    scorers = make_scorers(cfg, getattr(sim, "client", None))
    attach_subject(run_dir, scorers, cfg, getattr(sim, "client", None))
    todo = sorted((run_dir / "explanations").glob("*/*.json"))
    # Saved before the first unit, so an interrupted stage still guards its config.
    save_stage(run_dir, "score", cfg, complete=False)
    counts = asyncio.run(_score_units(cfg, run_dir, store, sim, scorers, todo, resume))
    save_stage(run_dir, "score", cfg, complete=True, **counts,
               llm_usage=usage_of(sim, *scorers.values()),
               simulator_stats=sim.report() if hasattr(sim, "report")
               else dict(getattr(sim, "stats", {})))
    if counts["failed"]:
        log.warning("score: %d units failed to simulate (see 'failure' in scores/*.scores.json)",
                    counts["failed"])
    index_run(run_dir)
    return summarize(run_dir)


def attach_subject(run_dir: Path, scorers: dict[str, Scorer], cfg: ScoreConfig,
                   client: Any = None) -> None:
    """Scorers that steer the subject model (intervention) get the run's model and SAEs, and
    with ``--intervention-judge llm`` the LLM judge."""
    need = [s for s in scorers.values() if getattr(s, "needs_subject", False)]
    if not need:
        return
    from neuroscribe.models import load_subject

    if cfg.intervention_judge == "llm":
        from neuroscribe.score.llm_judge import LLMJudge

        judge = LLMJudge(cfg, client)
        for s in need:
            s.llm_judge = judge
    rec = load_stage(run_dir, "record")
    subject = load_subject(rec["config"]["model"], rec["config"].get("device", "cpu"), "float32")
    for s in need:
        s.attach(subject, rec["hookpoints"])


async def _score_units(cfg: ScoreConfig, run_dir: Path, store: RecordStore, sim: Simulator,
                       scorers: dict[str, Scorer], todo: list[Path],
                       resume: bool) -> dict[str, int]:
    """Units of this shard concurrently on one event loop, at most ``--concurrency`` at once
    (a unit's simulations run concurrently too). Each unit writes only its own files, so the
    outputs do not depend on the order units finish in."""
    from tqdm import tqdm

    shard = parse_shard(cfg.shard)
    entries = [e for e in (json.loads(p.read_text()) for p in todo)
               if in_shard(e["hookpoint"], e["unit"], shard)]
    in_flight = asyncio.Semaphore(concurrency_of(cfg))
    bar = tqdm(total=len(entries), desc="score", unit="unit", disable=None)

    async def one(entry: dict[str, Any]) -> str:
        async with in_flight:
            outcome = await _score_one(cfg, run_dir, store, sim, scorers, entry, resume)
        bar.update()
        return outcome

    try:
        outcomes = await asyncio.gather(*[one(e) for e in entries])
    finally:
        bar.close()
    return {k: outcomes.count(k) for k in ("scored", "skipped", "failed")}


async def _score_one(cfg: ScoreConfig, run_dir: Path, store: RecordStore, sim: Simulator,
                     scorers: dict[str, Scorer], entry: dict[str, Any], resume: bool) -> str:
    """Score one explained unit and write its files: "scored", "skipped" or "failed"."""
    hp, unit = entry["hookpoint"], entry["unit"]
    out = score_path(run_dir, hp, unit)
    if "explanation" not in entry or (resume and out.exists()):
        return "skipped"
    nr = store.neuron_record(hp, unit)
    candidates = entry.get("candidates") or [entry["explanation"]]
    res = await score_unit(sim, candidates, nr, cfg)
    detail = {"hookpoint": hp, "unit": unit, "simulator": cfg.simulator,
              "explanation": res.get("explanation"), "candidates": res.get("candidates"),
              "calibration": res.get("calibration"), "scores": res.get("scores", {})}
    if (program_of := getattr(sim, "program_of", None)) is not None:
        detail["program"] = program_of(res.get("explanation") or candidates[0])
    if "failure" in res:
        write_json(score_path(run_dir, hp, unit, "scores"), {**detail, "failure": res["failure"]})
        return "failed"
    if scorers:
        detail["classification"] = await classify_unit(scorers, res["explanation"], nr,
                                                       cfg.n_per_split or None, hp, unit)
    write_json(score_path(run_dir, hp, unit, "scores"), detail)
    atomic_write_text(out, dumps(NeuronSimulationResults(
        neuron_id=nr.neuron_id,
        scored_explanations=[ScoredExplanation(res["explanation"], res["scored_simulation"])])))
    return "scored"


def run(rc: RecordConfig, ec: ExplainConfig, sc: ScoreConfig, run_dir: Path,
        resume: bool = False) -> dict[str, Any]:
    from neuroscribe.explain.core import EXPLAINERS
    from neuroscribe.simulate.core import SIMULATORS

    # Fail on a bad name before the slow stages, not after them.
    for name, known, flag in ((ec.explainer, EXPLAINERS, "explainer"),
                              (sc.simulator, SIMULATORS, "simulator")):
        if name not in known:
            raise UserError(f"unknown {flag} {name!r}; have {sorted(known)}")
    scorer_names(sc)
    record(rc, run_dir, resume)
    explain(ec, run_dir, resume)
    return score(sc, run_dir, resume)

