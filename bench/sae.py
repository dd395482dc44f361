"""Benchmark: TopK SAE training throughput of neuroscribe against EleutherAI sparsify and SAELens.

All trainers get the same activations, the same batches in the same order and the same shape
(d_in, n_latents, k, batch, steps, Adam at one constant lr), on this machine, in one run. Each
library runs in a child process (``bench/sae_worker.py``) in its own virtual environment with
torch pinned to the version of ``constraints.txt``:

  neuroscribe   this interpreter (neuroscribe installed here);
  sparsify      ~/.cache/neuroscribe/bench-venvs/sparsify  (eai-sparsify)
  saelens       ~/.cache/neuroscribe/bench-venvs/saelens   (sae-lens)

The venvs are made on first use (``python -m venv``, then torch, then the library with the
constraints file) and reused after. Activations are SmolLM2-135M's layer 3 MLP by default,
recorded once with neuroscribe's model loader and cached under
~/.cache/neuroscribe/bench-acts/; ``--synthetic`` uses Gaussian activations instead.

Reported per trainer: tokens/s over the timed steps (after ``--warmup-steps`` untimed ones; all
train the same ``warmup + steps`` batches), and from the median step (robust to bursts of load
from other processes), FVU on held-out activations at the end, and the
fraction of this machine's fp32 matmul peak (a 2048^3 ``torch.matmul``, timed here) that the
dense-equivalent flops ``6 * batch * d_in * n_latents`` per step amount to. Results go to a
JSON file; nothing is asserted.

    python bench/sae.py                                   # real activations, 200 steps
    python bench/sae.py --synthetic --steps 50            # quick
    python bench/sae.py --libs neuroscribe,sparsify --repeats 3
    python bench/sae.py --write-fixtures tests/fixtures/sae_formats
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import git_rev, loadavg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "sae_worker.py"
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_OUT = HERE / "results" / "sae.json"
CACHE = Path(os.environ.get("NEUROSCRIBE_CACHE") or Path.home() / ".cache" / "neuroscribe")
VENVS = CACHE / "bench-venvs"
ACTS = CACHE / "bench-acts"

# venv name -> pinned requirement (the versions this benchmark was written against)
LIBRARIES = {"sparsify": "eai-sparsify==1.3.3", "saelens": "sae-lens==6.54.12"}
VENV_OF = {"neuroscribe": None, "neuroscribe-bf16": None, "sparsify": "sparsify",
           "sparsify-fused": "sparsify", "sparsify-signum": "sparsify", "saelens": "saelens"}
FLOPS_FORMULA = ("dense-equivalent flops per step = 6 * batch * d_in * n_latents: a dense "
                 "encoder's forward (2BDN), weight-gradient (2BDN) and input-gradient (2BDN) "
                 "matmuls. The decoder and the k-sparse work are not counted; a TopK trainer "
                 "that skips the dense backward does less real work than this.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--libs", default="neuroscribe,neuroscribe-bf16,sparsify,sparsify-fused,"
                   "saelens",
                   help="comma-separated: neuroscribe, neuroscribe-bf16 (--dtype bfloat16), "
                        "sparsify, sparsify-fused (its Adam with fused=True, as neuroscribe's), "
                        "saelens, sparsify-signum (sparsify with its default schedule-free "
                        "signum optimizer)")
    p.add_argument("--synthetic", action="store_true", help="Gaussian activations, no model")
    p.add_argument("--d-in", type=int, default=1536, help="width of --synthetic activations")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--corpus", default="default")
    p.add_argument("--hookpoint", default="model.layers.3.mlp.act_fn")
    p.add_argument("--ctx-len", type=int, default=64)
    p.add_argument("--n-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    p.add_argument("--steps", type=int, default=200, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps before them")
    p.add_argument("--lr", type=float, default=4e-4,
                   help="Adam lr for all (default: sparsify's own Adam rule "
                        "2e-4 / sqrt(n_latents / 2**14) at 4096 latents)")
    p.add_argument("--heldout-tokens", type=int, default=16_384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every trainer")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds as they are in every trainer (by "
                        "default every trainer keeps freed memory, as train-sae does)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every trainer this many times, interleaved; tokens/s reported "
                        "as median and best")
    p.add_argument("--venvs", type=Path, default=VENVS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--write-fixtures", type=Path, metavar="DIR",
                   help="only write the tiny sparsify/SAELens format fixtures into DIR")
    return p.parse_args(argv)


# ---- environments ---------------------------------------------------------------------------


def venv_python(venvs: Path, name: str) -> Path:
    """The venv's python, after creating the venv and installing the library if missing."""
    venv = venvs / name
    py = venv / "bin" / "python"
    req = LIBRARIES[name]
    ready = venv / ".bench-ready"
    if ready.exists() and ready.read_text() == req:
        return py
    print(f"setting up {venv} ({req}, torch from {CONSTRAINTS.name}) ...", file=sys.stderr)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS)]
    subprocess.run([*pip, "torch"], check=True)  # first, so that nothing pulls another build
    subprocess.run([*pip, req], check=True)
    ready.write_text(req)
    return py


