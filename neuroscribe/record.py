"""Record: stream a corpus through a model and keep, for every unit, its exemplars and stats.

Memory is bounded by units x exemplars, never by corpus length. Every exemplar kind (top
activating, random, random within a quantile bin) is the same streaming top-k, keyed by the
context's max activation or by a random key, so one vectorised ``TopK`` serves them all.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .formats import ActivationRecord, NeuronId, NeuronRecord
from .runs import atomic_path, claim_stage, opt, save_stage, write_json

log = logging.getLogger("neuroscribe")
QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999)  # OpenAI's bins: 0-0.5, 0.5-0.9, 0.9-0.99, 0.99-0.999


@dataclass
class RecordConfig:
    """What to record, from which model and corpus."""

    model: str = opt("smollm2", "subject model: 'smollm2' (default), a .gguf file, a local "
                     "transformers folder, or a Hugging Face hub id")
    hookpoints: str = opt("model.layers.3.mlp.act_fn", "comma-separated module paths or globs; "
                          "PATH:input records a module's input")
    corpus: str = opt("default", "'default' (Gutenberg Shakespeare), files, folders or globs "
                      "(comma-separated), or hf:NAME[:CONFIG[:SPLIT]]")
    max_tokens: int = opt(100_000, "tokens to record")
    ctx_len: int = opt(64, "tokens per context; each context is one activation record")
    batch_size: int = opt(32, "contexts per forward pass")
    n_top: int = opt(40, "top-activating records per unit (interleaved into train, "
                     "calibration, valid and test)")
    n_random: int = opt(30, "random records per unit (interleaved into calibration, valid, test)")
    n_quantile: int = opt(5, "random records per quantile bin per unit")
    quantile_warmup: int = opt(256, "contexts whose maxima fix the quantile boundaries and the "
                               "histogram range")
    n_hist_bins: int = opt(64, "activation histogram bins")
    seed: int = opt(0, "seed of every random sample")
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:1, mps")
    dtype: str = opt("float32", "model dtype: float32, bfloat16, float16")


class TopK:
    """Per-unit streaming top-k of contexts by a score, with their tokens and activations.

    Slots are overwritten in place: a batch only writes the (unit, slot) pairs whose context
    entered the top-k, so the cost per batch is a top-k over [units, k + batch] scores.
    """

    def __init__(self, n_units: int, k: int, ctx_len: int) -> None:
        import torch

        self.k = k
        self.scores = torch.full((n_units, k), -math.inf)
        self.ctx = torch.full((n_units, k), -1, dtype=torch.int64)
        self.acts = torch.zeros((n_units, k, ctx_len))
        self.tokens = torch.zeros((n_units, k, ctx_len), dtype=torch.int32)

    def update(self, scores: Any, acts: Any, tokens: Any, ctx: Any) -> None:
        """scores [B, U], acts [B, T, U], tokens [B, T], ctx [B]."""
        import torch

        if self.k == 0:
            return
        merged = torch.cat([self.scores, scores.T], dim=1)
        keep = torch.zeros_like(merged, dtype=torch.bool)
        keep.scatter_(1, merged.topk(self.k, dim=1).indices, True)
        new_u, new_b = keep[:, self.k:].nonzero(as_tuple=True)
        if new_u.numel() == 0:
            return
        # Vacated slots and incoming contexts come out grouped by unit with equal counts.
        vac_u, vac_k = (~keep[:, : self.k]).nonzero(as_tuple=True)
        self.scores[vac_u, vac_k] = scores[new_b, new_u]
        self.ctx[vac_u, vac_k] = ctx[new_b]
        self.acts[vac_u, vac_k] = acts[new_b, :, new_u]
        self.tokens[vac_u, vac_k] = tokens[new_b]

    def finished(self, prefix: str) -> dict[str, Any]:
        """Slots sorted by score, best first; empty slots have ctx -1."""
        import torch

        order = self.scores.argsort(dim=1, descending=True)
        ctx = self.ctx.gather(1, order)
        ctx[self.scores.gather(1, order) == -math.inf] = -1
        idx = order[..., None].expand_as(self.acts)
        return {f"{prefix}_ctx": ctx, f"{prefix}_acts": self.acts.gather(1, idx),
                f"{prefix}_tokens": self.tokens.gather(1, idx.to(torch.int64))}


class Moments:
    """Streaming mean, variance, skewness and kurtosis per unit (Pebay's pairwise update)."""

    def __init__(self, n_units: int) -> None:
        self.n = 0
        self.mean = np.zeros(n_units)
        self.m2 = np.zeros(n_units)
        self.m3 = np.zeros(n_units)
        self.m4 = np.zeros(n_units)

    def update(self, x: np.ndarray) -> None:
        """x [N, U] (float64)."""
        nb = x.shape[0]
        mb = x.mean(0)
        d = x - mb
        d2 = d * d
        m2b, m3b, m4b = d2.sum(0), (d2 * d).sum(0), (d2 * d2).sum(0)
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        m2a, m3a = self.m2, self.m3
        self.m4 = (self.m4 + m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                   + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
                   + 4 * delta * (na * m3b - nb * m3a) / n)
        self.m3 = (m3a + m3b + delta**3 * na * nb * (na - nb) / n**2
                   + 3 * delta * (na * m2b - nb * m2a) / n)
        self.m2 = m2a + m2b + delta**2 * na * nb / n
        self.mean = self.mean + delta * nb / n
        self.n = n

    def finished(self) -> dict[str, np.ndarray]:
        """Population variance, skewness and excess kurtosis (scipy's bias=True defaults)."""
        n = max(self.n, 1)
        var = self.m2 / n
        with np.errstate(divide="ignore", invalid="ignore"):
            skew = np.where(var > 0, (self.m3 / n) / var**1.5, np.nan)
            kurt = np.where(var > 0, (self.m4 / n) / var**2 - 3.0, np.nan)
        return {"mean": self.mean, "variance": var, "skewness": skew, "kurtosis": kurt}


class UnitRecorder:
    """All per-unit state for one hookpoint; ``update`` takes one batch of activations."""

    def __init__(self, hookpoint: str, n_units: int, cfg: RecordConfig, gen: Any) -> None:
        self.hookpoint, self.n_units, self.cfg, self.gen = hookpoint, n_units, cfg, gen
        self.top = TopK(n_units, cfg.n_top, cfg.ctx_len)
        # Kept n_top larger, so the random sample can exclude top contexts and stay disjoint.
        self.random = TopK(n_units, cfg.n_random + cfg.n_top, cfg.ctx_len)
        self.bins = [TopK(n_units, cfg.n_quantile, cfg.ctx_len) for _ in QUANTILES[:-1]]
        self.moments = Moments(n_units)
        self.warm: list[tuple[Any, Any, Any, Any]] = []
        self.n_warm = 0
        self.boundaries: Any = None  # [U, len(QUANTILES)]
        self.hist_edges: Any = None  # [U, bins + 1]
        self.hist = np.zeros((n_units, cfg.n_hist_bins), dtype=np.int64)

    def update(self, acts: Any, tokens: Any, ctx: Any) -> None:
        import torch

        acts = acts.detach().to("cpu", torch.float32)
        if not torch.isfinite(acts).all():
            bad = (~torch.isfinite(acts)).nonzero()[0].tolist()
            raise UserError(f"non-finite activation (NaN/Inf) at {self.hookpoint} unit {bad[2]}, "
                            f"context {int(ctx[bad[0]])}, position {bad[1]}")
        ctx_max = acts.amax(dim=1)
        self.top.update(ctx_max, acts, tokens, ctx)
        keys = torch.rand(ctx_max.shape, generator=self.gen)
        self.random.update(keys, acts, tokens, ctx)
        self.moments.update(acts.reshape(-1, self.n_units).double().numpy())
        if self.boundaries is None:
            self.warm.append((acts, tokens, ctx, keys))
            self.n_warm += acts.shape[0]
            if self.n_warm >= self.cfg.quantile_warmup:
                self._fix_boundaries()
        else:
            self._binned(acts, tokens, ctx, ctx_max, keys)

    def _fix_boundaries(self) -> None:
        import torch

        if not self.warm:
            return
        maxima = torch.cat([w[0].amax(dim=1) for w in self.warm])  # [N, U]
        q = torch.tensor(QUANTILES, dtype=torch.float64)
        self.boundaries = torch.quantile(maxima.double(), q, dim=0).T.float()  # [U, Q]
        lo = torch.cat([w[0].amin(dim=(0, 1))[None] for w in self.warm]).amin(0)
        hi = maxima.amax(0)
        hi = torch.where(hi > lo, hi, lo + 1)
        self.hist_edges = torch.stack([torch.linspace(a, b, self.cfg.n_hist_bins + 1)
                                       for a, b in zip(lo.tolist(), hi.tolist())])
        warm, self.warm = self.warm, []
        for acts, tokens, ctx, keys in warm:
            self._binned(acts, tokens, ctx, acts.amax(dim=1), keys)

    def _binned(self, acts: Any, tokens: Any, ctx: Any, ctx_max: Any, keys: Any) -> None:
        import torch

        b = self.boundaries
        for i, store in enumerate(self.bins):
            inside = (ctx_max >= b[:, i]) & (ctx_max < b[:, i + 1])
            store.update(torch.where(inside, keys, -math.inf), acts, tokens, ctx)
        # Histogram: values outside the warm-up range go to the end bins.
        lo, hi = self.hist_edges[:, 0], self.hist_edges[:, -1]
        nb = self.cfg.n_hist_bins
        x = acts.reshape(-1, self.n_units)
        idx = ((x - lo) / (hi - lo) * nb).floor().clamp_(0, nb - 1).long()
        idx += torch.arange(self.n_units) * nb
        self.hist += torch.bincount(idx.reshape(-1), minlength=self.n_units * nb).view(
            self.n_units, nb).numpy()

    def finished(self) -> dict[str, Any]:
        import torch

        if self.boundaries is None:
            self._fix_boundaries()
        out = {**self.top.finished("top")}
        rnd = self.random.finished("random")
        # Drop random contexts that are also top contexts of the unit, keep n_random.
        clash = (rnd["random_ctx"][:, :, None] == out["top_ctx"][:, None, :]).any(-1)
        clash |= rnd["random_ctx"] < 0
        order = torch.sort(clash.to(torch.int8), dim=1, stable=True).indices[:, : self.cfg.n_random]
        rnd_ctx = rnd["random_ctx"].gather(1, order)
        rnd_ctx[clash.gather(1, order)] = -1
        idx = order[..., None].expand(-1, -1, self.cfg.ctx_len)
        out.update(random_ctx=rnd_ctx, random_acts=rnd["random_acts"].gather(1, idx),
                   random_tokens=rnd["random_tokens"].gather(1, idx))
        for i, store in enumerate(self.bins):
            for k, v in store.finished(f"q{i}").items():
                out[k] = v
        out.update({k: torch.from_numpy(v.astype(np.float32))
                    for k, v in self.moments.finished().items()})
        out["quantile_boundaries"] = self.boundaries.contiguous()
        out["hist_edges"] = self.hist_edges.contiguous()
        out["hist_counts"] = torch.from_numpy(self.hist)
        return {k: v.contiguous() for k, v in out.items()}


def store_path(run_dir: Path, hookpoint: str) -> Path:
    return run_dir / "records" / f"{hookpoint.replace(':', '__')}.safetensors"


def _batches(cfg: RecordConfig, tokenizer: Any) -> Any:
    from .corpus import iter_contexts, iter_texts

    batch: list[list[int]] = []
    for c in iter_contexts(iter_texts(cfg.corpus), tokenizer, cfg.ctx_len, cfg.max_tokens):
        batch.append(c)
        if len(batch) == cfg.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def record(cfg: RecordConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Record every unit of the hookpoints; write ``records/*.safetensors`` and ``record.json``."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .models import capture, layer_index, load_subject, resolve_hookpoints, run_to_hooks

    if claim_stage(run_dir, "record", cfg, resume):
        log.info("record: already complete in %s, skipping", run_dir)
        return json.loads((run_dir / "record.json").read_text())
    for name in ("n_top", "n_random", "n_quantile", "ctx_len", "batch_size", "max_tokens"):
        if getattr(cfg, name) < (0 if name.startswith("n_") else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    subject = load_subject(cfg.model, cfg.device, cfg.dtype)
    if subject.max_context and cfg.ctx_len > subject.max_context:
        raise UserError(f"--ctx-len {cfg.ctx_len} is longer than {cfg.model} allows "
                        f"({subject.max_context} tokens)")
    hookpoints = resolve_hookpoints(subject.model, [h for h in cfg.hookpoints.split(",") if h])
    gen = torch.Generator().manual_seed(cfg.seed)
    recorders: dict[str, UnitRecorder] = {}
    n_ctx = 0
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc="record", disable=None)
    with capture(subject.model, hookpoints) as store, torch.inference_mode():
        for batch in _batches(cfg, subject.tokenizer):
            ids = torch.tensor(batch, device=cfg.device)
            ctx = torch.arange(n_ctx, n_ctx + len(batch))
            for hp, acts in run_to_hooks(subject.model, ids, store).items():
                if acts.dim() != 3:
                    raise UserError(f"hookpoint {hp} gives shape {tuple(acts.shape)}, "
                                    "not [batch, seq, units]")
                if hp not in recorders:
                    recorders[hp] = UnitRecorder(hp, acts.shape[-1], cfg, gen)
                recorders[hp].update(acts, ids.cpu().to(torch.int32), ctx)
            n_ctx += len(batch)
            bar.update(len(batch) * cfg.ctx_len)
    bar.close()
    seconds = time.perf_counter() - t0
    if n_ctx == 0:
        raise UserError(f"corpus {cfg.corpus!r} is empty or shorter than one context "
                        f"({cfg.ctx_len} tokens)")
    units = {}
    for hp, rec in recorders.items():
        meta = {"hookpoint": hp, "layer_index": str(layer_index(hp)), "ctx_len": str(cfg.ctx_len)}
        with atomic_path(store_path(run_dir, hp)) as tmp:
            save_file(rec.finished(), str(tmp), metadata=meta)
        units[hp] = rec.n_units
    write_json(run_dir / "vocab.json", subject.token_strings())
    info = {"hookpoints": hookpoints, "units": units, "n_contexts": n_ctx,
            "n_tokens": n_ctx * cfg.ctx_len, "seconds": round(seconds, 2),
            "tokens_per_second": round(n_ctx * cfg.ctx_len / seconds, 1),
            "seeds": {"random_sample": cfg.seed},
            "quantiles": list(QUANTILES), "quantile_basis": "per-context max activation"}
    save_stage(run_dir, "record", cfg, complete=True, **info)
    log.info("record: %d tokens in %.1fs (%.0f tok/s)", info["n_tokens"], seconds,
             info["tokens_per_second"])
    return info


class RecordStore:
    """Read a run's records back; ``neuron_record`` gives OpenAI's NeuronRecord exactly."""

    def __init__(self, run_dir: Path) -> None:
        from .runs import load_stage

        self.run_dir = Path(run_dir)
        stage = load_stage(self.run_dir, "record")
        if not stage.get("complete"):
            raise UserError(f"{run_dir}: the record stage did not finish; rerun it")
        self.info = stage
        self.hookpoints: list[str] = stage["hookpoints"]
        self.units: dict[str, int] = stage["units"]
        self.vocab: list[str] = json.loads((self.run_dir / "vocab.json").read_text())
        self._files: dict[str, Any] = {}

    def _file(self, hookpoint: str) -> Any:
        from safetensors import safe_open

        if hookpoint not in self._files:
            path = store_path(self.run_dir, hookpoint)
            if not path.exists():
                raise UserError(f"{path} is missing: the run folder is incomplete")
            self._files[hookpoint] = safe_open(str(path), framework="pt")
        return self._files[hookpoint]

    def unit_tensors(self, hookpoint: str, unit: int) -> dict[str, Any]:
        if hookpoint not in self.units:
            raise UserError(f"hookpoint {hookpoint!r} was not recorded; have {self.hookpoints}")
        if not 0 <= unit < self.units[hookpoint]:
            raise UserError(f"unit {unit} out of range for {hookpoint} "
                            f"({self.units[hookpoint]} units)")
        f = self._file(hookpoint)
        return {k: f.get_slice(k)[unit] for k in f.keys()}  # noqa: SIM118

    def _records(self, t: dict[str, Any], prefix: str) -> list[ActivationRecord]:
        ctx, acts, toks = t[f"{prefix}_ctx"], t[f"{prefix}_acts"], t[f"{prefix}_tokens"]
        return [ActivationRecord(tokens=[self.vocab[i] for i in toks[j].tolist()],
                                 activations=acts[j].tolist())
                for j in range(len(ctx)) if int(ctx[j]) >= 0]

    def neuron_record(self, hookpoint: str, unit: int) -> NeuronRecord:
        from .models import layer_index

        t = self.unit_tensors(hookpoint, unit)
        n_bins = len(QUANTILES) - 1
        return NeuronRecord(
            neuron_id=NeuronId(layer_index=layer_index(hookpoint), neuron_index=unit),
            random_sample=self._records(t, "random"),
            random_sample_by_quantile=[self._records(t, f"q{i}") for i in range(n_bins)],
            quantile_boundaries=t["quantile_boundaries"].tolist(),
            mean=float(t["mean"]), variance=float(t["variance"]),
            skewness=float(t["skewness"]), kurtosis=float(t["kurtosis"]),
            most_positive_activation_records=self._records(t, "top"),
        )

    def histogram(self, hookpoint: str, unit: int) -> tuple[list[float], list[int]]:
        t = self.unit_tensors(hookpoint, unit)
        return t["hist_edges"].tolist(), t["hist_counts"].tolist()
