"""Benchmark: the cost of recording over the bare truncated forward pass.

Loads the subject model once and tokenises the corpus once, then, on exactly the same token
batches, times

  bare    the forward pass to the hookpoint (same hooks, same early stop), nothing recorded;
  record  what ``neuroscribe.record.core.record`` does per batch: the same forward pass, then
          ``UnitRecorder.update``; plus ``UnitRecorder.finished()`` once at the end.

The two are interleaved batch by batch (which one goes first alternates), so machine drift and
other processes hit both alike; every repeat starts a fresh recorder. Reported: tokens/s of
each, the overhead ratio record / bare - 1 (median over repeats, and from per-batch minima
over repeats, which is robust to bursts of load from other processes), and a breakdown of
where the recording time goes, from one extra instrumented pass. Results go to a JSON file;
nothing is asserted.

    python bench/record.py                      # default corpus, layer 3, 40960 tokens
    python bench/record.py --max-tokens 102400 --repeats 3 --out /tmp/record.json
    python bench/record.py --dtype bfloat16 --out bench/results/record-bf16.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from machine import git_rev, loadavg

import neuroscribe.record.core as rec_mod
from neuroscribe.models import capture, load_subject, resolve_hookpoints, run_to_hooks
from neuroscribe.record.core import RecordConfig, UnitRecorder
from neuroscribe.record.moments import Moments
from neuroscribe.stats import TopK

DEFAULT_OUT = Path(__file__).parent / "results" / "record.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="subject model (as for neuroscribe record)")
    p.add_argument("--corpus", default="default", help="corpus (as for neuroscribe record)")
    p.add_argument("--hookpoint", default="model.layers.3.mlp.act_fn")
    p.add_argument("--max-tokens", type=int, default=40_960)
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4,
                   help="passes over the batches (even: each batch goes first equally often)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the subject's dtype (as for neuroscribe record)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the instrumented pass")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


class Bench:
    """The model, the batches and both timed steps, sharing one ``capture`` of the hookpoint."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cfg = RecordConfig(model=args.model, hookpoints=args.hookpoint, corpus=args.corpus,
                                max_tokens=args.max_tokens, ctx_len=args.ctx_len,
                                batch_size=args.batch_size, seed=args.seed, dtype=args.dtype)
        t0 = time.perf_counter()
        self.subject = load_subject(self.cfg.model, self.cfg.device, self.cfg.dtype)
        self.load_seconds = time.perf_counter() - t0
        self.model = self.subject.model
        self.hookpoints = resolve_hookpoints(self.model, [args.hookpoint])
        self.batches = [torch.tensor(b) for _, _, b in rec_mod._shard_batches(
            self.cfg, self.subject.tokenizer, lambda s: True, [0])]
        if not self.batches:
            sys.exit(f"corpus {args.corpus!r} gave no {args.ctx_len}-token context")
        self.n_tokens = sum(b.numel() for b in self.batches)
        self.store: dict[str, Any] = {}
        self.recorders: dict[str, UnitRecorder] = {}
        self.n_ctx = 0

    def forward(self, ids: Any) -> dict[str, Any]:
        return run_to_hooks(self.model, ids, self.store)

    def bare(self, ids: Any) -> None:
        self.forward(ids)

    def fresh(self) -> None:
        self.recorders, self.n_ctx = {}, 0

    def record(self, ids: Any) -> None:
        """One batch exactly as ``record()`` handles it."""
        self.update(ids, self.forward(ids))

    def update(self, ids: Any, captured: dict[str, Any]) -> None:
        ctx = torch.arange(self.n_ctx, self.n_ctx + len(ids))
        for hp, acts in captured.items():
            if hp not in self.recorders:
                self.recorders[hp] = UnitRecorder(hp, acts.shape[-1], self.cfg)
            self.recorders[hp].update(acts, ids.cpu().to(torch.int32), ctx)
        self.n_ctx += len(ids)

    def finish(self) -> None:
        for r in self.recorders.values():
            r.finished()


def timed(f: Any, *a: Any) -> float:
    t0 = time.perf_counter()
    f(*a)
    return time.perf_counter() - t0


def run_interleaved(bench: Bench, repeats: int) -> dict[str, Any]:
    """Per repeat: per-batch seconds of bare and record, and the seconds of finished()."""
    reps = []
    for r in range(repeats):
        bench.fresh()
        bare, record = [], []
        for i, ids in enumerate(bench.batches):
            if (i + r) % 2 == 0:
                bare.append(timed(bench.bare, ids))
                record.append(timed(bench.record, ids))
            else:
                record.append(timed(bench.record, ids))
                bare.append(timed(bench.bare, ids))
        finish = timed(bench.finish)
        reps.append({"bare_batch_s": bare, "record_batch_s": record, "finished_s": finish})
        print(f"repeat {r}: bare {sum(bare):.2f}s, record {sum(record) + finish:.2f}s "
              f"({sum(record) + finish - sum(bare):+.2f}s)", file=sys.stderr)
    return {"repeats": reps}


