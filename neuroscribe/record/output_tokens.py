"""The output side of every unit: its direct effect on the vocabulary (the logit lens).

A unit's output direction is what it adds to the residual stream per unit of activation: an
MLP neuron's ``c_proj`` row (GPT-2) or ``down_proj`` column (Llama), an SAE latent's ``W_dec``
row mapped through that same matrix when the SAE sits on the MLP activations, or the basis
vector itself for a hookpoint already in the residual stream. The direction goes through the
final norm's linear part (LayerNorm: centre, times the gain; RMSNorm: times the gain; the
bias and the scale are the same for every token, so they change no ranking) and the
unembedding. The top-k promoted and suppressed tokens are kept, as OpenAI's "related tokens".
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.runs import atomic_write_text, opt

log = logging.getLogger("neuroscribe")


@dataclass
class OutputTokensConfig:
    """Top promoted and suppressed tokens of each unit's output direction (logit lens)."""

    top_k: int = opt(10, "tokens kept on each side (promoted, suppressed)")
    chunk: int = opt(4096, "units per unembedding product (bounds the memory)")


def output_tokens_path(run_dir: Path, hookpoint: str) -> Path:
    from neuroscribe.models import safe_name

    return Path(run_dir) / "output_tokens" / f"{safe_name(hookpoint)}.json"


def _projection(model: Any, path: str, where: str, width: int, d_model: int) -> Any:
    """``[width, d_model]``: what one unit of the hookpoint adds to the residual stream."""
    import torch

    modules = dict(model.named_modules())
    parent = modules.get(path.rsplit(".", 1)[0]) if "." in path else None
    if path.endswith((".act", ".act_fn")) and where != "input" and parent is not None:
        down = getattr(parent, "c_proj", None) or getattr(parent, "down_proj", None)
        if down is not None:
            w = down.weight.detach().float()
            # Conv1D (GPT-2) stores [in, out]; nn.Linear stores [out, in]
            return w if type(down).__name__ == "Conv1D" else w.T
    if width == d_model:
        return torch.eye(d_model, device=model.get_output_embeddings().weight.device)
    raise UserError(f"no output direction for hookpoint {path}: its {width} units are neither "
                    "MLP activations (…mlp.act / …mlp.act_fn) nor the residual width")


def _final_norm(model: Any) -> Any:
    """A function applying the final norm's linear part to directions ``[n, d_model]``."""
    base = getattr(model, "transformer", None) or getattr(model, "model", None)
    norm = getattr(base, "ln_f", None) or getattr(base, "norm", None)
    if norm is None:
        return lambda d: d
    gain = norm.weight.detach().float()
    centred = type(norm).__name__ == "LayerNorm"
    return lambda d: (d - d.mean(-1, keepdim=True) if centred else d) * gain


def unit_directions(model: Any, hookpoint: str, sae: Any | None = None) -> Any:
    """``[units, d_model]``: each unit's output direction in the residual stream."""
    from neuroscribe.models import parse_hookpoint

    hp = parse_hookpoint(hookpoint)
    d_model = model.get_output_embeddings().weight.shape[1]
    width = sae.cfg.d_in if sae is not None else None
    if width is None:
        module = dict(model.named_modules())[hp.path]
        width = getattr(module, "out_features", None) or _width_from_config(model, hp.path)
    proj = _projection(model, hp.path, hp.where, width, d_model)
    return sae.W_dec.detach().float() @ proj if sae is not None else proj


def _width_from_config(model: Any, path: str) -> int:
    cfg = model.config
    if path.endswith((".act", ".act_fn")):
        return getattr(cfg, "n_inner", None) or getattr(cfg, "intermediate_size", None) or (
            4 * cfg.hidden_size)
    return cfg.hidden_size


def logit_lens(model: Any, directions: Any) -> Any:
    """``[units, vocab]``: the direct logit effect of each direction (final norm, unembed)."""
    w_u = model.get_output_embeddings().weight.detach().float()
    return _final_norm(model)(directions) @ w_u.T


def top_tokens(model: Any, directions: Any, vocab: list[str], cfg: OutputTokensConfig
               ) -> list[dict[str, Any]]:
    import torch

    out: list[dict[str, Any]] = []
    k = min(cfg.top_k, len(vocab))
    with torch.no_grad():
        for start in range(0, directions.shape[0], cfg.chunk):
            logits = logit_lens(model, directions[start:start + cfg.chunk])
            up, down = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
            for i in range(logits.shape[0]):
                out.append({
                    "promoted": [[vocab[t], float(f"{float(v):.5g}")]
                                 for v, t in zip(up.values[i], up.indices[i].tolist())],
                    "suppressed": [[vocab[t], float(f"{-float(v):.5g}")]
                                   for v, t in zip(down.values[i], down.indices[i].tolist())]})
    return out


def write_output_tokens(run_dir: Path, cfg: OutputTokensConfig | None = None,
                        subject: Any = None, strict: bool = True) -> list[Path]:
    """Write ``RUN/output_tokens/<hookpoint>.json`` for every recorded hookpoint; without
    ``strict`` (at the end of ``record``), hookpoints with no output direction are skipped."""
    from neuroscribe.models import load_saes, load_subject
    from neuroscribe.runs import load_stage

    cfg = cfg or OutputTokensConfig()
    run_dir = Path(run_dir)
    rec = load_stage(run_dir, "record")
    if not rec.get("complete"):
        raise UserError(f"{run_dir}: the record stage did not finish; rerun it")
    rcfg = rec["config"]
    subject = subject or load_subject(rcfg["model"], "cpu", "float32")
    vocab = json.loads((run_dir / "vocab.json").read_text())
    saes = load_saes(subject.model, rec["hookpoints"])
    paths = []
    for hp in rec["hookpoints"]:
        try:
            dirs = unit_directions(subject.model, hp, saes.get(hp))
        except UserError as e:
            if strict:
                raise
            log.info("output tokens skipped: %s", e)
            continue
        units = top_tokens(subject.model, dirs, vocab, cfg)
        path = output_tokens_path(run_dir, hp)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"hookpoint": hp, "config": asdict(cfg),
                                            "model": rcfg["model"], "units": units}))
        paths.append(path)
    return paths


def load_output_tokens(run_dir: Path, hookpoint: str) -> list[dict[str, Any]] | None:
    path = output_tokens_path(run_dir, hookpoint)
    return json.loads(path.read_text())["units"] if path.exists() else None
