"""The ``bench-planted`` command: plant, record, explain, score, judge concept recovery."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.groundtruth.planted import (
    PlantedConfig,
    interleave_corpus,
    load_concepts,
    plant,
)


def bench_planted(pc: PlantedConfig, rc: Any, ec: Any, sc: Any, run_dir: Path,
                  resume: bool = False) -> dict[str, Any]:
    """Plant, record, explain the planted units, score them, judge recovery; write
    ``planted.json`` (config + report) and ``planted.txt`` (the table) in ``run_dir``."""
    from neuroscribe.explain.core import EXPLAINERS, explain
    from neuroscribe.groundtruth.judge import JUDGES, format_table, judge_run
    from neuroscribe.llm.client import usage_of
    from neuroscribe.models import load_subject
    from neuroscribe.pipeline import score
    from neuroscribe.record.core import record
    from neuroscribe.runs import atomic_write_text, claim_stage, save_stage
    from neuroscribe.simulate.core import SIMULATORS

    concepts = load_concepts(pc.concepts)
    concepts = concepts[: pc.n_planted] if pc.n_planted > 0 else concepts
    names = [j for j in pc.judges.split(",") if j]
    for name, known, flag in ((ec.explainer, EXPLAINERS, "explainer"),
                              (sc.simulator, SIMULATORS, "simulator"),
                              *((j, JUDGES, "judge") for j in names)):
        if name not in known:
            raise UserError(f"unknown {flag} {name!r}; have {sorted(known)}")
    done = claim_stage(run_dir, "planted", pc, resume)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    subject = load_subject(rc.model, rc.device, rc.dtype)
    planting = plant(subject, rc.hookpoints, concepts, pc.strength, pc.plant_seed)
    spec = {"hookpoint": planting.hookpoint, "model": rc.model, "strength": pc.strength,
            "units": {str(u): c.name for u, c in zip(planting.units, planting.concepts)}}
    save_stage(run_dir, "planted", pc, complete=done, planting=spec)
    if pc.interleave:
        rc = dataclasses.replace(rc, corpus=interleave_corpus(rc.corpus, run_dir / "corpus.txt"))
    record(rc, run_dir, resume, subject=subject)
    planting.remove()
    del subject
    seconds["record"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    explain(dataclasses.replace(ec, units=",".join(map(str, planting.units))), run_dir, resume)
    seconds["explain"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    score(sc, run_dir, resume)
    seconds["score"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    judges = {j: JUDGES[j](concepts, ec) for j in names}
    report = {"planting": spec, "explainer": ec.explainer, "simulator": sc.simulator,
              **judge_run(run_dir, spec, concepts, judges)}
    seconds["judge"] = round(time.perf_counter() - t0, 1)
    report["seconds"] = seconds
    report["llm_usage"] = {
        stage: json.loads((run_dir / f"{stage}.json").read_text()).get("llm_usage", {})
        for stage in ("explain", "score")} | {"judge": usage_of(*judges.values())}
    save_stage(run_dir, "planted", pc, complete=True, **report)
    atomic_write_text(run_dir / "planted.txt", format_table(report) + "\n")
    return report


def _cli(args: argparse.Namespace) -> None:
    from neuroscribe.cli import config_from
    from neuroscribe.explain.core import ExplainConfig
    from neuroscribe.groundtruth.judge import format_table
    from neuroscribe.pipeline import ScoreConfig
    from neuroscribe.record.core import RecordConfig

    out = Path(args.out)
    report = bench_planted(config_from(args, PlantedConfig), config_from(args, RecordConfig),
                           config_from(args, ExplainConfig), config_from(args, ScoreConfig),
                           out, args.resume)
    print(format_table(report))
    print(f"report: {out / 'planted.json'}  table: {out / 'planted.txt'}")


def add_cli(sub: argparse._SubParsersAction) -> None:
    from neuroscribe.cli import add_config
    from neuroscribe.explain.core import ExplainConfig
    from neuroscribe.pipeline import ScoreConfig
    from neuroscribe.record.core import RecordConfig

    text = ("plant neurons of known function in one layer, run record -> explain -> score on "
            "them and report concept recovery (--hookpoints is the planted layer; --units is "
            "ignored: the planted units are explained)")
    p = sub.add_parser("bench-planted", help=text, description=text)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true",
                   help="continue a run in this folder, skipping finished work")
    for cls in (PlantedConfig, RecordConfig, ExplainConfig, ScoreConfig):
        add_config(p, cls)
    p.set_defaults(func=_cli, max_tokens=200_000)  # corpus: the record stage's default