def breakdown(bench: Bench) -> dict[str, float]:
    """Exclusive seconds per part of recording, from one more pass with timers on the parts.

    A part's time excludes the timed parts it calls (the replay of the warm-up batches through
    the bin stores and histogram counts there, not under "quantile boundaries").
    """
    spent: dict[str, float] = defaultdict(float)
    inner: list[float] = []  # time of timed callees, per open timer
    patched = []

    def wrap(owner: Any, name: str, label: Any) -> None:
        raw = owner.__dict__[name]
        f = raw.__func__ if isinstance(raw, staticmethod) else raw

        def timer(*a: Any, **k: Any) -> Any:
            inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                spent[label(a) if callable(label) else label] += dt - inner.pop()
                if inner:
                    inner[-1] += dt

        setattr(owner, name, staticmethod(timer) if isinstance(raw, staticmethod) else timer)
        patched.append((owner, name, raw))

    def store_name(a: tuple[Any, ...]) -> str:
        for rec in bench.recorders.values():
            for name in ("top", "random", "bins"):
                if getattr(rec, name) is a[0]:
                    return f"top-k store: {name}"
        return "top-k store: other"

    wrap(Bench, "forward", "forward pass")
    wrap(Moments, "batch", "moments: batch sums")
    wrap(Moments, "merge", "moments: merge")
    wrap(TopK, "update_rows", store_name)
    wrap(UnitRecorder, "_histogram", "histogram")
    wrap(UnitRecorder, "fix_boundaries", "quantile boundaries and histogram edges")
    wrap(UnitRecorder, "update", "update: rest (maxima, early transposed copies, checks)")
    wrap(UnitRecorder, "flush", "flush: rest (held batches joined, random keys, bin scores)")
    wrap(UnitRecorder, "finished", "finished()")
    try:
        bench.fresh()
        for ids in bench.batches:
            bench.update(ids, bench.forward(ids))
        bench.finish()
    finally:
        for owner, name, raw in reversed(patched):
            setattr(owner, name, raw)
    return {k: round(v, 4) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}


def summarise(bench: Bench, runs: dict[str, Any]) -> dict[str, Any]:
    reps = runs["repeats"]
    n = bench.n_tokens
    bare = [sum(r["bare_batch_s"]) for r in reps]
    record = [sum(r["record_batch_s"]) + r["finished_s"] for r in reps]
    ratios = [b / a - 1 for a, b in zip(bare, record)]
    # Robust to load from other processes: each batch's fastest time over the repeats.
    bare_min = sum(map(min, zip(*(r["bare_batch_s"] for r in reps))))
    rec_min = sum(map(min, zip(*(r["record_batch_s"] for r in reps)))) + min(
        r["finished_s"] for r in reps)
    return {
        "tokens": n,
        "batches": len(bench.batches),
        "bare_tokens_per_s": round(n / statistics.median(bare), 1),
        "record_tokens_per_s": round(n / statistics.median(record), 1),
        "overhead_ratio": round(statistics.median(ratios), 4),
        "overhead_ratio_per_repeat": [round(x, 4) for x in ratios],
        "bare_seconds_per_repeat": [round(x, 3) for x in bare],
        "record_seconds_per_repeat": [round(x, 3) for x in record],
        "finished_seconds_per_repeat": [round(r["finished_s"], 4) for r in reps],
        "min_per_batch": {"bare_tokens_per_s": round(n / bare_min, 1),
                          "record_tokens_per_s": round(n / rec_min, 1),
                          "overhead_ratio": round(rec_min / bare_min - 1, 4)},
    }


def machine() -> dict[str, Any]:
    import numpy
    import transformers

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(), "numpy": numpy.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or None,
            "git": git_rev()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = loadavg()
    bench = Bench(args)
    with capture(bench.model, bench.hookpoints) as bench.store, torch.inference_mode():
        # Warm-up, untimed: first-call costs of the model and of the recorder.
        bench.fresh()
        for ids in bench.batches[:2]:
            bench.bare(ids)
            bench.record(ids)
        bench.finish()
        runs = run_interleaved(bench, args.repeats)
        parts = None if args.no_breakdown else breakdown(bench)
    result = {
        "benchmark": "record overhead over the bare forward pass",
        "timestamp": started,
        "command": " ".join(["python bench/record.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"model": args.model, "corpus": args.corpus, "hookpoint": args.hookpoint,
                   "units": {hp: r.n_units for hp, r in bench.recorders.items()},
                   "max_tokens": args.max_tokens, "ctx_len": args.ctx_len,
                   "batch_size": args.batch_size, "repeats": args.repeats, "seed": args.seed,
                   "dtype": args.dtype,
                   "n_top": bench.cfg.n_top, "n_random": bench.cfg.n_random,
                   "n_quantile": bench.cfg.n_quantile,
                   "quantile_warmup": bench.cfg.quantile_warmup,
                   "n_hist_bins": bench.cfg.n_hist_bins},
        "machine": {**machine(), "model_load_seconds": round(bench.load_seconds, 2),
                    "loadavg_start": load_start, "loadavg_end": loadavg()},
        "results": summarise(bench, runs),
        "breakdown_seconds": parts,
        "raw": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({"results": result["results"], "breakdown_seconds": parts}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
