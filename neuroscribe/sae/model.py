"""Sparse autoencoders: one model, four trained activation rules (and sparsify's GroupMax, which
loads), saved as cfg.json + sae.safetensors.

``latents = act(W_enc.T (x - b_dec) + b_enc)``, ``x_hat = latents @ W_dec + b_dec``, with
``W_enc [d_in, n_latents]`` and ``W_dec [n_latents, d_in]`` (SAELens' layout) and the rows of
``W_dec`` kept at unit norm. The rule ``act`` is the architecture:

- ``relu``: ReLU, trained with an L1 penalty (Anthropic, "Towards Monosemanticity");
- ``topk``: the k largest pre-activations per token, with the AuxK loss (Gao et al. 2024);
- ``batchtopk``: the k x batch largest over the whole batch; a global threshold at inference
  (Bussmann et al. 2024);
- ``jumprelu``: ``z * (z > threshold)`` with a learned threshold per latent and an L0 penalty
  through straight-through estimators (Rajamanoharan et al. 2024);
- ``groupmax`` (loaded, not trained here): EleutherAI sparsify's GroupMax, the latents split
  into k contiguous groups of ``n_latents / k`` and each group keeping its largest ReLU'd
  pre-activation.

SAEs saved by SAELens (``sae_weights.safetensors``) and by EleutherAI sparsify
(``sae.safetensors`` with ``encoder.weight``) load too: see ``load_sae``. An activation rule
this module does not know is an error, never a silent default.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroscribe.errors import UserError
from neuroscribe.runs import atomic_path, opt, write_json

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")  # the ones train_sae trains
LOAD_ONLY = ("groupmax",)  # encoded exactly, but not trained here
KNOWN = ARCHITECTURES + LOAD_ONLY
FORMAT = "neuroscribe-sae-1"


@dataclass
class SaeConfig:
    """The shape of an SAE (saved as its cfg.json)."""

    d_in: int = opt(0, "input width (the hookpoint's units); 0 = take it from the data")
    n_latents: int = opt(4096, "dictionary size (latents)")
    architecture: str = opt("topk", "activation rule", choices=ARCHITECTURES)
    k: int = opt(32, "active latents per token (topk, batchtopk; groups for groupmax)")
    hookpoint: str = opt("", "module path the SAE reads (recorded in cfg.json)")

    def check(self) -> None:
        if self.architecture not in KNOWN:
            raise UserError(f"architecture {self.architecture!r} unknown: use one of "
                            f"{', '.join(KNOWN)}")
        if self.d_in < 1 or self.n_latents < 1:
            raise UserError(f"d_in ({self.d_in}) and n_latents ({self.n_latents}) must be >= 1")
        if (self.architecture in ("topk", "batchtopk", "groupmax")
                and not 1 <= self.k <= self.n_latents):
            raise UserError(f"k = {self.k} must be between 1 and n_latents = {self.n_latents}")
        if self.architecture == "groupmax" and self.n_latents % self.k:
            raise UserError(f"groupmax needs n_latents ({self.n_latents}) divisible by its "
                            f"k = {self.k} groups")


class Sae(nn.Module):
    """Parameters and inference; training losses live in ``sae_train``."""

    def __init__(self, cfg: SaeConfig, device: str = "cpu") -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        d, n = cfg.d_in, cfg.n_latents
        self.W_enc = nn.Parameter(torch.zeros(d, n, device=device))
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.W_dec = nn.Parameter(torch.zeros(n, d, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        # jumprelu learns log(threshold); batchtopk estimates it (a buffer, no gradient)
        self.log_threshold = nn.Parameter(torch.zeros(n, device=device),
                                          requires_grad=cfg.architecture == "jumprelu")
        self.register_buffer("threshold", torch.zeros((), device=device))

    @property
    def device(self) -> Any:
        return self.W_enc.device

    def pre_acts(self, x: Any) -> Any:
        return torch.addmm(self.b_enc, (x - self.b_dec).reshape(-1, self.cfg.d_in),
                           self.W_enc).reshape(*x.shape[:-1], -1)

    def encode(self, x: Any) -> Any:
        """Dense latents ``[..., n_latents]`` for inputs ``[..., d_in]`` (inference rules)."""
        if x.shape[-1] != self.cfg.d_in:
            raise UserError(f"SAE expects d_in={self.cfg.d_in}, got inputs of width "
                            f"{x.shape[-1]}")
        return INFERENCE[self.cfg.architecture](self, self.pre_acts(x))

    def decode(self, latents: Any) -> Any:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: Any) -> Any:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each decoder row's gradient along the row (unit-norm rows)."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(1, keepdim=True) * w

    def tensors(self) -> dict[str, Any]:
        """The saved tensors: SAELens' names; ``threshold`` for jumprelu and batchtopk."""
        out = {k: getattr(self, k).detach().contiguous()
               for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if self.cfg.architecture == "jumprelu":
            out["threshold"] = self.log_threshold.detach().exp().contiguous()
        if self.cfg.architecture == "batchtopk":
            out["threshold"] = self.threshold.detach().expand(self.cfg.n_latents).clone()
        return out

    def save(self, folder: str | Path, **extra: Any) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.cpu() for k, v in self.tensors().items()}
        with atomic_path(folder / "sae.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        write_json(folder / "cfg.json", {**asdict(self.cfg), "format": FORMAT, **extra})
        return folder

    def load_tensors(self, t: dict[str, Any]) -> None:
        with torch.no_grad():
            for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(self, k).copy_(t[k])
            if "threshold" in t and self.cfg.architecture == "jumprelu":
                self.log_threshold.copy_(t["threshold"].clamp_min(1e-12).log())
            if "threshold" in t and self.cfg.architecture == "batchtopk":
                self.threshold.copy_(t["threshold"].reshape(-1)[0])



def _relu(sae: Any, pre: Any) -> Any:
    return pre.relu()


def _topk(sae: Any, pre: Any) -> Any:
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


def _threshold(sae: Any, pre: Any) -> Any:  # batchtopk at inference: one global threshold
    return pre * (pre > sae.threshold.clamp_min(0))


def _jumprelu(sae: Any, pre: Any) -> Any:
    return pre * (pre > sae.log_threshold.exp())


def _groupmax(sae: Any, pre: Any) -> Any:
    """sparsify's GroupMax: ``relu(pre)`` viewed as k contiguous groups of n_latents / k
    latents; each group keeps its maximum (the first one on ties, as ``torch.max``)."""
    groups = pre.relu().unflatten(-1, (sae.cfg.k, -1))
    vals, idx = groups.max(-1, keepdim=True)
    return torch.zeros_like(groups).scatter_(-1, idx, vals).flatten(-2)


INFERENCE = {"relu": _relu, "topk": _topk, "batchtopk": _threshold, "jumprelu": _jumprelu,
             "groupmax": _groupmax}



# ---- loading: ours, SAELens and sparsify, from their files ----------------------------------

def _load_ours(folder: Path, cfg: dict[str, Any]) -> tuple[SaeConfig, dict[str, Any]]:
    from safetensors.torch import load_file

    names = {f.name for f in fields(SaeConfig)}
    return (SaeConfig(**{k: v for k, v in cfg.items() if k in names}),
            load_file(str(folder / "sae.safetensors")))


SPARSIFY_ACTIVATIONS = ("topk", "groupmax")  # sparsify's SparseCoderConfig.activation


def _load_sparsify(folder: Path, cfg: dict[str, Any]) -> tuple[SaeConfig, dict[str, Any]]:
    """sparsify: ``encoder.weight [n, d]``, ``encoder.bias``, ``W_dec [n, d]``, ``b_dec``;
    it encodes ``relu(encoder(x - b_dec))`` and keeps the top k (``activation: topk``) or the
    maximum of each of k groups (``groupmax``). Files saved before sparsify had GroupMax carry
    no ``activation``: its default, topk."""
    from safetensors.torch import load_file

    activation = cfg.get("activation", "topk")
    if activation not in SPARSIFY_ACTIVATIONS:
        raise UserError(f"{folder}: sparsify activation {activation!r} is unknown (sparsify "
                        f"defines {' and '.join(SPARSIFY_ACTIVATIONS)}); not loading an SAE "
                        "whose latents would be wrong")
    t = load_file(str(folder / "sae.safetensors"))
    if cfg.get("skip_connection") or cfg.get("transcode") or "W_skip" in t:
        raise UserError(f"{folder}: sparsify transcoders and skip connections are not "
                        "supported (only SAEs)")
    n, d = t["encoder.weight"].shape
    sc = SaeConfig(d_in=int(cfg.get("d_in", d)), n_latents=n, architecture=activation,
                   k=int(cfg["k"]))
    return sc, {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
                "b_dec": t["b_dec"]}


_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def _load_saelens(folder: Path, cfg: dict[str, Any]) -> tuple[SaeConfig, dict[str, Any]]:
    """SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` (+
    ``threshold`` for jumprelu), with ``apply_b_dec_to_input`` saying whether x - b_dec is
    encoded."""
    from safetensors.torch import load_file

    t = load_file(str(folder / "sae_weights.safetensors"))
    arch_name = cfg.get("architecture", "standard")
    if arch_name not in _SAELENS_ARCH:
        raise UserError(f"{folder}: SAELens architecture {arch_name!r} is not supported "
                        f"(have {', '.join(_SAELENS_ARCH)})")
    if cfg.get("normalize_activations") not in (None, "none"):
        raise UserError(f"{folder}: SAELens normalize_activations="
                        f"{cfg['normalize_activations']!r} is not supported")
    k = int(cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k") or 1)
    sc = SaeConfig(d_in=int(cfg["d_in"]), n_latents=int(cfg["d_sae"]),
                   architecture=_SAELENS_ARCH[arch_name], k=k,
                   hookpoint=str(cfg.get("hook_name", "")))
    out = {k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if not cfg.get("apply_b_dec_to_input", True):
        # encode(x) = W_enc.T x + b_enc  ==  W_enc.T (x - b_dec) + (b_enc + W_enc.T b_dec)
        out["b_enc"] = out["b_enc"] + out["b_dec"] @ out["W_enc"]
    if "threshold" in t:
        out["threshold"] = t["threshold"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens scales pre-activations by |W_dec rows| and divides them out to decode: the
        # same SAE with the norms folded into the encoder and unit decoder rows.
        norm = out["W_dec"].norm(dim=1)
        out.update(W_enc=out["W_enc"] * norm, b_enc=out["b_enc"] * norm,
                   W_dec=out["W_dec"] / norm[:, None])
    return sc, out


def _read_cfg(folder: Path) -> dict[str, Any]:
    path = folder / "cfg.json"
    if not path.exists():
        raise UserError(f"{folder} has no cfg.json: not an SAE folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e


def _resolve(path: str | Path) -> Path:
    """A local folder, or ``hf://OWNER/REPO[/SUBFOLDER]`` fetched from the Hugging Face hub."""
    spec = str(path)
    if not spec.startswith("hf://"):
        return Path(spec).expanduser()
    from huggingface_hub import snapshot_download

    owner, repo, *rest = spec[5:].split("/")
    repo_id, sub = f"{owner}/{repo}", "/".join(rest)
    try:
        root = snapshot_download(repo_id, allow_patterns=[f"{sub}/*" if sub else "*"])
    except Exception as e:  # offline, unknown repo
        raise UserError(f"could not download SAE {spec}: {e}") from e
    return Path(root) / sub


def load_sae(path: str | Path, device: str = "cpu") -> Sae:
    """Load an SAE folder saved by neuroscribe, SAELens or sparsify (told apart by its files)."""
    folder = _resolve(path)
    if not folder.is_dir():
        raise UserError(f"SAE folder not found: {folder}")
    cfg = _read_cfg(folder)
    if (folder / "sae_weights.safetensors").exists():
        loader = _load_saelens
    elif cfg.get("format") == FORMAT:
        loader = _load_ours
    elif (folder / "sae.safetensors").exists():
        loader = _load_sparsify
    else:
        raise UserError(f"{folder}: no sae.safetensors or sae_weights.safetensors")
    try:
        sc, tensors = loader(folder, cfg)
    except (KeyError, OSError, RuntimeError) as e:
        raise UserError(f"{folder}: not a readable SAE ({type(e).__name__}: {e})") from e
    sae = Sae(sc, device)
    shapes = {"W_enc": (sc.d_in, sc.n_latents), "W_dec": (sc.n_latents, sc.d_in)}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, "
                            f"cfg.json says {shape}")
    sae.load_tensors({k: v.to(torch.float32) for k, v in tensors.items()})
    return sae.eval()


def l0_of(latents: Any) -> float:
    return float((latents != 0).float().sum(-1).mean())


def fvu(x: Any, x_hat: Any) -> float:
    """Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2."""
    x, x_hat = x.detach(), x_hat.detach()
    num = float(((x - x_hat) ** 2).sum())
    den = float(((x - x.mean(0)) ** 2).sum())
    return num / den if den > 0 else math.nan
