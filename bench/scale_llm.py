"""Explain + score units per minute against 1, 2 and 3 local ``llama_cpp.server`` processes
(one thread each, SmolLM2-135M GGUF), through ``--base-url`` with all of them: the endpoint
pool's scaling. Writes bench/results/scale-llm.json.

Each level starts from a fresh response cache and the same recorded run (recorded first when
--run does not exist): explain (highlight explainer) then score (json simulator, uncalibrated),
both LLM-bound, with ``--concurrency`` 2 per server. On a machine with fewer cores than
servers the servers share the cores, so the figures show the pool's overhead and balance
more than the hardware's scaling.

    python bench/scale_llm.py --units 8 --servers 1,2,3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import git_rev, loadavg

from neuroscribe.explain.core import ExplainConfig, explain
from neuroscribe.pipeline import ScoreConfig, score
from neuroscribe.record.core import RecordConfig, record

HOOKPOINT = "model.layers.3.mlp.act_fn"


def one_level(run_dir: Path, urls: list[str], n_units: int) -> dict[str, Any]:
    """Explain + score ``n_units`` units through all of ``urls``, with a fresh cache."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        work.mkdir()
        for name in ("record.json", "vocab.json", "records"):
            if (run_dir / name).exists():
                (work / name).symlink_to((run_dir / name).resolve())
        llm = dict(provider="openai", llm_model="smollm2", base_url=",".join(urls),
                   api_key_env="NEUROSCRIBE_BENCH_NO_KEY", concurrency=2 * len(urls),
                   cache_dir=str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        explained = explain(ExplainConfig(explainer="highlight", units=f"first:{n_units}",
                                          n_per_split=2, max_explanation_tokens=32, **llm), work)
        t1 = time.perf_counter()
        score(ScoreConfig(simulator="json", n_per_split=2, calibrate=False, **llm), work)
        t2 = time.perf_counter()
        stage = json.loads((work / "score.json").read_text())
    return {"servers": len(urls), "concurrency": 2 * len(urls),
            "explain_seconds": round(t1 - t0, 1), "score_seconds": round(t2 - t1, 1),
            "seconds": round(t2 - t0, 1), "units_per_minute": round(60 * n_units / (t2 - t0), 2),
            "explained": explained["explained"], "scored": stage["scored"],
            "failed": stage["failed"], "loadavg_after": loadavg()}


def main(argv: list[str] | None = None) -> None:
    from neuroscribe.llm.local_server import local_servers
    from neuroscribe.models import default_model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/bench-scale-llm", help="recorded run (made if "
                    "missing)")
    ap.add_argument("--max-tokens", type=int, default=8000, help="tokens to record")
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--servers", default="1,2,3", help="server counts to measure")
    ap.add_argument("--out", default="bench/results/scale-llm.json")
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    if not (run_dir / "record.json").exists():
        record(RecordConfig(hookpoints=HOOKPOINT, max_tokens=args.max_tokens), run_dir)
    model = str(default_model_path())
    levels = []
    for n in (int(x) for x in args.servers.split(",") if x):
        with local_servers(model, n) as started:  # one thread each
            levels.append(one_level(run_dir, [url for _, url in started], args.units))
        print(f"{n} server(s): {levels[-1]}", flush=True)
    base = levels[0]["units_per_minute"]
    result = {
        "command": "python bench/scale_llm.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "git": git_rev()},
        "llm": "SmolLM2-135M-Instruct GGUF through llama_cpp.server, 1 thread per server",
        "hookpoint": HOOKPOINT, "units": args.units,
        "explainer": "highlight (2 train records)",
        "scorer": "json simulator on 2 top + 2 random valid records, uncalibrated",
        "by_servers": {str(lv["servers"]): lv for lv in levels},
        "speedup": {str(lv["servers"]): round(lv["units_per_minute"] / base, 2)
                    for lv in levels},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"speedup: {result['speedup']}\nwrote {out}")


if __name__ == "__main__":
    main()
