"""Reproduce the headline of Anthropic's *Towards Monosemanticity*: the features of a sparse
autoencoder trained on a one-layer transformer's MLP are more interpretable than its neurons.

End to end, every step skipped when its output (keyed by its config) is already there:

  1. train the one-layer toy transformer (512 ReLU neurons; ``neuroscribe.sae.toy``);
  2. collect its MLP activations on the corpus and train an SAE on them (``neuroscribe.sae.train``;
     relu + L1 as Anthropic by default), then measure it on held-out tokens: FVU, L0, dead
     fraction and the LM loss with the SAE spliced in (loss recovered against zero-ablation);
  3. run neuroscribe's record -> explain -> score twice with the same explainer and scorer: on
     the neurons, and on the SAE latents (hookpoint ``PATH:sae=FOLDER``), each on ``--units``
     units drawn at random among the alive ones (fired at least once in the recorded tokens);
  4. write ``bench/results/replicate-<name>.json`` (configs, SAE metrics, per-unit scores, their
     distributions, a bootstrap CI and a Mann-Whitney test of the difference) and a PNG of the
     two score histograms.

``--subject smollm2`` runs the same comparison on a layer of SmolLM2-135M (no toy training).

    python bench/replicate.py                          # toy, relu SAE, no-LLM baseline
    python bench/replicate.py --architecture topk      # TopK SAE (Gao et al.)
    python bench/replicate.py --llm                    # highlight explainer, Qwen simulator
    python bench/replicate.py --subject smollm2 --hookpoint model.layers.3.mlp.act_fn
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroscribe.corpus import iter_contexts, iter_texts
from neuroscribe.explain.core import ExplainConfig, explain
from neuroscribe.models import capture, load_subject, run_to_hooks
from neuroscribe.pipeline import ScoreConfig, score, score_path
from neuroscribe.record.core import RecordConfig, record, store_path
from neuroscribe.runs import write_json
from neuroscribe.sae.acts import tensor_batches
from neuroscribe.sae.eval import ce_loss_recovered, spliced_metrics
from neuroscribe.sae.toy import NEURONS, ToyConfig, train_toy
from neuroscribe.sae.train import TrainSaeConfig, evaluate, train_sae

log = logging.getLogger("neuroscribe")
ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "corpora"
RESULTS = Path(__file__).parent / "results"
METRIC = "valid_all"  # the headline score: held-out records, top + random (as `run` reports)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subject", default="toy", help="toy (trained here), smollm2, or a model")
    p.add_argument("--hookpoint", default="", help=f"MLP neurons (default: {NEURONS} for toy)")
    p.add_argument("--corpus", default=str(SHARED) if SHARED.exists() else "default",
                   help="text for the toy, the SAE and the records (default: the shared corpora)")
    p.add_argument("--toy-steps", type=int, default=ToyConfig.steps, help="toy training steps")
    p.add_argument("--architecture", default="relu", help="SAE: relu (L1), topk, batchtopk, "
                   "jumprelu")
    p.add_argument("--n-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="topk, batchtopk: active latents")
    p.add_argument("--l1-coeff", type=float, default=0.1, help="relu: L1 penalty (at 1.0, "
                   "TrainSaeConfig's default, the toy's SAE collapses to FVU 1; 0.3: L0 ~4)")
    p.add_argument("--resample-every", type=int, default=0, help="relu: resample dead latents")
    p.add_argument("--sae-lr", type=float, default=0.0, help="SAE learning rate (0: 2e-3 for "
                   "relu, which converges too slowly at 4e-4; TrainSaeConfig's default else)")
    p.add_argument("--sae-tokens", type=int, default=2_000_000, help="activations collected")
    p.add_argument("--sae-epochs", type=int, default=4, help="passes over them")
    p.add_argument("--eval-tokens", type=int, default=32_768, help="held out for SAE metrics")
    p.add_argument("--units", type=int, default=100, help="alive units explained per side")
    p.add_argument("--max-tokens", type=int, default=1_000_000, help="tokens recorded (the "
                   "shared corpora are ~1.1M toy tokens in file order: 100k is Shakespeare only)")
    p.add_argument("--ctx-len", type=int, default=64, help="tokens per record")
    p.add_argument("--llm", action="store_true", help="highlight explainer + openai simulator on "
                   "the local Qwen (the `make demo` settings; ~40 s a unit)")
    p.add_argument("--intervention", action="store_true", help="also score every unit with "
                   "--scorers intervention (steering; AUROC of the blind embedding judge)")
    p.add_argument("--with-output-tokens", action="store_true", help="explain with each "
                   "unit's output tokens (logit lens) shown to the explainer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="", help="results name (default: subject-architecture)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "replicate")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.hookpoint = args.hookpoint or (NEURONS if args.subject == "toy" else
                                        "model.layers.3.mlp.act_fn")
    args.name = args.name or "-".join([Path(args.subject).stem, args.architecture] +
                                      (["llm"] if args.llm else []) +
                                      (["ot"] if args.with_output_tokens else []))
    return args


def key(*parts: Any) -> str:
    """A short hash of configs: output folders are keyed by what made them."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