def python_for(lib: str, venvs: Path) -> Path:
    name = VENV_OF[lib]
    return Path(sys.executable) if name is None else venv_python(venvs, name)


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TQDM_DISABLE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               SPARSIFY_DISABLE_TRITON="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# ---- activations ----------------------------------------------------------------------------


def acts_file(args: argparse.Namespace, n_train: int) -> Path:
    """The cached activations for these settings, recorded (or drawn) when missing."""
    key: dict[str, Any] = {"synthetic": args.synthetic, "heldout": args.heldout_tokens,
                           "seed": args.seed}
    if args.synthetic:
        key["d_in"] = args.d_in
    else:
        key.update(model=args.model, corpus=args.corpus, hookpoint=args.hookpoint,
                   ctx_len=args.ctx_len)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = "synthetic" if args.synthetic else args.hookpoint.replace(":", "-")
    # a file with at least n_train training tokens will do: trainers read its first batches
    have = sorted(ACTS.glob(f"{name}-{digest}-*.safetensors"),
                  key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    have = [p for p in have if int(p.stem.rsplit("-", 1)[1]) >= n_train]
    if have:
        return have[0]
    from safetensors.torch import save_file

    path = ACTS / f"{name}-{digest}-{n_train}.safetensors"
    t0 = time.perf_counter()
    if args.synthetic:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(n_train + args.heldout_tokens, args.d_in, generator=gen)
    else:
        x = record_acts(args, n_train + args.heldout_tokens)
    train, heldout = x[:n_train], x[n_train:]
    # SAE trainers read shuffled tokens; the held-out tokens are later text, unshuffled
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed))
    ACTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"train": train[perm].contiguous(), "heldout": heldout.contiguous()},
              str(tmp), metadata={**{k: str(v) for k, v in key.items()},
                                  "n_train": str(n_train)})
    os.replace(tmp, path)
    print(f"activations: {tuple(x.shape)} in {time.perf_counter() - t0:.0f}s -> {path}",
          file=sys.stderr)
    return path


def record_acts(args: argparse.Namespace, n_tokens: int) -> torch.Tensor:
    """[n_tokens, units] activations of the hookpoint over the corpus's first contexts."""
    from neuroscribe.corpus import iter_contexts, iter_texts
    from neuroscribe.models import capture, load_subject, resolve_hookpoints, run_to_hooks

    subject = load_subject(args.model)
    hookpoints = resolve_hookpoints(subject.model, [args.hookpoint])
    if len(hookpoints) != 1:
        raise SystemExit(f"--hookpoint must name one hookpoint, got {hookpoints}")
    contexts = iter_contexts(iter_texts(args.corpus), subject.tokenizer, args.ctx_len,
                             n_tokens + args.ctx_len)
    chunks, n = [], 0
    with capture(subject.model, hookpoints) as store, torch.inference_mode():
        batch: list[list[int]] = []
        for ctx in contexts:
            batch.append(ctx)
            if len(batch) == 32 or (n + len(batch) * args.ctx_len >= n_tokens):
                acts = run_to_hooks(subject.model, torch.tensor(batch), store)[hookpoints[0]]
                chunks.append(acts.reshape(-1, acts.shape[-1]).float().clone())
                n += acts.shape[0] * acts.shape[1]
                batch = []
                if n >= n_tokens:
                    break
    del subject
    gc.collect()
    if n < n_tokens:
        raise SystemExit(f"corpus {args.corpus!r} gave only {n} tokens, need {n_tokens}")
    return torch.cat(chunks)[:n_tokens]


# ---- the machine's matmul peak --------------------------------------------------------------


