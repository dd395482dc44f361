"""Benchmark: scaling out. Record tokens/s with 1 and 2 processes (torchrun, gloo), and
explain+score units per minute with 1, 2 and 3 local LLM servers (``scale_llm.py``, also
run alone: ``bench/results/scale-llm.json``).

Each record run is the real command (``python -m neuroscribe record`` or ``torchrun
--nproc-per-node N -m neuroscribe record``) on the same corpus, model and hookpoint, into a
fresh folder; the figure is the one ``record.json`` reports (tokens over the loop's seconds,
model loading excluded), plus the command's wall time. With N processes on a C-core machine
each process gets C / N threads (OMP_NUM_THREADS), so the comparison spends the same cores.
The merged records are checked to be the same bytes as the 1-process records. Results go to
``bench/results/scale.json``; nothing is asserted.

    python bench/scale.py                           # SmolLM2 layer 3, 40960 tokens
    python bench/scale.py --max-tokens 8192 --skip-llm
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import git_rev, loadavg

HERE = Path(__file__).resolve().parent


def run_record(n: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    flags = ["record", "--out", str(out), "--model", args.model, "--hookpoints", args.hookpoint,
             "--max-tokens", str(args.max_tokens), "--ctx-len", "64",
             "--shard-contexts", str(args.shard_contexts), "--checkpoint-seconds", "-1"]
    if args.corpus:
        flags += ["--corpus", args.corpus]
    launcher = ([sys.executable, "-m", "neuroscribe"] if n == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={n}", "-m", "neuroscribe"])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
    t0 = time.perf_counter()
    subprocess.run([*launcher, *flags], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    info = json.loads((out / "record.json").read_text())
    return {"processes": n, "threads_per_process": max(1, cores // n),
            "tokens_per_second": info["tokens_per_second"], "loop_seconds": info["seconds"],
            "wall_seconds": round(wall, 2), "n_tokens": info["n_tokens"],
            "contexts_per_rank": [r["contexts"] for r in info.get("ranks", [])]}


def same_records(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in (a / "records").glob("*"))
    return bool(files) and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--hookpoint", default="model.layers.3.mlp.act_fn")
    ap.add_argument("--corpus", default="", help="default: neuroscribe's default corpus")
    ap.add_argument("--max-tokens", type=int, default=40960)
    ap.add_argument("--shard-contexts", type=int, default=256)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--skip-llm", action="store_true", help="only the record part")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.processes.split(",")):
            row = run_record(n, Path(tmp) / f"p{n}", args)
            if n > 1:
                row["same_records_as_1_process"] = same_records(Path(tmp) / "p1",
                                                                Path(tmp) / f"p{n}")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    result: dict[str, Any] = {
        "benchmark": "scale", "date": datetime.date.today().isoformat(), "revision": git_rev(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_after": loadavg()},
        "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
        "record": rows}
    if not args.skip_llm:  # explain+score across 1, 2, 3 local servers (scale_llm.py)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "scale-llm.json"
            subprocess.run([sys.executable, str(HERE / "scale_llm.py"), "--run",
                            str(Path(tmp) / "run"), "--out", str(out)], check=True)
            result["explain_score"] = json.loads(out.read_text())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
