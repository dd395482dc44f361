"""The openai simulator's readings side by side on a small check set (one puzzle and the
colour concept), with a local GGUF model: value mass and AUROC per --sim-fill, and the old
reading (top-k prompt logprobs at "unknown" slots, as an HTTP endpoint gives).

    python bench/sim_fill.py --llm-model smollm2 --out bench/results/sim-fill-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import make_text  # noqa: E402

from neuroscribe.groundtruth.check_simulator import CheckConfig, check, planted_cases, puzzle_cases  # noqa: E402
from neuroscribe.simulate.llm import OpenAISimulator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm-model", default="smollm2")
    ap.add_argument("--n-puzzles", type=int, default=1)
    ap.add_argument("--out", default="bench/results/sim-fill-smollm2.json")
    args = ap.parse_args()
    cases = puzzle_cases("packaged", args.n_puzzles)
    cases += planted_cases("packaged", make_text(60), n=1, per=2, length=16)[0]
    rows = []
    for label, fill, reads in (("full logits, fill self", "self", True),
                               ("full logits, fill zero", "zero", True),
                               ("full logits, fill unknown", "unknown", True),
                               ("old: top-15 echo, fill unknown", "unknown", False)):
        cfg = CheckConfig(simulator="openai", llm_model=args.llm_model, sim_fill=fill,
                          cache_dir=tempfile.mkdtemp(), n_ctx=4096)
        sim = OpenAISimulator(cfg)
        sim.reads_values = reads  # False: the HTTP path, on the same model
        t0 = time.perf_counter()
        r = check(cfg, sim, cases)
        rows.append({"reading": label, "seconds": round(time.perf_counter() - t0, 1),
                     "value_mass_mean": r["simulator_stats"].get("value_mass_mean"),
                     **{f"auroc_{k}": round(r[k]["auroc"], 4) for k in ("puzzle", "planted",
                                                                        "all")}})
        print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps({
        "model": args.llm_model, "cases": len(cases), "tokens": sum(len(c.tokens) for c in cases),
        "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
