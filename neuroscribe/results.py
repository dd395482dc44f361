"""Results: the SQLite index of a run, the score summary table and the histogram PNG.

The index is derived data: it is rebuilt from the run's plain files, so it never disagrees
with them and a resumed run simply rebuilds it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.runs import atomic_path, write_json

SCHEMA = """
CREATE TABLE units (hookpoint TEXT, layer INTEGER, unit INTEGER, max_activation REAL,
  mean REAL, variance REAL, skewness REAL, kurtosis REAL, PRIMARY KEY (hookpoint, unit));
CREATE TABLE explanations (hookpoint TEXT, unit INTEGER, explainer TEXT, explanation TEXT,
  failure TEXT, PRIMARY KEY (hookpoint, unit, explainer));
CREATE TABLE scores (hookpoint TEXT, unit INTEGER, simulator TEXT, split TEXT, variant TEXT,
  ev_correlation REAL, rsquared REAL, absolute_dev REAL, explanation TEXT);
CREATE INDEX scores_by_value ON scores (split, variant, ev_correlation);
CREATE TABLE classification (hookpoint TEXT, unit INTEGER, scorer TEXT, metric TEXT,
  value REAL, PRIMARY KEY (hookpoint, unit, scorer, metric));
"""
METRICS = ("balanced_accuracy", "f1", "auroc")


def _finite(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def index_run(run_dir: Path) -> Path:
    """(Re)build ``index.sqlite`` from records, explanations and scores."""
    from safetensors import safe_open

    from neuroscribe.models import layer_index
    from neuroscribe.record.core import RecordStore, store_path

    store = RecordStore(run_dir)
    target = run_dir / "index.sqlite"
    with atomic_path(target) as tmp:
        os.unlink(tmp)
        db = sqlite3.connect(tmp)
        db.executescript(SCHEMA)
        for hp in store.hookpoints:
            with safe_open(str(store_path(run_dir, hp)), framework="np") as f:
                stats = {k: f.get_tensor(k) for k in ("mean", "variance", "skewness", "kurtosis")}
                # Empty slots (ctx -1: fewer contexts than --n-top, or --n-top 0) hold no data.
                filled = f.get_tensor("top_ctx")[..., None] >= 0
                top = np.where(filled, f.get_tensor("top_acts"), -np.inf).max(
                    axis=(1, 2), initial=-np.inf)
            rows = [(hp, layer_index(hp), u, _finite(top[u]),
                     *(_finite(stats[k][u]) for k in ("mean", "variance", "skewness", "kurtosis")))
                    for u in range(store.units[hp])]
            db.executemany("INSERT INTO units VALUES (?,?,?,?,?,?,?,?)", rows)
        for p in sorted((run_dir / "explanations").glob("*/*.json")):
            e = json.loads(p.read_text())
            db.execute("INSERT OR REPLACE INTO explanations VALUES (?,?,?,?,?)",
                       (e["hookpoint"], e["unit"], e["explainer"], e.get("explanation"),
                        e.get("failure")))
        for p in sorted((run_dir / "scores").glob("*/*.scores.json")):
            s = json.loads(p.read_text())
            for key, v in s["scores"].items():
                split, variant = key.split("_", 1)
                db.execute("INSERT INTO scores VALUES (?,?,?,?,?,?,?,?,?)",
                           (s["hookpoint"], s["unit"], s["simulator"], split, variant,
                            v["ev_correlation_score"], v["rsquared_score"],
                            v["absolute_dev_explained_score"], s.get("explanation")))
            for scorer, m in (s.get("classification") or {}).items():
                db.executemany("INSERT INTO classification VALUES (?,?,?,?,?)",
                               [(s["hookpoint"], s["unit"], scorer, k, m[k])
                                for k in METRICS if m.get(k) is not None])
        db.commit()
        db.close()
    return target


def _describe(values: list[float]) -> dict[str, float | int]:
    a = np.array(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    q = np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"n": int(a.size), "mean": round(float(a.mean()), 4), "std": round(float(a.std()), 4),
            "p10": round(float(q[0]), 4), "p25": round(float(q[1]), 4),
            "median": round(float(q[2]), 4), "p75": round(float(q[3]), 4),
            "p90": round(float(q[4]), 4)}


def summarize(run_dir: Path, show: int = 10) -> dict[str, Any]:
    """Score distribution per split and variant, the best and worst units, and a PNG."""
    db = sqlite3.connect(run_dir / "index.sqlite")
    dist = {}
    for split, variant in db.execute("SELECT DISTINCT split, variant FROM scores ORDER BY 1, 2"):
        vals = [r[0] for r in db.execute(
            "SELECT ev_correlation FROM scores WHERE split=? AND variant=? AND "
            "ev_correlation IS NOT NULL", (split, variant))]
        dist[f"{split}_{variant}"] = _describe(vals)
    rows = db.execute(
        # The scored explanation: with several candidates, the one chosen on calibration.
        "SELECT s.hookpoint, s.unit, s.ev_correlation, COALESCE(s.explanation, e.explanation) "
        "FROM scores s JOIN explanations e USING (hookpoint, unit) "
        "WHERE s.split='valid' AND s.variant='all' "
        "ORDER BY s.ev_correlation IS NULL, s.ev_correlation DESC").fetchall()
    failed = db.execute("SELECT COUNT(*) FROM explanations WHERE failure IS NOT NULL").fetchone()[0]
    classification = {}
    for scorer, metric in db.execute(
            "SELECT DISTINCT scorer, metric FROM classification ORDER BY 1, 2"):
        classification[f"{scorer}_{metric}"] = _describe([r[0] for r in db.execute(
            "SELECT value FROM classification WHERE scorer=? AND metric=?", (scorer, metric))])
    db.close()
    vals = [r[2] for r in rows if r[2] is not None]
    summary = {"distribution": dist, "classification": classification,
               "failed_explanations": failed,
               "best": [list(r) for r in rows[:show]],
               "worst": [list(r) for r in rows[max(show, len(rows) - show):]]}
    write_json(run_dir / "summary.json", summary)
    if vals:
        _histogram(vals, run_dir / "score_hist.png")
    return summary


def _histogram(values: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist(values, bins=np.linspace(-0.2, 1.0, 25), color="#4c72b0", edgecolor="white")
    ax.axvline(float(np.mean(values)), color="#c44e52", ls="--",
               label=f"mean {np.mean(values):.3f}")
    ax.set_xlabel("explanation score (correlation, valid split, top + random)")
    ax.set_ylabel("units")
    ax.set_title(f"{len(values)} units")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def format_summary(summary: dict[str, Any]) -> str:
    """The table the CLI prints."""
    lines = ["score distribution (correlation, OpenAI's ev_correlation_score):",
             f"  {'split/variant':<14}{'n':>5}{'mean':>8}{'p10':>8}{'median':>8}{'p90':>8}"]
    for key, d in summary["distribution"].items():
        if d["n"]:
            lines.append(f"  {key:<14}{d['n']:>5}{d['mean']:>8.3f}{d['p10']:>8.3f}"
                         f"{d['median']:>8.3f}{d['p90']:>8.3f}")
    if summary.get("classification"):
        lines.append("scorers without logprobs (valid + test records):")
        lines += [f"  {key:<25}{d['n']:>5}{d['mean']:>8.3f}{d['p10']:>8.3f}{d['median']:>8.3f}"
                  f"{d['p90']:>8.3f}" for key, d in summary["classification"].items() if d["n"]]
    lines.append(f"failed explanations: {summary['failed_explanations']}")
    for title, rows in (("best units", summary["best"]), ("worst units", summary["worst"])):
        if not rows:
            continue
        lines.append(f"{title} (valid, top + random):")
        for hp, unit, s, text in rows:
            val = "   nan" if s is None else f"{s:6.3f}"
            lines.append(f"  {val}  {hp}#{unit}: {text}")
    return "\n".join(lines)


def format_usage(run_dir: Path) -> str:
    """LLM calls, tokens and cost per stage, from the stages' saved configs ('' when none)."""
    lines = []
    for stage in ("explain", "score"):
        path = run_dir / f"{stage}.json"
        usage = json.loads(path.read_text()).get("llm_usage") or {} if path.exists() else {}
        for u in usage.values():
            lines.append(f"  {stage:<8}{u['calls']:>6} calls{u['cached']:>6} cached"
                         f"{u['failed']:>4} failed{u['prompt_tokens']:>10,} prompt"
                         f"{u['completion_tokens']:>8,} completion tokens  ${u['cost_usd']:.4f}")
    return "\n".join(["LLM use:", *lines]) if lines else ""
