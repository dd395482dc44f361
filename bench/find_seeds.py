"""Per-op results of bench-find runs on several seeds, pooled: FIND's success (NMSE < 0.1
against the clean function, as FIND's mse_indicator.py), the stricter variance-normalised
figure, and NMSE < 0.1 against the released variant the agent called (noise and corruption
included; not FIND's), per op and per variant, per agent.

    for s in 1 2 3 4 5; do
      python -m neuroscribe bench-find --out runs/fs$s --seed $s --agents offline \\
        --n-numeric 200 --n-string 0 --n-entity 0 --puzzles ''
    done
    python bench/find_seeds.py runs/fs1 runs/fs2 runs/fs3 runs/fs4 runs/fs5 \\
      --out bench/results/find_dist
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from neuroscribe.find.report import below


def pool(runs: list[Path]) -> dict:
    rows: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    seeds = []
    counts = []
    for run in runs:
        if (run / "find.json").exists():
            rep = json.loads((run / "find.json").read_text())
            seed, results = rep["config"]["suite"]["seed"], rep["results"]
        else:  # a run still going or stopped: the answers it has saved, each scored already
            seed = json.loads((run / "config.json").read_text())["suite"]["seed"]
            results = [json.loads(p.read_text())
                       for p in sorted((run / "answers").glob("*/*.json"))]
        seeds.append(seed)
        counts.append(len(results))
        for r in results:
            keys = [r["group"], f"{r['category']}/all"]
            if r.get("variant"):
                keys.append(f"numeric/variant:{r['variant']}")
            for k in keys:
                rows[r["agent"]][k].append({**r, "run": str(run)})
    out = {}
    for agent, groups in rows.items():
        out[agent] = {}
        for k, rs in sorted(groups.items()):
            d = {"n": len(rs), "solved": sum(bool(r["solved"]) for r in rs)}
            if any("nmse_var" in r for r in rs):
                d["solved_var"] = sum(below(r.get("nmse_var")) for r in rs)
            if any("nmse_released" in r for r in rs):
                d["solved_released"] = sum(below(r.get("nmse_released")) for r in rs)
            out[agent][k] = d
    return {"seeds": seeds, "functions_per_seed": counts, "runs": [str(r) for r in runs],
            "agents": out, "ceiling": ceiling(runs, rows)}


def ceiling(runs: list[Path], rows: dict) -> dict:
    """What any agent can reach: the noise-free function each variant computes (its
    ``expression``), scored as an answer against the truth. A noised or corrupted square
    wave, which FIND's generator writes as a sign, fails; so does a constant 0."""
    import numpy as np

    from neuroscribe.find.eval import nmse
    from neuroscribe.find.function import eval_points

    x = np.array(eval_points())
    solvable = set()
    n = 0
    for run in runs:
        for f in json.loads((run / "suite.json").read_text())["functions"]:
            if "expression" not in f["params"]:
                continue
            n += 1
            ns: dict = {}
            exec(f["code"], ns)  # noqa: S102 - the suite's own generated code
            with np.errstate(all="ignore"):
                seen = np.broadcast_to(np.asarray(eval(f["params"]["expression"],  # noqa: S307
                                                       {"np": np, "x": x}), complex), x.shape)
            pred = [float(v.real) if v.imag == 0 and np.isfinite(v.real) else 0.0 for v in seen]
            if below(nmse([ns["f_truth"](v) for v in x], pred)):
                solvable.add((str(run), f["id"]))
    agents = {a: sum(bool(r["solved"]) for r in g.get("numeric/all", [])
                     if (r["run"], r["id"]) in solvable) for a, g in rows.items()}
    return {"numeric": n, "solvable": len(solvable), "solved_of_solvable": agents}


def table(p: dict) -> str:
    lines = [f"bench-find, seeds {p['seeds']} pooled "
             f"({p.get('functions_per_seed', '?')} results per seed)", ""]
    for agent, groups in p["agents"].items():
        lines += [f"agent {agent}", f"{'op':<34}{'FIND NMSE<0.1':>16}{'NMSE/var<0.1':>16}"
                                    f"{'vs released':>16}"]
        for k, d in groups.items():
            cells = [f"{d[c]}/{d['n']} {100 * d[c] / d['n']:5.1f}%" if c in d else "-"
                     for c in ("solved", "solved_var", "solved_released")]
            lines.append(f"{k:<34}" + "".join(f"{c:>16}" for c in cells))
        lines.append("")
    c = p.get("ceiling", {})
    if c:
        lines.append(f"solvable by any agent (the variant's noise-free function passes): "
                     f"{c['solvable']}/{c['numeric']}; solved among them: "
                     + ", ".join(f"{a} {k}" for a, k in c["solved_of_solvable"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default="bench/results/find_dist")
    a = ap.parse_args()
    p = pool(a.runs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(p, indent=1))
    Path(a.out + ".txt").write_text(table(p) + "\n")
    print(table(p))


if __name__ == "__main__":
    main()
