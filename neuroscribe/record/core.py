"""Record: stream a corpus through a model and keep, for every unit, its exemplars and stats.

Memory is bounded by units x exemplars, never by corpus length. Every exemplar kind (top
activating, random, random within a quantile bin) is the same streaming top-k, keyed by the
context's max activation or by a random key, so one vectorised ``TopK`` serves them all.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.formats import ActivationRecord, NeuronId, NeuronRecord
from neuroscribe.record.dist import Ranks
from neuroscribe.record.units import RANDOM_STREAM, UnitRecorder
from neuroscribe.runs import atomic_path, claim_stage, opt, save_stage, write_json
from neuroscribe.stats import BIN_STREAM, QUANTILES, stream_seed

log = logging.getLogger("neuroscribe")
# Tests kill the last rank after this many shards, to check --resume (unset: never).
_DIE_AFTER = int(os.environ.get("NEUROSCRIBE_DIE_AFTER_SHARDS", "0")) or None


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
    shard_contexts: int = opt(1024, "contexts per shard (at least --quantile-warmup): under "
                              "torchrun, ranks take shards in turn; checkpoints fall between "
                              "shards")
    checkpoint_seconds: float = opt(300.0, "save a checkpoint for --resume at the end of a "
                                    "shard at most this often (0: every shard; -1: never)",
                                    identity=False)


def store_path(run_dir: Path, hookpoint: str) -> Path:
    from neuroscribe.models import safe_name

    return run_dir / "records" / f"{safe_name(hookpoint)}.safetensors"


def latents_dir(run_dir: Path, hookpoint: str) -> Path:
    """The sparse latent cache of an SAE hookpoint (see ``latents.py``)."""
    from neuroscribe.models import safe_name

    return run_dir / "latents" / safe_name(hookpoint)


def _recorder(hp: str, n_units: int, sparse: bool, cfg: RecordConfig, run_dir: Path,
              ranks: Ranks, tag: str) -> Any:
    """SAE latents (sparse) keep their activations on disk, in this attempt's and rank's
    folder under ``record.partial`` until the end merges them; other units in memory."""
    if sparse:
        from neuroscribe.models import safe_name
        from neuroscribe.record.dist import PARTIAL
        from neuroscribe.record.latents import LatentRecorder

        folder = run_dir / PARTIAL / "latents" / f"{tag}-r{ranks.rank}" / safe_name(hp)
        return LatentRecorder(hp, n_units, cfg, folder)
    return UnitRecorder(hp, n_units, cfg)


def shard_size(cfg: RecordConfig) -> int:
    """Contexts per shard: at least the quantile warm-up (rank 0 fixes the boundaries in shard
    0), a whole number of batches (a shard's batches are the same on any number of ranks)."""
    n = max(cfg.shard_contexts, cfg.quantile_warmup, 1)
    return -(-n // cfg.batch_size) * cfg.batch_size


def _shard_batches(cfg: RecordConfig, tokenizer: Any, keep: Any, counts: list[int]) -> Any:
    """(shard, first context id, contexts) of the shards ``keep`` accepts, in batches that
    start at the shard's start; ``counts[0]`` ends as the corpus's number of contexts."""
    from neuroscribe.corpus import iter_contexts, iter_texts

    size = shard_size(cfg)
    batch: list[list[int]] = []
    start = shard = 0
    for i, c in enumerate(iter_contexts(iter_texts(cfg.corpus), tokenizer, cfg.ctx_len,
                                        cfg.max_tokens)):
        counts[0] = i + 1
        s = i // size
        if not keep(s):
            continue
        if batch and (s != shard or len(batch) == cfg.batch_size):
            yield shard, start, batch
            batch = []
        if not batch:
            start, shard = i, s
        batch.append(c)
    if batch:
        yield shard, start, batch


def _check(cfg: RecordConfig) -> None:
    for name in ("n_top", "n_random", "n_quantile", "ctx_len", "batch_size", "max_tokens",
                 "latent_splits"):
        if getattr(cfg, name) < (0 if name.startswith("n_") else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive")


def record(cfg: RecordConfig, run_dir: Path, resume: bool = False,
           subject: Any = None) -> dict[str, Any]:
    """Record every unit of the hookpoints (``_record``); under torchrun, in the process
    group torchrun describes, which is left on the way out (a group never destroyed can
    abort a rank at exit: "terminate called without an active exception")."""
    from neuroscribe.record import dist

    ranks = dist.init_ranks(cfg.device)
    try:
        return _record(cfg, run_dir, resume, subject, ranks)
    finally:
        dist.leave(ranks)


def _record(cfg: RecordConfig, run_dir: Path, resume: bool, subject: Any,
            ranks: Ranks) -> dict[str, Any]:
    """Record every unit of the hookpoints; write ``records/*.safetensors`` and ``record.json``.

    Under torchrun the ranks share the shards and rank 0 merges (``dist.py``); with
    ``resume``, the checkpoints of a killed run are reused. ``subject`` replaces loading
    ``cfg.model`` (the planted-neuron bench passes the model with its planted units)."""
    import torch
    from tqdm import tqdm

    from neuroscribe.models import capture, load_subject, resolve_hookpoints, run_to_hooks
    from neuroscribe.record import dist

    if claim_stage(run_dir, "record", cfg, resume):
        log.info("record: already complete in %s, skipping", run_dir)
        return json.loads((run_dir / "record.json").read_text())
    _check(cfg)
    if ranks.rank == 0 and not resume:
        dist.clear_checkpoints(run_dir)
    dist.barrier(ranks)
    prev = [dist.load_checkpoint(p) for p in dist.checkpoints(run_dir)] if resume else []
    if ranks.rank == 0:  # a killed attempt's SAE spills, cut back to its last checkpoint
        from neuroscribe.record.latent_cache import truncate

        for p in prev:
            for snap in p.get("spills", {}).values():
                truncate(snap)
    done = {s for p in prev for s in p["shards"]}
    dist.barrier(ranks)  # every rank has seen the same checkpoints before any writes one
    tag = dist.attempt_tag(done)
    subject = subject or load_subject(cfg.model, cfg.device, cfg.dtype)
    if subject.max_context and cfg.ctx_len > subject.max_context:
        raise UserError(f"--ctx-len {cfg.ctx_len} is longer than {cfg.model} allows "
                        f"({subject.max_context} tokens)")
    hookpoints = resolve_hookpoints(subject.model, [h for h in cfg.hookpoints.split(",") if h])
    preset = next(({hp: (st["boundaries"], st["hist_edges"]) for hp, st in p["states"].items()}
                   for p in prev if p["states"]), None)
    if preset is None and ranks.rank > 0:
        preset = dist.broadcast(None, ranks)  # rank 0's, once its warm-up is done
    synced = preset is not None or ranks.world == 1
    recorders: dict[str, Any] = {}
    held: list[int] = []  # shards this rank recorded
    counts, n_read, last_ckpt = [0], 0, time.monotonic()

    def end_of_shard(shard: int) -> None:
        nonlocal synced, last_ckpt
        held.append(shard)
        if not synced:  # rank 0 after shard 0: a corpus shorter than the warm-up
            sync()
        if cfg.checkpoint_seconds >= 0 and time.monotonic() - last_ckpt >= cfg.checkpoint_seconds:
            dist.save_checkpoint(run_dir, tag, ranks, held, n_read,
                                 {hp: r.state() for hp, r in recorders.items()},
                                 {hp: r.cache.snapshot() for hp, r in recorders.items()
                                  if r.sparse})
            last_ckpt = time.monotonic()
        if len(held) == _DIE_AFTER and ranks.rank == ranks.world - 1:  # fault injection, tests
            os._exit(17)

    def sync() -> None:
        nonlocal synced
        for r in recorders.values():
            r.fix_boundaries()
        dist.broadcast({hp: (r.boundaries, r.hist_edges) for hp, r in recorders.items()}, ranks)
        synced = True

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_tokens, unit="tok", desc="record",
               disable=True if ranks.rank > 0 else None)
    cur = None
    with capture(subject.model, hookpoints) as store, torch.inference_mode():
        for shard, start, batch in _shard_batches(
                cfg, subject.tokenizer, lambda s: ranks.owns(s) and s not in done, counts):
            if cur is not None and shard != cur:
                end_of_shard(cur)
            cur = shard
            ids = torch.tensor(batch, device=cfg.device)
            ctx = torch.arange(start, start + len(batch))
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
                    recorders[hp] = _recorder(hp, acts.shape[-1], acts.is_sparse, cfg, run_dir,
                                              ranks, tag)
                    if preset is not None:
                        recorders[hp].set_boundaries(*preset[hp])
                recorders[hp].update(acts, ids.cpu().to(torch.int32), ctx, shard)
            n_read += len(batch)
            if not synced and all(r.boundaries is not None for r in recorders.values()):
                sync()
            bar.update(len(batch) * cfg.ctx_len)
        if cur is not None:
            end_of_shard(cur)
        if not synced:
            sync()
    bar.close()
    seconds = time.perf_counter() - t0
    n_ctx = counts[0]
    if n_ctx == 0:
        raise UserError(f"corpus {cfg.corpus!r} is empty or shorter than one context "
                        f"({cfg.ctx_len} tokens)")
    with torch.inference_mode():  # the recorders' tensors are inference tensors
        states = {hp: r.state() for hp, r in recorders.items()}
    mine = {"rank": ranks.rank, "contexts": n_read, "shards": held, "seconds": round(seconds, 2),
            "states": states,
            "units": {hp: r.n_units for hp, r in recorders.items()},
            "spills": {hp: r.cache.spill_files() for hp, r in recorders.items() if r.sparse}}
    everyone = dist.gather(mine, ranks)
    info: dict[str, Any] = {}
    if ranks.rank == 0:
        info = _finish(cfg, run_dir, subject, hookpoints, recorders, everyone, prev, n_ctx,
                       seconds, ranks, tag)
    return dist.broadcast(info, ranks)  # and every rank waits for rank 0's files


def _finish(cfg: RecordConfig, run_dir: Path, subject: Any, hookpoints: list[str],
            recorders: dict[str, Any], everyone: list[dict[str, Any]], prev: list[dict[str, Any]],
            n_ctx: int, seconds: float, ranks: Ranks, tag: str) -> dict[str, Any]:
    """Rank 0: merge every rank's and checkpoint's state, write the records and record.json."""
    import torch

    from neuroscribe.models import layer_index
    from neuroscribe.record import dist

    others = [*everyone[1:], *prev]
    units: dict[str, int] = {}
    for o in everyone:
        units.update(o["units"])
    for hp, n in units.items():
        if hp not in recorders:  # rank 0 held no shard of it (a resumed run): an empty one
            sparse = any(hp in o.get("spills", {}) for o in others)
            recorders[hp] = _recorder(hp, n, sparse, cfg, run_dir, ranks, tag)
            st = next(o["states"][hp] for o in others if hp in o["states"])
            recorders[hp].set_boundaries(st["boundaries"], st["hist_edges"])
    for hp, rec in recorders.items():
        meta = {"hookpoint": hp, "layer_index": str(layer_index(hp)), "ctx_len": str(cfg.ctx_len)}
        states = tuple(o["states"][hp] for o in others if hp in o["states"])
        if rec.sparse:  # every rank's and checkpoint's spills, in delphi's folder
            rec.cache.adopt([o["spills"][hp] for o in others if hp in o.get("spills", {})],
                            latents_dir(run_dir, hp), n_ctx)
        # The recorders' tensors are inference tensors: finish them in inference mode.
        with atomic_path(store_path(run_dir, hp)) as tmp, torch.inference_mode():
            rec.save(tmp, meta, states)
    write_json(run_dir / "vocab.json", subject.token_strings())
    n_tok = n_ctx * cfg.ctx_len
    info = {"hookpoints": hookpoints, "units": units, "n_contexts": n_ctx,
            "n_tokens": n_tok, "seconds": round(seconds, 2),
            "tokens_per_second": round(sum(o["contexts"] for o in everyone) * cfg.ctx_len
                                       / max(seconds, 1e-9), 1),
            "world_size": ranks.world, "shard_contexts": shard_size(cfg),
            "ranks": [{k: o[k] for k in ("rank", "contexts", "shards", "seconds")}
                      for o in everyone],
            "resumed_shards": sorted(s for p in prev for s in p["shards"]),
            "seeds": {"random_sample": cfg.seed},
            "latent_caches": {hp: str(latents_dir(Path(), hp)) for hp, rec in recorders.items()
                              if rec.sparse},
            "quantiles": list(QUANTILES), "quantile_basis": "per-context max activation",
            "quantile_bins": "first and last open-ended",
            "random_keys": "hash of (seed, stream, global context id, unit)",
            "key_streams": {"random_sample": stream_seed(cfg.seed, RANDOM_STREAM),
                            "quantile_bins": stream_seed(cfg.seed, BIN_STREAM)}}
    save_stage(run_dir, "record", cfg, complete=True, **info)
    dist.clear_checkpoints(run_dir)
    from neuroscribe.record.output_tokens import write_output_tokens

    write_output_tokens(run_dir, subject=subject, strict=False)
    log.info("record: %d tokens in %.1fs (%.0f tok/s, %d rank%s)", n_tok, seconds,
             info["tokens_per_second"], ranks.world, "s" * (ranks.world > 1))
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
