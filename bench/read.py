"""Benchmark: ``neuroscribe read`` speed. Reading 1,000 tokens through one layer of SmolLM2
(``model.layers.3.mlp.act_fn``) with a 16,384-latent SAE on it.

The SAE is random (a TopK SAE, k 32: the speed does not depend on what it learnt), every
latent is explained and its threshold is tiny, so every latent the SAE keeps is a hit and the
per-token bookkeeping is at its largest. The run folder is written by hand (record.json, the
quantile boundaries, one explanation per latent) into a temporary folder. The figure is
``read_text``'s wall time with the model already loaded (median of --repeats), the forward
pass and the SAE encode included. Results go to ``bench/results/read.json``.

    python bench/read.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import git_rev, loadavg

HERE = Path(__file__).resolve().parent
HP = "model.layers.3.mlp.act_fn"
DEFAULT_TEXT = HERE.parent.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"


def fake_run(run: Path, hookpoint: str, n_units: int) -> None:
    from safetensors.torch import save_file

    from neuroscribe.explain.core import explanation_path
    from neuroscribe.record.core import RecordConfig, store_path
    from neuroscribe.runs import save_stage, write_json
    from neuroscribe.stats import QUANTILES

    save_stage(run, "record", RecordConfig(hookpoints=hookpoint), complete=True,
               hookpoints=[hookpoint], units={hookpoint: n_units})
    store_path(run, hookpoint).parent.mkdir(parents=True, exist_ok=True)
    save_file({"quantile_boundaries": torch.zeros(n_units, len(QUANTILES))},
              str(store_path(run, hookpoint)))
    for u in range(n_units):
        write_json(explanation_path(run, hookpoint, u),
                   {"hookpoint": hookpoint, "unit": u, "explanation": f"latent {u}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-tokens", type=int, default=1000)
    ap.add_argument("--n-latents", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    args = ap.parse_args()

    from neuroscribe.models import load_subject
    from neuroscribe.read.core import ReadConfig, read_text
    from neuroscribe.sae.model import Sae, SaeConfig

    torch.manual_seed(0)
    t0 = time.perf_counter()
    subject = load_subject("smollm2")
    load_s = time.perf_counter() - t0
    ids = subject.tokenizer(Path(args.text).read_text()[:20 * args.n_tokens],
                            add_special_tokens=False)["input_ids"][:args.n_tokens]
    text = subject.tokenizer.decode(ids)
    d_in = subject.model.config.intermediate_size
    sae = Sae(SaeConfig(d_in=d_in, n_latents=args.n_latents, k=32))
    for p in (sae.W_enc, sae.W_dec):
        torch.nn.init.normal_(p, std=d_in ** -0.5)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save(Path(tmp) / "sae")
        hookpoint = f"{HP}:sae={Path(tmp) / 'sae'}"
        run = Path(tmp) / "run"
        fake_run(run, hookpoint, args.n_latents)
        cfg = ReadConfig()
        times, res = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = read_text(run, text, cfg, subject=subject)
            times.append(time.perf_counter() - t0)
    assert res is not None
    n = len(res["tokens"])
    out = {"what": f"neuroscribe read: {n} tokens, SmolLM2 {HP}, random TopK SAE "
                   f"({args.n_latents} latents, k 32), every latent explained",
           "n_tokens": n, "n_latents": args.n_latents, "seconds_median": round(
               statistics.median(times), 3), "seconds": [round(t, 3) for t in times],
           "tokens_per_second": round(n / statistics.median(times), 1),
           "model_load_seconds": round(load_s, 2), "goal_seconds": 2.0,
           "hits_shown": sum(len(t["units"]) for t in res["tokens"]),
           "command": "python bench/read.py", "torch_threads": torch.get_num_threads(),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "python": sys.version.split()[0]},
           "loadavg": loadavg(), "git_rev": git_rev(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = HERE / "results" / "read.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"read {n} tokens (SmolLM2 layer 3 MLP, {args.n_latents}-latent SAE): "
          f"{out['seconds_median']:.2f} s median of {args.repeats} "
          f"({out['tokens_per_second']:.0f} tok/s; model load {load_s:.1f} s) -> {path}")


if __name__ == "__main__":
    main()
