"""Training forward passes of the four SAE architectures, each returning the same ``Step``.

The k-sparse rules (topk, batchtopk, and the AuxK term) never form a dense ``[batch, n_latents]``
gradient: the encoder's pre-activations are computed once without autograd, the chosen entries
are picked, and ``_Picked`` gives their gradients to ``W_enc``, ``b_enc`` and ``b_dec`` with a
sparse matmul; the decoder is an ``embedding_bag``. Both cost O(batch x k x d_in), not
O(batch x n_latents x d_in), so a step is one dense matmul (the forward encoder) plus small work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from neuroscribe.sae.model import Sae


@dataclass
class Step:
    """What one training forward pass gives back."""

    loss: Any  # scalar tensor to backpropagate
    x_hat: Any  # [B, d_in], detached
    fired: Any  # [n_latents] bool: latents active on some token of the batch
    l0: float  # mean active latents per token
    parts: dict[str, float]  # named loss terms, for the log


class _Picked(torch.autograd.Function):
    """Pre-activations at (rows, cols), taken from a precomputed ``pre``; sparse backward."""

    @staticmethod
    def forward(ctx: Any, pre: Any, x: Any, W_enc: Any, b_enc: Any, b_dec: Any, rows: Any,
                cols: Any) -> Any:
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        ctx.n_latents = W_enc.shape[1]
        return pre[rows, cols].to(x.dtype)  # fp32 values even from a bf16 ``pre``

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        n, B = ctx.n_latents, x.shape[0]
        G = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (n, B), check_invariants=False)
        grad_W_enc = torch.sparse.mm(G, x - b_dec).T  # [d_in, n]
        grad_b_enc = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None, None


def matmul_dtype(cfg: Any) -> Any:
    """The dtype of the big matmuls: ``cfg.dtype`` (fp32 master weights either way)."""
    return getattr(torch, getattr(cfg, "dtype", "float32"))


def _addmm(bias: Any, a: Any, w: Any, dtype: Any) -> Any:
    """``bias + a @ w``, computed in ``dtype`` from fp32 tensors (autograd casts back)."""
    if dtype == torch.float32:
        return torch.addmm(bias, a, w)
    return torch.addmm(bias.to(dtype), a.to(dtype), w.to(dtype)).float()


def _pre(sae: Sae, x: Any, cfg: Any) -> Any:
    """Encoder pre-activations without autograd; in bf16 (kept bf16, top-k chosen there) when
    ``cfg.dtype`` says so."""
    dtype = matmul_dtype(cfg)
    with torch.no_grad():
        if dtype == torch.float32:
            return torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
        return torch.addmm(sae.b_enc.to(dtype), (x - sae.b_dec).to(dtype), sae.W_enc.to(dtype))


def _pick(sae: Sae, pre: Any, x: Any, rows: Any, cols: Any) -> Any:
    return _Picked.apply(pre, x, sae.W_enc, sae.b_enc, sae.b_dec, rows, cols)


def _recon_loss(x: Any, x_hat: Any, total_var: Any) -> Any:
    return (x_hat - x).pow(2).sum() / total_var


def _total_var(x: Any, state: dict[str, Any]) -> Any:
    """The loss denominator: the batch's summed variance. Under DDP the training loop gives it,
    from the global batch and divided by the number of ranks, so that the ranks' averaged
    gradients are the global batch's."""
    if state.get("total_var") is not None:
        return state["total_var"]
    return (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def _auxk(sae: Sae, pre: Any, x: Any, residual: Any, dead: Any, total_var: Any) -> Any:
    """AuxK (Gao et al. 2024, appendix B.1): the top k_aux dead latents reconstruct what the
    live ones missed, ``scale * |e_hat - residual|^2 / total_var`` with ``e_hat = z_aux W_dec``
    (no b_dec: the residual already has it; sparsify PR #134). ``k_aux = d_in // 2``; with
    fewer dead latents than that, all of them are used and the loss is scaled down by
    ``n_dead / k_aux`` (sparsify's order: the scale is taken before k_aux is clamped)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    k_aux = max(sae.cfg.d_in // 2, 1)
    scale = min(n_dead / k_aux, 1.0)
    k_aux = min(k_aux, n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))
    _, idx = masked.topk(k_aux, dim=1, sorted=False)
    B = x.shape[0]
    rows = torch.arange(B, device=x.device).repeat_interleave(k_aux)
    vals = _pick(sae, pre, x, rows, idx.reshape(-1)).relu().reshape(B, k_aux)
    e_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum")
    return scale * (e_hat - residual).pow(2).sum() / total_var


def step_topk(sae: Sae, x: Any, state: dict[str, Any], cfg: Any) -> Step:
    pre = _pre(sae, x, cfg)
    B, k = x.shape[0], sae.cfg.k
    _, idx = pre.topk(k, dim=1, sorted=False)
    rows = torch.arange(B, device=x.device).repeat_interleave(k)
    vals = _pick(sae, pre, x, rows, idx.reshape(-1)).relu().reshape(B, k)
    x_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec
    return _with_aux(sae, pre, x, x_hat, idx.reshape(-1)[vals.reshape(-1) > 0], state, cfg,
                     l0=float((vals > 0).sum()) / B)


def _global_topk(pre: Any, k: int, comm: Any) -> tuple[Any, Any]:
    """The entries of this rank's ``pre`` among the ``k * world`` largest over all ranks: each
    rank's own top ``k * world`` values are gathered and the cutoff is the smallest winner."""
    kg = min(k * comm.world, pre.numel())
    top, flat = pre.reshape(-1).topk(kg, sorted=False)
    cutoff = comm.gather(top).topk(kg, sorted=False).values.min()
    keep = top >= cutoff
    return top[keep], flat[keep]


def step_batchtopk(sae: Sae, x: Any, state: dict[str, Any], cfg: Any) -> Step:
    pre = _pre(sae, x, cfg)
    B, n = pre.shape
    comm = state.get("comm")
    if comm is not None and comm.active:  # the top k x global batch over all ranks
        top, flat = _global_topk(pre, B * sae.cfg.k, comm)
    else:
        top, flat = pre.reshape(-1).topk(B * sae.cfg.k, sorted=False)
    flat = flat[top > 0].sort().values  # row-major order: bags of rows for embedding_bag
    rows, cols = flat // n, flat % n
    vals = _pick(sae, pre, x, rows, cols)
    offsets = torch.zeros(B, dtype=torch.long, device=x.device)
    offsets[1:] = torch.bincount(rows, minlength=B)[:-1].cumsum(0)
    x_hat = F.embedding_bag(cols, sae.W_dec, offsets, per_sample_weights=vals,
                            mode="sum") + sae.b_dec
    with torch.no_grad():  # the inference threshold: a running mean of the smallest kept value
        low = vals.min() if len(vals) else sae.threshold
        if comm is not None and comm.active:
            low = comm.all_reduce(vals.min() if len(vals) else torch.tensor(
                float("inf"), device=x.device), "min")
            low = sae.threshold if torch.isinf(low) else low
        m = cfg.threshold_momentum
        sae.threshold.copy_(low if state["step"] == 0 else m * sae.threshold + (1 - m) * low)
    return _with_aux(sae, pre, x, x_hat, cols, state, cfg, l0=len(vals) / B)


def _with_aux(sae: Sae, pre: Any, x: Any, x_hat: Any, active: Any, state: dict[str, Any],
              cfg: Any, l0: float) -> Step:
    total_var = _total_var(x, state)
    recon = _recon_loss(x, x_hat, total_var)
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=x.device)
    fired[active] = True
    loss, parts = recon, {"fvu": float(recon.detach())}
    if cfg.auxk_alpha > 0:
        aux = _auxk(sae, pre, x, (x - x_hat).detach(), state["dead"], total_var)
        if aux is not None:
            loss = loss + cfg.auxk_alpha * aux
            parts["auxk"] = float(aux.detach())
    return Step(loss, x_hat.detach(), fired, l0, parts)


