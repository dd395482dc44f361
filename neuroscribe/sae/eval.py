"""The ``train-sae`` stage: activations in, an SAE out, with its metrics and plots.

Metrics (``metrics.json``): MSE, FVU and L0 on held-out activations, the dead fraction, and, with
the SAE spliced into the model at its hookpoint, the CE loss recovered
``(CE_zero_ablate - CE_sae) / (CE_zero_ablate - CE_clean)`` and the KL from the clean model.
The subject model runs on the training ``--device``.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from neuroscribe.errors import UserError
from neuroscribe.runs import write_json
from neuroscribe.sae.acts import (
    ActsConfig,
    model_chunks,
    read_store_info,
    shuffled,
    split_eval,
    store_batches,
    write_store,
)
from neuroscribe.sae.dist import Comm
from neuroscribe.sae.model import Sae
from neuroscribe.sae.train import TrainSaeConfig, evaluate, load_checkpoint, train_sae

log = logging.getLogger("neuroscribe")


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """1 = as good as the clean model, 0 = as bad as zeroing the hookpoint. NaN, with a logged
    warning, when zeroing the hookpoint does not change the CE (nothing to recover)."""
    den = ce_zero - ce_clean
    if den == 0:
        log.warning("CE loss recovered is undefined (NaN): the zero-ablated CE (%s) equals the "
                    "clean CE (%s), so zeroing the hookpoint costs nothing to recover",
                    ce_zero, ce_clean)
        return math.nan
    return (ce_zero - ce_sae) / den


@contextmanager
def splice(model: Any, hookpoint: str, replace_fn: Any) -> Any:
    """Replace a module's output (or, for ``PATH:input``, its input) by ``replace_fn(x)``."""
    path, _, opt = hookpoint.partition(":")
    module = dict(model.named_modules())[path]
    if opt == "input":
        def pre(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (replace_fn(args[0]), *args[1:])
        handle = module.register_forward_pre_hook(pre)
    else:
        def post(_m: Any, _args: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                return (replace_fn(out[0]), *out[1:])
            return replace_fn(out)
        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def spliced_metrics(model: Any, hookpoint: str, sae: Sae, ids: Any,
                    skip_first: bool = True) -> dict[str, float]:
    """CE of the clean, SAE-spliced and zero-ablated model on ``ids``, and KL(clean || other).
    With ``skip_first``, position 0 is left clean (the SAE never saw it). Runs on the model's
    device; the SAE's inputs are moved to the SAE's device (and back) if that differs."""
    import torch.nn.functional as F

    ids = ids.to(_device_of(model))

    def encode_decode(x: Any) -> Any:
        return sae(x.to(sae.device, torch.float32)).to(x.device, x.dtype)

    def run() -> Any:
        return model(input_ids=ids, use_cache=False).logits.float()

    def keep_first(x: Any, y: Any) -> Any:
        if skip_first:
            y = y.clone()
            y[:, :1] = x[:, :1]
        return y

    clean = run()
    with splice(model, hookpoint, lambda x: keep_first(x, encode_decode(x))):
        with_sae = run()
    with splice(model, hookpoint, lambda x: keep_first(x, torch.zeros_like(x))):
        zero = run()

    def ce(logits: Any) -> float:
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                     ids[:, 1:].reshape(-1)))

    def kl(logits: Any) -> float:
        p = clean.log_softmax(-1)
        return float((p.exp() * (p - logits.log_softmax(-1))).sum(-1).mean())

    out = {"ce_clean": ce(clean), "ce_sae": ce(with_sae), "ce_zero_ablate": ce(zero),
           "kl_sae": kl(with_sae), "kl_zero_ablate": kl(zero)}
    out["ce_loss_recovered"] = ce_loss_recovered(out["ce_clean"], out["ce_sae"],
                                                 out["ce_zero_ablate"])
    return out


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def _eval_ids(acts: ActsConfig, n_contexts: int, device: str = "cpu") -> tuple[Any, Any]:
    """The subject model on ``device`` and ``n_contexts`` contexts of token ids."""
    from neuroscribe.corpus import iter_contexts, iter_texts
    from neuroscribe.models import load_subject

    subject = load_subject(acts.model, device=device)
    ctx = []
    for c in iter_contexts(iter_texts(acts.corpus), subject.tokenizer, acts.ctx_len,
                           n_contexts * acts.ctx_len):
        ctx.append(c)
    return subject.model, torch.tensor(ctx)


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fvu", "l0", "dead_fraction", "auxk", "l1") if k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    steps = [h["step"] for h in history]
    for ax, k in zip(axes, keys):
        ax.plot(steps, [h.get(k, float("nan")) for h in history])
        ax.set_title(k)
        ax.set_xlabel("step")
        if k == "fvu":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _eval_set(out: Path, acts: ActsConfig, resume: bool, device: str = "cpu",
              writes: bool = True) -> tuple[Any, Any]:
    """Held-out activations and the training chunk stream (both from the model, run on
    ``device``, or a store). Without ``writes`` (ranks other than 0), the same stream, but
    nothing is written."""
    from safetensors.torch import load_file, save_file

    store = Path(acts.store) if acts.store else None
    if store is not None and (store / "store.json").exists():
        read_store_info(store)  # checks it is complete
        return load_file(str(store / "eval.safetensors"))["acts"], None
    held_path = out / "eval_acts.safetensors"
    if resume and held_path.exists():
        return load_file(str(held_path))["acts"], None
    held, rest = split_eval(model_chunks(acts, device=device), acts.eval_tokens)
    if not writes:
        return held, rest
    out.mkdir(parents=True, exist_ok=True)
    save_file({"acts": held.cpu().contiguous()}, str(held_path))
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        save_file({"acts": held.cpu().contiguous()}, str(store / "eval.safetensors"))
        rest = write_store(rest, store, config=acts)
    return held, rest


