"""Train an SAE on batches of activations: init as each paper does, Adam, unit-norm decoder rows,
dead-latent handling (AuxK or Anthropic's resampling), checkpoints, a NaN guard and metrics.

``train_sae(cfg, batches, d_in, out)`` takes any iterable of ``[batch, d_in]`` float tensors
(``acts.py`` streams them from a model or a cached store). Inputs are scaled by one constant so
that their mean squared norm is ``d_in``; the saved SAE has the scale folded back in, so it
reads raw activations.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuroscribe.errors import UserError
from neuroscribe.runs import atomic_path, opt, write_json
from neuroscribe.sae.dist import Comm, check_in_sync, stepper
from neuroscribe.sae.losses import STEPS
from neuroscribe.sae.model import Sae, SaeConfig, fvu, l0_of

log = logging.getLogger("neuroscribe")
JUMPRELU_INIT_THRESHOLD = 0.01  # SAELens' default on inputs of mean squared norm d_in


@dataclass
class TrainSaeConfig(SaeConfig):
    """How to train it."""

    lr: float = opt(0.0, "Adam learning rate; 0 = 2e-4 / sqrt(n_latents / 16384), as sparsify")
    batch_size: int = opt(4096, "tokens per step (per process under torchrun)")
    l1_coeff: float = opt(1.0, "relu: L1 penalty on latents (x sqrt(d_in) scaled inputs)")
    l0_coeff: float = opt(0.01, "jumprelu: L0 penalty")
    jumprelu_bandwidth: float = opt(0.05, "jumprelu: straight-through kernel width "
                                    "(SAELens' default)")
    auxk_alpha: float = opt(1 / 32, "topk, batchtopk: AuxK loss weight (0 = off)")
    dead_tokens: int = opt(1_000_000, "a latent silent for this many tokens is dead")
    resample_every: int = opt(0, "relu: resample dead latents every N steps (0 = never)")
    threshold_momentum: float = opt(0.99, "batchtopk: running mean of the inference threshold")
    checkpoint_every: int = opt(500, "steps between checkpoints (when saving)")
    log_every: int = opt(50, "steps between metric log entries")
    seed: int = opt(0, "seed of the initialisation")
    device: str = opt("cpu", "torch device (under torchrun, cuda means cuda:LOCAL_RANK)")
    dtype: str = opt("float32", "precision of the big matmuls; bfloat16 keeps fp32 master "
                     "weights and Adam state", choices=("float32", "bfloat16"))


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    scale: float = 1.0
    since_fired: Any = None  # [n] tokens since each latent last fired
    window_fired: Any = None  # [n] fired since the last resampling
    gen_state: Any = None  # the resampling generator
    history: list[dict[str, float]] = field(default_factory=list)


# ---- initialisation -----------------------------------------------------------------------

def geometric_median(x: Any, iters: int = 50, tol: float = 1e-5) -> Any:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to x's rows."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


ENC_INIT_SCALE = {"topk": 3 ** -0.5, "batchtopk": 3 ** -0.5}


def _unit_rows(n: int, d: int, gen: Any) -> Any:
    w = torch.nn.init.kaiming_uniform_(torch.empty(n, d), a=math.sqrt(5), generator=gen)
    return w / w.norm(dim=1, keepdim=True)


def init_sae(sae: Sae, x: Any, seed: int) -> None:
    """Initialise from the first (scaled) batch.

    - relu (Towards Monosemanticity): b_dec = geometric median of the data, W_dec Kaiming
      uniform with unit rows, W_enc = W_dec.T, b_enc = 0;
    - topk, batchtopk (Gao et al.): the same, W_enc = W_dec.T / sqrt(3) at init (the row norm
      of torch's default Linear init, which sparsify keeps; at 200 steps of bench/sae.py this
      gave held-out FVU 0.354 against 0.361 with W_enc = W_dec.T, and 0.354 at a scale of 0.3);
    - jumprelu (Rajamanoharan et al.): b_dec = 0 ... geometric median is harmless too; thresholds
      start at 0.001.
    """
    gen = torch.Generator().manual_seed(seed)
    n, d = sae.cfg.n_latents, sae.cfg.d_in
    with torch.no_grad():
        sae.W_dec.copy_(_unit_rows(n, d, gen))
        sae.W_enc.copy_(sae.W_dec.T * ENC_INIT_SCALE.get(sae.cfg.architecture, 1.0))
        sae.b_enc.zero_()
        sae.b_dec.copy_(geometric_median(x.cpu()) if sae.cfg.architecture != "jumprelu" else 0)
        sae.log_threshold.fill_(math.log(JUMPRELU_INIT_THRESHOLD))


# ---- checkpoints ----------------------------------------------------------------------------

CKPT = "checkpoint.pt"


def save_checkpoint(out: Path, sae: Sae, optim: Any, state: _State, cfg: TrainSaeConfig) -> None:
    """torch.save of weights + Adam + counters, with its sha256 next to it."""
    import io

    buf = io.BytesIO()
    torch.save({"sae": sae.state_dict(), "optim": optim.state_dict(), "cfg": asdict(cfg),
                "state": vars(state)}, buf)
    data = buf.getvalue()
    with atomic_path(out / CKPT) as tmp:
        tmp.write_bytes(data)
    (out / f"{CKPT}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


def load_checkpoint(out: Path) -> dict[str, Any]:
    path, digest_path = out / CKPT, out / f"{CKPT}.sha256"
    if not path.exists():
        raise UserError(f"--resume: no checkpoint in {out}")
    data = path.read_bytes()
    want = digest_path.read_text().strip() if digest_path.exists() else ""
    if hashlib.sha256(data).hexdigest() != want:
        raise UserError(f"{path} is corrupted (its sha256 does not match {digest_path.name}); "
                        "not loading it. Delete the folder to start over.")
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


# ---- the loop -------------------------------------------------------------------------------

def _optimizer(sae: Sae, cfg: TrainSaeConfig) -> Any:
    lr = cfg.lr or 2e-4 / math.sqrt(cfg.n_latents / 2**14)
    return torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=lr,
                            betas=(0.9, 0.999), eps=1e-8, fused=True)


@torch.no_grad()
def resample_dead(sae: Sae, optim: Any, x: Any, x_hat: Any, dead: Any, gen: Any) -> int:
    """Anthropic's resampling: dead latents get inputs the SAE reconstructs worst (chosen with
    probability proportional to loss squared) as decoder rows; encoder columns get the same
    direction at 0.2 x the mean alive encoder norm; their biases and Adam moments are reset."""
    idx = dead.nonzero().squeeze(1)
    if len(idx) == 0:
        return 0
    loss = (x - x_hat).pow(2).sum(1)
    pick = torch.multinomial(loss.pow(2).cpu() + 1e-12, len(idx), replacement=True,
                             generator=gen).to(x.device)
    v = x[pick] - sae.b_dec
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else 1.0
    sae.W_dec[idx] = v
    sae.W_enc[:, idx] = (v * 0.2 * alive_norm).T
    sae.b_enc[idx] = 0
    for p, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        for buf in optim.state.get(p, {}).values():
            if torch.is_tensor(buf) and buf.dim() > 0:
                buf[sl] = 0
    return len(idx)


def _fold_scale(sae: Sae, scale: float) -> Sae:
    """A copy that reads raw activations: latents and thresholds divided by the input scale."""
    raw = Sae(SaeConfig(**{k: getattr(sae.cfg, k) for k in SaeConfig.__dataclass_fields__}))
    raw.load_state_dict(sae.state_dict())
    with torch.no_grad():
        raw.b_enc /= scale
        raw.b_dec /= scale
        raw.log_threshold -= math.log(scale)
        raw.threshold /= scale
    return raw.eval()


def _log_entry(state: _State, res: Any, cfg: TrainSaeConfig, comm: Comm) -> dict[str, Any]:
    """The step's metrics; under DDP each is the mean over ranks (the global batch's)."""
    names = ["loss", "l0", *res.parts]
    values = comm.mean_floats([float(res.loss.detach()), res.l0, *res.parts.values()],
                              cfg.device)
    dead = float((state.since_fired >= cfg.dead_tokens).float().mean())
    mean = dict(zip(names, values))
    return {"step": state.step, "tokens": state.tokens, "loss": mean.pop("loss"),
            "l0": mean.pop("l0"), "dead_fraction": dead, **mean}


def train_sae(cfg: TrainSaeConfig, batches: Iterable[Any], d_in: int = 0,
              out: Path | None = None, resume: bool = False, total_steps: int | None = None,
              on_log: Any = None, comm: Comm | None = None) -> tuple[Sae, dict[str, Any]]:
    """Train on ``batches``; with ``out``, save checkpoints and the final ``cfg.json`` +
    ``sae.safetensors`` + ``metrics.json``. Returns the SAE (reading raw activations) and the
    metrics. On resume, ``batches`` must start where the checkpoint stopped.

    Under a torch.distributed group (``comm``, by default the initialised one), every rank
    passes the same global batches and trains on its share of each (``dist.py``); rank 0
    writes the files, all ranks read the checkpoint on resume."""
    from tqdm import tqdm

    comm = comm or Comm.current()

    cfg.d_in = cfg.d_in or d_in
    sae_cfg = SaeConfig(**{k: getattr(cfg, k) for k in SaeConfig.__dataclass_fields__})
    sae_cfg.check()
    if cfg.architecture not in STEPS:
        raise UserError(f"architecture {cfg.architecture!r} can be loaded but not trained here: "
                        f"train one of {', '.join(STEPS)}")
    torch.manual_seed(cfg.seed)
    sae = Sae(sae_cfg, cfg.device)
    optim = _optimizer(sae, cfg)
    state = _State()
    if resume:
        if out is None:
            raise UserError("--resume needs an output folder")
        ck = load_checkpoint(out)
        sae.load_state_dict(ck["sae"])
        optim.load_state_dict(ck["optim"])
        state = _State(**ck["state"])
    step = stepper(sae, STEPS[cfg.architecture], cfg, comm)
    writes = out is not None and comm.rank == 0
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    t0, last_good = time.perf_counter(), state.step
    bar = tqdm(total=total_steps, initial=state.step, unit="step", desc=f"sae {cfg.architecture}",
               disable=None if comm.rank == 0 else True)
    if state.gen_state is not None:
        gen.set_state(state.gen_state)
    for batch in batches:
        xg = batch.to(cfg.device, torch.float32)  # the global batch (all ranks')
        if xg.shape[-1] != cfg.d_in:
            raise UserError(f"activations have width {xg.shape[-1]}, the SAE expects d_in="
                            f"{cfg.d_in}")
        if state.step == 0 and not resume:
            state.scale = float(math.sqrt(cfg.d_in / xg.pow(2).sum(1).mean().clamp_min(1e-12)))
            init_sae(sae, xg * state.scale, cfg.seed)
            state.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=cfg.device)
            state.window_fired = torch.zeros(cfg.n_latents, dtype=torch.bool, device=cfg.device)
        xg = xg * state.scale
        x = comm.shard(xg)
        run = {"step": state.step, "dead": state.since_fired >= cfg.dead_tokens}
        if comm.active:
            run["comm"] = comm
            run["total_var"] = (xg - xg.mean(0)).pow(2).sum().clamp_min(1e-12) / comm.world
        res = step(x, run)
        fired, bad = comm.fired_and_bad(res.fired, res.loss)
        if bad:
            bar.close()
            where = f"; the last good checkpoint (step {last_good}) is in {out}" if out else ""
            raise UserError(f"loss is {float(res.loss.detach())} at step {state.step}: training "
                            f"stopped{where}. Lower --lr or check the activations.")
        optim.zero_grad(set_to_none=True)
        res.loss.backward()
        sae.remove_parallel_grads()
        optim.step()
        sae.normalize_decoder()
        state.since_fired += xg.shape[0]
        state.since_fired[fired] = 0
        state.window_fired |= fired
        state.step += 1
        state.tokens += xg.shape[0]
        if cfg.resample_every and state.step % cfg.resample_every == 0:
            x_hat = comm.gather(res.x_hat)  # the global batch's, so every rank picks alike
            n = resample_dead(sae, optim, xg, x_hat, ~state.window_fired, gen)
            log.info("step %d: resampled %d dead latents", state.step, n)
            state.window_fired.zero_()
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == 1:
            entry = _log_entry(state, res, cfg, comm)
            state.history.append(entry)
            bar.set_postfix(fvu=f"{entry['fvu']:.3f}", l0=f"{entry['l0']:.1f}")
            if on_log:
                on_log(entry)
        if state.step % cfg.checkpoint_every == 0:
            check_in_sync(sae, optim, comm)
            if writes:
                state.gen_state = gen.get_state()
                save_checkpoint(out, sae, optim, state, cfg)
            last_good = state.step
    bar.close()
    if state.step == 0:
        raise UserError("no activations to train on (the source gave no batches)")
    seconds = time.perf_counter() - t0
    raw = _fold_scale(sae, state.scale)
    metrics = {"steps": state.step, "tokens": state.tokens, "seconds": round(seconds, 2),
               "input_scale": state.scale, "history": state.history,
               "dead_fraction": float((state.since_fired >= cfg.dead_tokens).float().mean()),
               "dead_fraction_rule": f"no activation in the last {cfg.dead_tokens} tokens"}
    check_in_sync(sae, optim, comm)
    if writes:
        state.gen_state = gen.get_state()
        save_checkpoint(out, sae, optim, state, cfg)
        raw.save(out, train=asdict(cfg))
        write_json(out / "metrics.json", metrics)
    return raw, metrics


@torch.no_grad()
def evaluate(sae: Sae, x: Any) -> dict[str, float]:
    """MSE, FVU and L0 of a (raw-input) SAE on held-out activations ``[N, d_in]`` (moved to the
    SAE's device)."""
    x = x.to(sae.device, torch.float32)
    latents = sae.encode(x)
    x_hat = sae.decode(latents)
    return {"mse": float((x - x_hat).pow(2).mean()), "fvu": fvu(x, x_hat),
            "l0": l0_of(latents), "n_tokens": int(x.shape[0])}