def matmul_gflops(m: int, k: int, n: int, threads: int, seconds: float = 3.0,
                  dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a [m, k] @ [k, n] in ``dtype`` over about ``seconds`` of repeats."""
    torch.set_num_threads(threads)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(3):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * m * k * n / best / 1e9


# ---- running ----------------------------------------------------------------------------------


def run_one(lib: str, py: Path, spec_path: Path, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [str(py), str(WORKER), "train", lib, str(spec_path), str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads),
                              cwd=ROOT)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"{lib} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
    result["process_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def summarise(lib: str, runs: list[dict[str, Any]], flops_per_step: float, steps: int,
              peak: float) -> dict[str, Any]:
    tps = [r["tokens_per_s"] for r in runs]
    secs = [r["seconds"] for r in runs]
    med_s = statistics.median(secs)
    step_tps = [r["tokens_per_s_median_step"] for r in runs]
    return {
        "tokens_per_s": round(statistics.median(tps), 1),
        "tokens_per_s_best": round(max(tps), 1),
        "tokens_per_s_runs": tps,
        "tokens_per_s_median_step": round(statistics.median(step_tps), 1),
        "heldout_fvu": runs[-1]["heldout_fvu"],
        "heldout_fvu_runs": [r["heldout_fvu"] for r in runs],
        "gflops_dense_equivalent": round(flops_per_step * steps / med_s / 1e9, 2),
        "fraction_of_fp32_peak": round(flops_per_step * steps / med_s / 1e9 / peak, 4),
        "version": runs[-1]["version"],
        "torch": runs[-1]["torch"],
        "torch_threads": runs[-1]["torch_threads"],
        "what_is_timed": runs[-1]["what_is_timed"],
        "detail": {k: v for k, v in runs[-1].items()
                   if k in ("config", "trainer_config", "train_metrics", "python")},
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'trainer':<16} {'tokens/s':>10} {'best':>10} {'med.step':>10} {'FVU':>8} "
             f"{'GFLOP/s':>8} {'of peak':>8}  version"]
    for lib, r in results.items():
        lines.append(f"{lib:<16} {r['tokens_per_s']:>10.0f} {r['tokens_per_s_best']:>10.0f} "
                     f"{r['tokens_per_s_median_step']:>10.0f} "
                     f"{r['heldout_fvu']:>8.4f} {r['gflops_dense_equivalent']:>8.1f} "
                     f"{r['fraction_of_fp32_peak']:>8.1%}  {r['version']}")
    return "\n".join(lines)


def speed_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """tokens/s of each neuroscribe row over each sparsify row, and the FVU gap (neuroscribe
    minus sparsify) of each pair."""
    out: dict[str, float] = {}
    for ours in ("neuroscribe", "neuroscribe-bf16"):
        for theirs in ("sparsify", "sparsify-fused"):
            if ours in results and theirs in results:
                a, b = results[ours], results[theirs]
                out[f"{ours}/{theirs}"] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                out[f"fvu {ours} - {theirs}"] = round(a["heldout_fvu"] - b["heldout_fvu"], 5)
    return out


def write_fixtures(args: argparse.Namespace) -> None:
    args.write_fixtures.mkdir(parents=True, exist_ok=True)
    for lib in LIBRARIES:
        py = venv_python(args.venvs, lib)
        subprocess.run([str(py), str(WORKER), "fixtures", lib, str(args.write_fixtures)],
                       check=True, env=child_env(1), cwd=ROOT)
    for f in args.write_fixtures.glob("*/*.safetensors"):
        f.chmod(0o644)
    print(f"wrote fixtures in {args.write_fixtures}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.write_fixtures:
        write_fixtures(args)
        return
    libs = [s for s in args.libs.split(",") if s]
    unknown = [s for s in libs if s not in VENV_OF]
    if unknown:
        raise SystemExit(f"unknown --libs {unknown}: use {', '.join(VENV_OF)}")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    pythons = {lib: python_for(lib, args.venvs) for lib in libs}
    n_train = (args.warmup_steps + args.steps) * args.batch_size
    acts = acts_file(args, n_train)
    from safetensors import safe_open

    with safe_open(str(acts), "pt") as f:
        d_in = f.get_slice("train").get_shape()[1]
    spec = {"acts": str(acts), "n_latents": args.n_latents, "k": args.k,
            "batch_size": args.batch_size, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "lr": args.lr, "seed": args.seed,
            "threads": args.threads, "keep_freed_memory": not args.default_malloc}

    print(f"fp32 matmul peak ({args.threads} threads) ...", file=sys.stderr)
    peak = matmul_gflops(2048, 2048, 2048, args.threads)
    enc = matmul_gflops(args.batch_size, d_in, args.n_latents, args.threads)
    enc_bf16 = matmul_gflops(args.batch_size, d_in, args.n_latents, args.threads,
                             dtype=torch.bfloat16)
    load_start = loadavg()
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libs}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for rep in range(args.repeats):
            order = libs if rep % 2 == 0 else libs[::-1]
            for lib in order:
                r = run_one(lib, pythons[lib], spec_path, args.threads)
                runs[lib].append(r)
                print(f"[{rep}] {lib}: {r['tokens_per_s']:.0f} tokens/s, "
                      f"held-out FVU {r['heldout_fvu']:.4f}", file=sys.stderr)
    peak_after = matmul_gflops(2048, 2048, 2048, args.threads)

    flops_per_step = 6 * args.batch_size * d_in * args.n_latents
    results = {lib: summarise(lib, rs, flops_per_step, args.steps, max(peak, peak_after))
               for lib, rs in runs.items()}
    ratios = speed_ratios(results)
    ratio = ratios.get("neuroscribe/sparsify")
    result = {
        "benchmark": "TopK SAE training throughput: neuroscribe vs EleutherAI sparsify vs "
                     "SAELens",
        "timestamp": started,
        "command": " ".join(["python bench/sae.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {
            "activations": ("synthetic gaussian" if args.synthetic else
                            f"{args.model} {args.hookpoint} over corpus {args.corpus!r}, "
                            f"{args.ctx_len}-token contexts"),
            "d_in": d_in, "n_latents": args.n_latents, "k": args.k,
            "batch_size": args.batch_size, "steps_timed": args.steps,
            "warmup_steps": args.warmup_steps, "train_tokens": n_train,
            "heldout_tokens": args.heldout_tokens, "lr": args.lr,
            "optimizer": "Adam(betas=(0.9, 0.999)) at a constant lr for every trainer "
                         "(sparsify-signum excepted)",
            "lr_note": "library defaults differ: sparsify's Trainer uses signum (schedule-free "
                       "SignSGD, lr 5e-3/sqrt(n/2^14)) unless told adam, whose lr is "
                       "2e-4/sqrt(n/2^14) with 1000 warm-up steps and linear decay; SAELens "
                       "3e-4 constant; neuroscribe 2e-4/sqrt(n/2^14). The default --lr 4e-4 "
                       "is that rule at 4096 latents, used by all without schedule",
            "seed": args.seed, "threads": args.threads, "repeats": args.repeats,
            "malloc": ("glibc's defaults in every trainer" if args.default_malloc else
                       "every trainer, neuroscribe or not, with glibc's mmap threshold 32 MiB "
                       "and trim threshold 1 GiB (what train-sae sets: "
                       "neuroscribe/sae/memory.py)"),
            "batches": "the same shuffled training tokens cut into consecutive batches, same "
                       "order for all; each trains warmup_steps + steps batches",
            "fvu": "sum((x - x_hat)^2) / sum((x - mean(x))^2) over the held-out tokens (later "
                   "text than the training tokens), x_hat from each library's own "
                   "encode/decode after training",
        },
        "machine": {
            "fp32_matmul_peak_gflops": round(max(peak, peak_after), 1),
            "fp32_matmul_peak_gflops_before_after": [round(peak, 1), round(peak_after, 1)],
            "peak_measured_with": f"torch.matmul fp32 2048x2048 @ 2048x2048, {args.threads} "
                                  f"threads, best of repeats, torch {torch.__version__}",
            "encoder_matmul_gflops": round(enc, 1),
            "encoder_matmul_gflops_bf16": round(enc_bf16, 1),
            "encoder_matmul_shape": [args.batch_size, d_in, args.n_latents],
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or None,
            "loadavg_start": load_start, "loadavg_end": loadavg(), "git": git_rev(),
        },
        "flops_formula": FLOPS_FORMULA,
        "flops_per_step": flops_per_step,
        "results": results,
        "neuroscribe_over_sparsify_tokens_per_s": round(ratio, 3) if ratio else None,
        "ratios": ratios,
        "raw": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, args.out)
    print(f"fp32 peak {result['machine']['fp32_matmul_peak_gflops']} GFLOP/s; encoder matmul "
          f"{enc:.1f} GFLOP/s (bf16 {enc_bf16:.1f}); d_in={d_in} n_latents={args.n_latents} "
          f"k={args.k} batch={args.batch_size} steps={args.steps}")
    print(table(results))
    for name, value in ratios.items():
        print(f"{name}: {value}")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