# ---- the SAE: activations, training, metrics ------------------------------------------------

@torch.no_grad()
def collect(subject: Any, hookpoint: str, corpus: str, n_tokens: int,
            ctx_len: int) -> tuple[Any, Any]:
    """The hookpoint's activations [contexts, ctx_len - 1, d] (float16: position 0, the
    attention sink, dropped as ``neuroscribe train-sae`` does) and the token ids."""
    from tqdm import tqdm

    ids = torch.tensor(list(iter_contexts(iter_texts(corpus), subject.tokenizer, ctx_len,
                                          n_tokens)))
    acts = []
    with capture(subject.model, [hookpoint]) as store:
        for b in tqdm(ids.split(32), desc="activations", unit="batch", disable=None):
            acts.append(run_to_hooks(subject.model, b, store)[hookpoint][:, 1:].half())
    return torch.cat(acts), ids


def spliced(model: Any, hookpoint: str, sae: Any, ids: Any) -> dict[str, float]:
    """``sae_eval.spliced_metrics`` averaged over batches of 32 contexts."""
    parts = [spliced_metrics(model, hookpoint, sae, b) for b in ids.split(32)]
    out = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
    out["ce_loss_recovered"] = ce_loss_recovered(out["ce_clean"], out["ce_sae"],
                                                 out["ce_zero_ablate"])
    return out


