"""Does showing a unit's output tokens to the explainer help? (``explain --with-output-tokens``)

Takes a run that was explained and scored with ``--scorers intervention`` (for example a side
of ``bench/replicate.py --intervention``), copies its records into a new run, explains the
same units again with ``--with-output-tokens`` and scores them the same way; then compares,
unit by unit, the activation-based score (valid, top + random) and the intervention AUROC.
With ``--explainer`` both sides are explained again with that explainer (an LLM one, say),
with and without the output tokens, and scored with the run's own score config.

    python bench/output_tokens.py runs/replicate/smollm2-topk/neurons-XXXX --units 40
    python bench/output_tokens.py RUN --units 40 --explainer highlight   # the local Qwen
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from neuroscribe.explain.core import ExplainConfig, explain
from neuroscribe.pipeline import ScoreConfig, score
from neuroscribe.runs import load_stage, write_json


def per_unit(run: Path) -> dict[tuple[str, int], dict[str, float | None]]:
    out = {}
    for p in sorted((run / "scores").glob("*/*.scores.json")):
        s = json.loads(p.read_text())
        iv = s.get("classification", {}).get("intervention", {})
        out[(s["hookpoint"], s["unit"])] = {
            "valid_all": s.get("scores", {}).get("valid_all", {}).get("ev_correlation_score"),
            "intervention": iv.get("auroc"), "explanation": s.get("explanation")}
    return out


def rerun(run: Path, suffix: str, ecfg: ExplainConfig, scfg: ScoreConfig) -> dict:
    """Copy ``run``'s records into a sibling run, explain and score there; its per-unit scores."""
    new = run.with_name(run.name + suffix)
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    for part in ("records", "output_tokens", "latents"):
        if (run / part).exists():
            shutil.copytree(run / part, new / part)
    for f in ("record.json", "vocab.json"):
        shutil.copy(run / f, new / f)
    explain(ecfg, new)
    score(scfg, new)
    return per_unit(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run scored with --scorers intervention")
    ap.add_argument("--units", type=int, default=40, help="its first N scored units")
    ap.add_argument("--explainer", default="", help="explain both sides again with this "
                    "explainer (default: the run's own; only the with-tokens side is new)")
    ap.add_argument("--llm-model", default="", help="the explainer's model (default: the "
                    "local Qwen)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/output_tokens_help.json"))
    a = ap.parse_args()
    scored = per_unit(a.run)
    keys = sorted(scored)[: a.units]
    units = ",".join(str(u) for _, u in keys)
    old_explain = load_stage(a.run, "explain")["config"]
    old_score = load_stage(a.run, "score")["config"]
    cfg = {**old_explain, "units": units}
    if a.explainer:
        cfg.update(explainer=a.explainer, llm_model=a.llm_model)
    base = (rerun(a.run, f"-{a.explainer}", ExplainConfig(**cfg), ScoreConfig(**old_score))
            if a.explainer else scored)
    suffix = f"-{a.explainer}-ot" if a.explainer else "-ot"
    after = rerun(a.run, suffix, ExplainConfig(**{**cfg, "with_output_tokens": True}),
                  ScoreConfig(**old_score))
    rows = [{"hookpoint": h, "unit": u, "without": base.get((h, u)), "with": after.get((h, u))}
            for h, u in keys]
    summary: dict = {"unexplained": {side: sum(r[side] is None for r in rows)
                                     for side in ("without", "with")}}
    for metric in ("valid_all", "intervention"):
        pairs = [(r["without"][metric], r["with"][metric]) for r in rows
                 if r["with"] and r["without"] and r["without"][metric] is not None
                 and r["with"][metric] is not None]
        w, o = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        summary[metric] = {"n": len(pairs), "without": float(w.mean()), "with": float(o.mean()),
                           "with_minus_without": float((o - w).mean()),
                           "with_better": int((o > w).sum()), "with_worse": int((o < w).sum())}
    write_json(a.out, {"run": str(a.run), "units": len(keys),
                       "explainer": cfg["explainer"], "llm_model": cfg["llm_model"],
                       "summary": summary, "rows": rows})
    print(f"units without an explanation: {summary['unexplained']}")
    for metric in ("valid_all", "intervention"):
        s = summary[metric]
        print(f"{metric:<14} n {s['n']:>3}  without {s['without']:.3f}  with {s['with']:.3f}  "
              f"({s['with_minus_without']:+.3f}; better {s['with_better']}, "
              f"worse {s['with_worse']})")


if __name__ == "__main__":
    main()