def train_sae_stage(acts: ActsConfig, cfg: TrainSaeConfig, out: Path,
                    resume: bool = False, comm: Comm | None = None) -> dict[str, Any]:
    """Train and evaluate; save cfg.json, sae.safetensors, metrics.json and metrics.png.

    Under torchrun (``comm``, by default the initialised group) this is data-parallel: a step's
    global batch is ``batch_size`` x ranks tokens, every rank reads the same global batches and
    trains on its rows of each, rank 0 alone writes files and runs the held-out and spliced
    evaluation (the metrics returned on other ranks have neither)."""
    comm = comm or Comm.current()
    batch = cfg.batch_size * comm.world  # the global batch
    if acts.max_tokens < batch:
        raise UserError(f"--max-tokens {acts.max_tokens} is less than one batch "
                        f"({batch})")
    if resume and not (out / "checkpoint.pt").exists():
        raise UserError(f"--resume: no checkpoint in {out}")
    if not resume and (out / "sae.safetensors").exists():
        raise UserError(f"{out} already holds an SAE; pass --resume or pick another --out")
    cfg = replace(cfg, hookpoint=cfg.hookpoint or acts.hookpoint)
    start = load_checkpoint(out)["state"]["step"] if resume else 0
    comm.barrier()  # every rank has looked for the store before rank 0 starts writing one
    held, rest = _eval_set(out, acts, resume, cfg.device, writes=comm.rank == 0)
    if acts.store and (Path(acts.store) / "store.json").exists() and rest is None:
        batches = store_batches(Path(acts.store), batch, cfg.seed, start_step=start)
    else:
        if rest is None:  # resuming a streamed run: skip the contexts already used (approx.)
            per_ctx = acts.ctx_len - int(acts.skip_first)
            skip = -(-acts.eval_tokens // per_ctx) + start * batch // per_ctx
            rest = model_chunks(acts, skip_contexts=skip, device=cfg.device)
        batches = shuffled(rest, batch, acts.shuffle_tokens, cfg.seed)
    total = acts.max_tokens // batch
    limited = (b for i, b in zip(range(total - start), batches))
    sae, metrics = train_sae(cfg, limited, d_in=held.shape[-1], out=out, resume=resume,
                             total_steps=total, comm=comm)
    if comm.rank == 0:
        for _ in batches:  # a store being written gets the rest of the stream, and its index
            pass
        _evaluate_and_write(acts, cfg, out, sae, held, metrics)
    comm.barrier()
    return metrics


def _evaluate_and_write(acts: ActsConfig, cfg: TrainSaeConfig, out: Path, sae: Sae, held: Any,
                        metrics: dict[str, Any]) -> None:
    """Held-out and spliced-in metrics, then metrics.json and metrics.png."""
    sae = sae.to(cfg.device)
    metrics["held_out"] = evaluate(sae, held)
    model, ids = _eval_ids(acts, n_contexts=16, device=cfg.device)
    metrics["spliced"] = spliced_metrics(model, acts.hookpoint, sae, ids, acts.skip_first)
    metrics["acts_config"] = asdict(acts)
    write_json(out / "metrics.json", metrics)
    if metrics["history"]:
        plot_history(metrics["history"], out / "metrics.png")