def train_and_measure(args: argparse.Namespace, model: str, folder: Path) -> dict[str, Any]:
    """Train the SAE on the corpus' activations (``--sae-epochs`` passes), then measure it on
    the held-out last ``--eval-tokens``; cached in ``folder/replicate_sae.json``."""
    cfg = TrainSaeConfig(n_latents=args.n_latents, architecture=args.architecture, k=args.k,
                         l1_coeff=args.l1_coeff, resample_every=args.resample_every,
                         lr=args.sae_lr or (2e-3 if args.architecture == "relu" else 0.0),
                         hookpoint=args.hookpoint, seed=args.seed)
    done = folder / "replicate_sae.json"
    if done.exists():
        return json.loads(done.read_text())
    subject = load_subject(model)
    t0 = time.perf_counter()
    acts, ids = collect(subject, args.hookpoint, args.corpus, args.sae_tokens, args.ctx_len)
    n_eval = args.eval_tokens // args.ctx_len
    train = acts[:-n_eval].reshape(-1, acts.shape[-1])
    held = acts[-n_eval:].reshape(-1, acts.shape[-1]).float()
    collect_s = time.perf_counter() - t0
    steps = args.sae_epochs * (len(train) // cfg.batch_size)
    batches = (b.float() for b in tensor_batches(train, cfg.batch_size, args.seed,
                                                 epochs=args.sae_epochs))
    sae, metrics = train_sae(cfg, batches, d_in=acts.shape[-1], out=folder, total_steps=steps,
                             on_log=lambda e: log.info("sae step %d/%d: fvu %.3f, l0 %.1f",
                                                       e["step"], steps, e["fvu"], e["l0"]))
    latents = sae.encode(held)
    res = {"config": dataclasses.asdict(cfg), "train_tokens": len(train),
           "epochs": args.sae_epochs, "steps": metrics["steps"],
           "collect_seconds": round(collect_s, 1), "train_seconds": metrics["seconds"],
           "dead_fraction_train": metrics["dead_fraction"],
           "dead_fraction_rule": metrics["dead_fraction_rule"],
           "dead_fraction_heldout": float((latents.amax(0) <= 0).float().mean()),
           "heldout": {**evaluate(sae, held),
                       **spliced(subject.model, args.hookpoint, sae, ids[-n_eval:])}}
    write_json(done, res)
    return res


# ---- explain and score both sides -----------------------------------------------------------

def alive_units(run: Path, hookpoint: str) -> tuple[list[int], int]:
    """Units whose largest recorded activation is above zero, and the number of units."""
    from safetensors import safe_open

    with safe_open(str(store_path(run, hookpoint)), framework="pt") as f:
        top, ctx = f.get_tensor("top_acts"), f.get_tensor("top_ctx")
    top = torch.where(ctx[..., None] >= 0, top, -torch.inf).amax(dim=(1, 2))
    return (top > 0).nonzero().squeeze(1).tolist(), len(top)


def side(args: argparse.Namespace, model: str, hookpoint: str, run: Path) -> dict[str, Any]:
    """Record, pick alive units, explain and score them; per-unit scores back."""
    rc = RecordConfig(model=model, hookpoints=hookpoint, corpus=args.corpus,
                      max_tokens=args.max_tokens, ctx_len=args.ctx_len, seed=args.seed)
    t0 = time.perf_counter()
    info = record(rc, run, resume=True)
    hp = info["hookpoints"][0]
    alive, n = alive_units(run, hp)
    units = sorted(random.Random(args.seed).sample(alive, min(args.units, len(alive))))
    llm = dict(explainer="highlight") if args.llm else {}
    ec = ExplainConfig(units=",".join(map(str, units)),
                       with_output_tokens=args.with_output_tokens, **llm)
    extra = dict(scorers="intervention") if args.intervention else {}
    sc = (ScoreConfig(simulator="openai", n_per_split=4, calibrate=False, sim_batch_tokens=1024,
                      **extra) if args.llm else ScoreConfig(**extra))
    explain(ec, run, resume=True)
    score(sc, run, resume=True)
    per_unit: dict[str, Any] = {}
    for u in units:
        path = score_path(run, hp, u, "scores")
        s = json.loads(path.read_text()) if path.exists() else {}
        iv = s.get("classification", {}).get("intervention", {})
        per_unit[str(u)] = {"explanation": s.get("explanation"),
                            **{k: v["ev_correlation_score"]
                               for k, v in s.get("scores", {}).items()},
                            **({"intervention": iv.get("auroc"),
                                "intervention_kl": max(iv["kl"].values())}
                               if "kl" in iv else {})}
    failed = sum(1 for v in per_unit.values() if v.get(METRIC) is None)
    return {"run": str(run), "hookpoint": hp, "n_units": n, "n_alive": len(alive),
            "n_unscored": failed,
            "dead_fraction": 1 - len(alive) / n, "units": per_unit,
            "seconds": round(time.perf_counter() - t0, 1),
            "explainer": ec.explainer, "simulator": sc.simulator}


def scores_of(s: dict[str, Any], metric: str = METRIC) -> np.ndarray:
    """Per-unit scores; an undefined score (a flat simulation) counts as 0. An intervention
    score that failed is left out (its reason is in the unit's scores file)."""
    if metric == "intervention":
        return np.array([u[metric] for u in s["units"].values() if u.get(metric) is not None],
                        dtype=np.float64)
    return np.array([u.get(metric) or 0.0 for u in s["units"].values()], dtype=np.float64)


def describe(a: np.ndarray) -> dict[str, float]:
    q = np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()),
            **{f"p{int(p * 100)}": float(v) for p, v in zip([0.1, 0.25, 0.5, 0.75, 0.9], q)}}


