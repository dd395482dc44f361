"""Record: stream a corpus through a model and keep, for every unit, its exemplars and stats.

Memory is bounded by units x exemplars, never by corpus length. Every exemplar kind (top
activating, random, random within a quantile bin) is the same streaming top-k, keyed by the
context's max activation or by a random key, so one vectorised ``TopK`` serves them all.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord, NeuronId, NeuronRecord
from neuroscribe.runs import atomic_path, claim_stage, opt, save_stage, write_json
from neuroscribe.stats import (
    BIN_STREAM,
    QUANTILES,
    Moments,
    TopK,
    bin_scores,
    derived_generator,
    scratch,
)

log = logging.getLogger("neuroscribe")


@dataclass
class RecordConfig:
    """What to record, from which model and corpus."""

    model: str = opt("smollm2", "subject model: 'smollm2' (default), a .gguf file, a local "
                     "transformers folder, or a Hugging Face hub id")
    hookpoints: str = opt("model.layers.3.mlp.act_fn", "comma-separated module paths or globs; "
                          "PATH:input records a module's input; PATH[:input]:sae=FOLDER the "
                          "latents of an SAE on it")
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
                               "histogram range (the first and last bins are open-ended, so "
                               "later contexts outside that range still land in a bin)")
    n_hist_bins: int = opt(64, "activation histogram bins")
    seed: int = opt(0, "seed of every random sample")
    device: str = opt("cpu", "torch device: cpu, cuda, cuda:1, mps")
    dtype: str = opt("float32", "model dtype: float32, bfloat16, float16")
    latent_splits: int = opt(5, "SAE hookpoints: files per hookpoint in the sparse latent cache "
                             "latents/ (delphi's n_splits)")


class UnitRecorder:
    """All per-unit state for one hookpoint; ``update`` takes one batch of activations.

    Per batch this costs a few whole-batch passes (float64 moments, histogram bins, context
    maxima) plus top-k merges over [units, k + batch] scores: for SmolLM2-135M at layer 3 on
    2 CPU cores, about 8% on top of the forward pass (bench/record.py measures it).
    """

    def __init__(self, hookpoint: str, n_units: int, cfg: RecordConfig, gen: Any,
                 bin_gen: Any = None) -> None:
        import torch

        self.hookpoint, self.n_units, self.cfg, self.gen = hookpoint, n_units, cfg, gen
        # The bins draw keys of their own: with the random sample's keys, a bin's sample would
        # hold every random-sample context that falls in the bin (the best keys are the best).
        self.bin_gen = (derived_generator(gen.initial_seed(), BIN_STREAM) if bin_gen is None
                        else bin_gen)
        self.top = TopK(n_units, cfg.n_top, cfg.ctx_len)
        # Kept n_top larger, so the random sample can exclude top contexts and stay disjoint.
        self.random = TopK(n_units, cfg.n_random + cfg.n_top, cfg.ctx_len)
        # One store, one group per quantile bin: a context's key competes only in its bin.
        self.bins = TopK(n_units, cfg.n_quantile, cfg.ctx_len, groups=len(QUANTILES) - 1)
        self.moments = Moments(n_units)
        self.warm: list[tuple[Any, Any, Any, Any, Any]] = []
        self.n_warm = 0
        self.boundaries: Any = None  # [U, len(QUANTILES)]
        self.hist_edges: Any = None  # [U, bins + 1]
        self.hist = torch.zeros((n_units, cfg.n_hist_bins), dtype=torch.int64)
        self._hist_offsets = torch.arange(n_units, dtype=torch.int32) * cfg.n_hist_bins
        self._bufs: dict[str, Any] = {}  # scratch buffers, reused batch after batch

    def update(self, acts: Any, tokens: Any, ctx: Any) -> None:
        import torch

        acts = acts.detach().to("cpu", torch.float32)
        sums = self.moments.batch(acts.reshape(-1, self.n_units))
        if not np.isfinite(sums[1]).all():  # any NaN/Inf makes its unit's batch mean non-finite
            bad = (~torch.isfinite(acts)).nonzero()[0].tolist()
            raise UserError(f"non-finite activation (NaN/Inf) at {self.hookpoint} unit {bad[2]}, "
                            f"context {int(ctx[bad[0]])}, position {bad[1]}")
        if self.boundaries is not None:  # while the batch is still in cache
            self._histogram(acts.reshape(-1, self.n_units))
        ctx_max = acts.amax(dim=1)
        self.top.update(ctx_max, acts, tokens, ctx)
        self.random.update(torch.rand(ctx_max.shape, generator=self.gen), acts, tokens, ctx)
        keys = torch.rand(ctx_max.shape, generator=self.bin_gen)  # the bins' own
        self.moments.merge(*sums)
        if self.boundaries is None:
            self.warm.append((acts, tokens, ctx, ctx_max, keys))
            self.n_warm += acts.shape[0]
            if self.n_warm >= self.cfg.quantile_warmup:
                self._fix_boundaries()
        else:
            self._bin_samples(acts, tokens, ctx, ctx_max, keys)

    def _fix_boundaries(self) -> None:
        import torch

        if not self.warm:
            return
        maxima = torch.cat([w[3] for w in self.warm])  # [N, U]
        q = torch.tensor(QUANTILES, dtype=torch.float64)
        # [U, Q]; along contiguous rows: the values of dim 0 of maxima, several times faster.
        per_unit = maxima.T.double().contiguous()
        self.boundaries = torch.quantile(per_unit, q, dim=1).T.float()
        lo = torch.cat([w[0].amin(dim=(0, 1))[None] for w in self.warm]).amin(0)
        hi = maxima.amax(0)
        hi = torch.where(hi > lo, hi, lo + 1)
        self.hist_edges = torch.stack([torch.linspace(a, b, self.cfg.n_hist_bins + 1)
                                       for a, b in zip(lo.tolist(), hi.tolist())])
        warm, self.warm = self.warm, []
        for w in warm:  # what the warm-up batches could not do without boundaries and edges
            self._histogram(w[0].reshape(-1, self.n_units))
            self._bin_samples(*w)

    def _bin_samples(self, acts: Any, tokens: Any, ctx: Any, ctx_max: Any, keys: Any) -> None:
        """The random samples per quantile bin: a context's key competes only in its bin (the
        first and last bins open-ended: every context is in one)."""
        self.bins.update_rows(bin_scores(self.boundaries, ctx_max, keys), acts, tokens, ctx)

    def _histogram(self, x: Any) -> None:
        """Count x [N, U] into the bins; values outside the warm-up range go to the end bins."""
        import torch

        lo, hi = self.hist_edges[:, 0], self.hist_edges[:, -1]
        nb = self.cfg.n_hist_bins
        pos = torch.sub(x, lo, out=scratch(self._bufs, "pos", x.shape, torch.float32))
        pos.div_(hi - lo).mul_(nb).clamp_(0, nb - 1)
        # Clamping before the int conversion (which truncates) is flooring, then clamping.
        idx = scratch(self._bufs, "idx", x.shape, torch.int32).copy_(pos)
        idx += self._hist_offsets  # unit u counts into bins [u * nb, (u + 1) * nb)
        self.hist += torch.bincount(idx.view(-1), minlength=self.n_units * nb).view(
            self.n_units, nb)

    def finished(self) -> dict[str, Any]:
        import torch

        if self.boundaries is None:
            self._fix_boundaries()
        out = self.top.finished("top")
        # The random sample: the best-keyed n_random that are not top contexts of the unit.
        order, rnd_ctx = self.random.sorted_slots()
        clash = (rnd_ctx[:, :, None] == out["top_ctx"][:, None, :]).any(-1) | (rnd_ctx < 0)
        pick = torch.sort(clash.to(torch.int8), dim=1, stable=True).indices[:, : self.cfg.n_random]
        rnd_ctx = rnd_ctx.gather(1, pick)
        rnd_ctx[clash.gather(1, pick)] = -1
        acts, tokens = self.random.take(order.gather(1, pick))
        out.update(random_ctx=rnd_ctx, random_acts=acts, random_tokens=tokens)
        out.update(self.bins.finished(*(f"q{i}" for i in range(len(QUANTILES) - 1))))
        out.update({k: torch.from_numpy(v.astype(np.float32))
                    for k, v in self.moments.finished().items()})
        out["quantile_boundaries"] = self.boundaries
        out["hist_edges"] = self.hist_edges
        out["hist_counts"] = self.hist
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        save_file(self.finished(), str(path), metadata=metadata)


def store_path(run_dir: Path, hookpoint: str) -> Path:
    from neuroscribe.models import safe_name

    return run_dir / "records" / f"{safe_name(hookpoint)}.safetensors"


def latents_dir(run_dir: Path, hookpoint: str) -> Path:
    """The sparse latent cache of an SAE hookpoint (see ``latents.py``)."""
    from neuroscribe.models import safe_name

    return run_dir / "latents" / safe_name(hookpoint)


def _recorder(hp: str, acts: Any, cfg: RecordConfig, gens: tuple[Any, Any],
              run_dir: Path) -> Any:
    """SAE latents (sparse) keep their activations on disk; other units in memory. ``gens``:
    the random sample's and the quantile bins' generators."""
    if acts.is_sparse:
        from neuroscribe.record.latents import LatentRecorder

        return LatentRecorder(hp, acts.shape[-1], cfg, gens[0], latents_dir(run_dir, hp),
                              gens[1])
    return UnitRecorder(hp, acts.shape[-1], cfg, *gens)


def _batches(cfg: RecordConfig, tokenizer: Any) -> Any:
    from neuroscribe.corpus import iter_contexts, iter_texts

    batch: list[list[int]] = []
    for c in iter_contexts(iter_texts(cfg.corpus), tokenizer, cfg.ctx_len, cfg.max_tokens):
        batch.append(c)
        if len(batch) == cfg.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def record(cfg: RecordConfig, run_dir: Path, resume: bool = False,
           subject: Any = None) -> dict[str, Any]:
    """Record every unit of the hookpoints; write ``records/*.safetensors`` and ``record.json``.

    ``subject`` replaces loading ``cfg.model`` (the planted-neuron bench passes the model with
    its planted units)."""
    import torch
    from tqdm import tqdm

    from neuroscribe.models import (
        capture,
        layer_index,
        load_subject,
        resolve_hookpoints,
        run_to_hooks,
    )

    if claim_stage(run_dir, "record", cfg, resume):
        log.info("record: already complete in %s, skipping", run_dir)
        return json.loads((run_dir / "record.json").read_text())
    for name in ("n_top", "n_random", "n_quantile", "ctx_len", "batch_size", "max_tokens",
                 "latent_splits"):
        if getattr(cfg, name) < (0 if name.startswith("n_") else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    subject = subject or load_subject(cfg.model, cfg.device, cfg.dtype)
    if subject.max_context and cfg.ctx_len > subject.max_context:
        raise UserError(f"--ctx-len {cfg.ctx_len} is longer than {cfg.model} allows "
                        f"({subject.max_context} tokens)")
    hookpoints = resolve_hookpoints(subject.model, [h for h in cfg.hookpoints.split(",") if h])
    gens = (torch.Generator().manual_seed(cfg.seed), derived_generator(cfg.seed, BIN_STREAM))
    recorders: dict[str, Any] = {}
    n_ctx = 0
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc="record", disable=None)
    with capture(subject.model, hookpoints) as store, torch.inference_mode():
        for batch in _batches(cfg, subject.tokenizer):
            ids = torch.tensor(batch, device=cfg.device)
            ctx = torch.arange(n_ctx, n_ctx + len(batch))
            acts_by_hp = run_to_hooks(subject.model, ids, store)
            missing = [hp for hp in hookpoints if hp not in acts_by_hp]
            if missing:
                raise UserError(f"hookpoint {missing[0]} never ran in the forward pass "
                                "(a module this model skips); pick another")
            for hp, acts in acts_by_hp.items():
                if acts.dim() != 3 or tuple(acts.shape[:2]) != tuple(ids.shape):
                    raise UserError(f"hookpoint {hp} gives shape {tuple(acts.shape)}, "
                                    "not [batch, seq, units]")
                if hp not in recorders:
                    recorders[hp] = _recorder(hp, acts, cfg, gens, run_dir)
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
        # The recorders' tensors are inference tensors: finish them in inference mode.
        with atomic_path(store_path(run_dir, hp)) as tmp, torch.inference_mode():
            rec.save(tmp, meta)
        units[hp] = rec.n_units
    write_json(run_dir / "vocab.json", subject.token_strings())
    info = {"hookpoints": hookpoints, "units": units, "n_contexts": n_ctx,
            "n_tokens": n_ctx * cfg.ctx_len, "seconds": round(seconds, 2),
            "tokens_per_second": round(n_ctx * cfg.ctx_len / seconds, 1),
            "seeds": {"random_sample": cfg.seed},
            "latent_caches": {hp: str(latents_dir(Path(), hp)) for hp, rec in recorders.items()
                              if not isinstance(rec, UnitRecorder)},
            "quantiles": list(QUANTILES), "quantile_basis": "per-context max activation",
            "quantile_bins": "first and last open-ended",
            "quantile_bin_seed": gens[1].initial_seed()}  # the bins' keys (derived_generator)
    save_stage(run_dir, "record", cfg, complete=True, **info)
    log.info("record: %d tokens in %.1fs (%.0f tok/s)", info["n_tokens"], seconds,
             info["tokens_per_second"])
    return info


class RecordStore:
    """Read a run's records back; ``neuron_record`` gives OpenAI's NeuronRecord exactly."""

    def __init__(self, run_dir: Path) -> None:
        from neuroscribe.runs import load_stage

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
        from neuroscribe.models import layer_index

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