def step_relu(sae: Sae, x: Any, state: dict[str, Any], cfg: Any) -> Step:
    """ReLU with an L1 penalty on the latents (decoder rows are unit norm, so plain L1)."""
    dtype = matmul_dtype(cfg)
    latents = _addmm(sae.b_enc, x - sae.b_dec, sae.W_enc, dtype).relu()
    x_hat = _addmm(sae.b_dec, latents, sae.W_dec, dtype)
    total_var = _total_var(x, state)
    recon = _recon_loss(x, x_hat, total_var)
    l1 = latents.sum(1).mean() / sae.cfg.d_in ** 0.5
    loss = recon + cfg.l1_coeff * l1
    active = latents > 0
    return Step(loss, x_hat.detach(), active.any(0), float(active.sum()) / x.shape[0],
                {"fvu": float(recon.detach()), "l1": float(l1.detach())})


class _JumpReLU(torch.autograd.Function):
    """z * H(z - t); d/dt by a rectangle-kernel straight-through estimator (bandwidth eps)."""

    @staticmethod
    def forward(ctx: Any, z: Any, t: Any, eps: float) -> Any:
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return z * (z > t)

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        z, t = ctx.saved_tensors
        near = ((z - t).abs() < ctx.eps / 2).to(g.dtype)
        return g * (z > t), -(t / ctx.eps) * (g * near).sum(0), None


class _Step(torch.autograd.Function):
    """H(z - t); d/dt = -(1/eps) K((z - t)/eps), no gradient to z."""

    @staticmethod
    def forward(ctx: Any, z: Any, t: Any, eps: float) -> Any:
        ctx.save_for_backward(z, t)
        ctx.eps = eps
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        z, t = ctx.saved_tensors
        near = ((z - t).abs() < ctx.eps / 2).to(g.dtype)
        return None, -(1 / ctx.eps) * (g * near).sum(0), None


def step_jumprelu(sae: Sae, x: Any, state: dict[str, Any], cfg: Any) -> Step:
    dtype = matmul_dtype(cfg)
    pre = _addmm(sae.b_enc, x - sae.b_dec, sae.W_enc, dtype)
    t = sae.log_threshold.exp()
    latents = _JumpReLU.apply(pre, t, cfg.jumprelu_bandwidth)
    x_hat = _addmm(sae.b_dec, latents, sae.W_dec, dtype)
    total_var = _total_var(x, state)
    recon = _recon_loss(x, x_hat, total_var)
    l0 = _Step.apply(pre, t, cfg.jumprelu_bandwidth).sum(1).mean()
    loss = recon + cfg.l0_coeff * l0
    active = latents.detach() != 0
    return Step(loss, x_hat.detach(), active.any(0), float(l0.detach()),
                {"fvu": float(recon.detach()), "l0_penalty": float(l0.detach())})


STEPS = {"relu": step_relu, "topk": step_topk, "batchtopk": step_batchtopk,
         "jumprelu": step_jumprelu}