def compare(neurons: np.ndarray, features: np.ndarray, seed: int) -> dict[str, float]:
    """Difference of means (features - neurons): bootstrap 95% CI and Mann-Whitney U."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(seed)
    boot = [rng.choice(features, features.size).mean() - rng.choice(neurons, neurons.size).mean()
            for _ in range(10_000)]
    mw = mannwhitneyu(features, neurons, alternative="two-sided")
    return {"mean_difference": float(features.mean() - neurons.mean()),
            "bootstrap_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "mann_whitney_u": float(mw.statistic), "mann_whitney_p": float(mw.pvalue),
            "p_feature_beats_neuron": float(mw.statistic / (features.size * neurons.size))}


def plot(neurons: np.ndarray, features: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    bins = np.linspace(min(-0.2, neurons.min(), features.min()), 1.0, 31)
    for a, label, color in ((neurons, "neurons", "#4c72b0"), (features, "SAE features",
                                                              "#dd8452")):
        ax.hist(a, bins=bins, alpha=0.6, color=color, label=f"{label} (mean {a.mean():.3f})")
        ax.axvline(a.mean(), color=color, ls="--")
    ax.set_xlabel(f"explanation score (correlation, {METRIC.replace('_', ', ')})")
    ax.set_ylabel("units")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
    model = args.subject
    if args.subject == "toy":
        tc = ToyConfig(corpus=args.corpus, steps=args.toy_steps, seed=args.seed)
        folder = train_toy(tc, args.runs / f"toy-{key(dataclasses.asdict(tc))}", resume=True)
        model = str(folder)
        tlog = json.loads((folder / "train_log.json").read_text())
        out["toy"] = {k: v for k, v in tlog.items() if not isinstance(v, list)} | {
            "folder": model, "config": dataclasses.asdict(tc)}
    base = args.runs / args.name
    skey = key(model, {k: str(v) for k, v in vars(args).items() if k.startswith(
        ("hookpoint", "corpus", "architecture", "n_latents", "k", "l1", "resample", "sae",
         "eval", "ctx", "seed"))})
    sae_dir = base / f"sae-{skey}"
    out["sae"] = train_and_measure(args, model, sae_dir)
    rkey = key(skey, args.units, args.max_tokens, args.llm,
               *(["intervention"] if args.intervention else []),
               *(["output-tokens"] if args.with_output_tokens else []))
    sides = {"neurons": side(args, model, args.hookpoint, base / f"neurons-{rkey}"),
             "features": side(args, model, f"{args.hookpoint}:sae={sae_dir}",
                              base / f"features-{rkey}")}
    out["dead_fraction_recorded"] = sides["features"]["dead_fraction"]
    out.update(sides)
    out["distribution"], out["comparison"] = {}, {}
    for metric in (METRIC, "test_all", *(["intervention"] if args.intervention else [])):
        n, f = scores_of(sides["neurons"], metric), scores_of(sides["features"], metric)
        out["distribution"][metric] = {"neurons": describe(n), "features": describe(f)}
        out["comparison"][metric] = compare(n, f, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"replicate-{args.name}.json", out)
    n, f = scores_of(sides["neurons"]), scores_of(sides["features"])
    title = (f"{args.name}: {sides['neurons']['explainer']} explainer, "
             f"{sides['neurons']['simulator']} simulator, {args.architecture} SAE "
             f"{args.n_latents} latents")
    plot(n, f, title, args.out / f"replicate-{args.name}.png")
    print(report(out))
    return out


def report(out: dict[str, Any]) -> str:
    h = out["sae"]["heldout"]
    lines = [f"SAE: FVU {h['fvu']:.3f}  L0 {h['l0']:.1f}  CE loss recovered "
             f"{h['ce_loss_recovered']:.3f} (clean {h['ce_clean']:.3f}, SAE {h['ce_sae']:.3f}, "
             f"zero-ablated {h['ce_zero_ablate']:.3f})",
             f"dead latents: {out['dead_fraction_recorded']:.1%} never fired in the recorded "
             f"tokens, {out['sae']['dead_fraction_heldout']:.1%} on the held-out tokens",
             f"{'score':<10}{'side':<10}{'n':>5}{'mean':>8}{'p10':>8}{'median':>8}{'p90':>8}"]
    for metric, d in out["distribution"].items():
        for s, v in d.items():
            lines.append(f"{metric:<10}{s:<10}{v['n']:>5}{v['mean']:>8.3f}{v['p10']:>8.3f}"
                         f"{v['p50']:>8.3f}{v['p90']:>8.3f}")
        c = out["comparison"][metric]
        lo, hi = c["bootstrap_ci95"]
        lines.append(f"  features - neurons: {c['mean_difference']:+.3f} (95% CI {lo:+.3f} to "
                     f"{hi:+.3f}), Mann-Whitney p = {c['mann_whitney_p']:.2g}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
