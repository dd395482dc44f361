"""Overhead of the sandbox: starting one sandboxed process, and one call to a running one,
with the kernel boundary (bwrap) and without it (none). Writes bench/results/sandbox.json.

    python bench/sandbox.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import git_rev, loadavg  # noqa: E402

from neuroscribe.sandbox import SandboxConfig, Worker  # noqa: E402

CODE = "def f(x):\n    return x * 2 + 1"


def measure(isolation: str, repeats: int) -> dict[str, float]:
    starts, calls = [], []
    for _ in range(repeats):
        with Worker(SandboxConfig(isolation=isolation)) as w:
            t0 = time.perf_counter()
            assert w.call(CODE, [1]).outputs == [3]  # start-up + first call
            starts.append(time.perf_counter() - t0)
            for _ in range(10):
                t0 = time.perf_counter()
                assert w.call(CODE, [2]).outputs == [5]
                calls.append(time.perf_counter() - t0)
    return {"start_ms_median": round(1000 * statistics.median(starts), 1),
            "call_ms_median": round(1000 * statistics.median(calls), 2),
            "starts": len(starts), "calls": len(calls)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox.json"))
    a = ap.parse_args()
    load0 = loadavg()
    rows = {iso: measure(iso, a.repeats) for iso in ("bwrap", "none")}
    out = {"benchmark": "sandbox overhead", "command": " ".join(["python", *sys.argv]),
           "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"git": git_rev(), "loadavg_start": load0, "loadavg_end": loadavg(),
                       "cpu_count": __import__("os").cpu_count(), "python": sys.version.split()[0]},
           "what_is_timed": "start: Worker() to the answer of its first call (process start, "
                            "bwrap's namespaces and mounts, the interpreter, one job); call: one "
                            "more job on the running process (one JSON line each way)",
           "results": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for iso, r in rows.items():
        print(f"{iso:6s} start {r['start_ms_median']:7.1f} ms   call {r['call_ms_median']:6.2f} ms")


if __name__ == "__main__":
    main()
