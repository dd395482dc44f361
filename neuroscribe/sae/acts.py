"""Activation sources for SAE training: stream from a model (nothing on disk), or write a cached
store once and read it back through a shuffling buffer.

A store is a folder of ``NNNNN.safetensors`` shards (one ``acts [tokens, d_in]`` tensor each)
and ``store.json`` (shard sizes, the config that made it). Reading is deterministic for a seed,
and ``start_step`` skips whole shard windows without reading them, so a resumed run sees exactly
the batches an uninterrupted run would have.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neuroscribe.errors import UserError
from neuroscribe.runs import atomic_path, opt, write_json


@dataclass
class ActsConfig:
    """Where the training activations come from."""

    model: str = opt("smollm2", "subject model (as for record)")
    hookpoint: str = opt("model.layers.3.mlp.act_fn", "one module path (PATH or PATH:input); "
                         "with --distribute-hookpoints, several (comma-separated or a glob)")
    distribute_hookpoints: bool = opt(False, "one SAE per hookpoint, hookpoint i trained by "
                                      "rank i mod ranks (under torchrun), each into "
                                      "OUT/HOOKPOINT")
    corpus: str = opt("default", "corpus (as for record)")
    max_tokens: int = opt(2_000_000, "training tokens to stream")
    ctx_len: int = opt(64, "tokens per context")
    model_batch: int = opt(32, "contexts per forward pass")
    skip_first: bool = opt(True, "drop each context's first position (the attention sink, "
                           "whose activations are outliers)")
    shuffle_tokens: int = opt(65536, "shuffling buffer, in tokens")
    store: str = opt("", "a cached activation store folder: read from it if it exists, "
                     "else write it while streaming")
    eval_tokens: int = opt(8192, "held-out tokens (the corpus' first contexts), never trained on")


def model_chunks(cfg: ActsConfig, skip_contexts: int = 0, device: str = "cpu") -> Iterator[Any]:
    """``[tokens, d_in]`` float32 chunks, one per forward pass, in corpus order. The subject
    model runs on ``device`` (the training device), and the chunks stay there."""
    from neuroscribe.corpus import iter_contexts, iter_texts
    from neuroscribe.models import capture, load_subject, resolve_hookpoints

    subject = load_subject(cfg.model, device=device)
    hps = resolve_hookpoints(subject.model, [cfg.hookpoint])
    if len(hps) != 1:
        raise UserError(f"SAE training needs one hookpoint; {cfg.hookpoint!r} matches "
                        f"{len(hps)} (pass --distribute-hookpoints for one SAE each)")
    contexts = iter_contexts(iter_texts(cfg.corpus), subject.tokenizer, cfg.ctx_len,
                             cfg.max_tokens + cfg.eval_tokens)
    batch: list[list[int]] = []
    with capture(subject.model, hps) as store:
        for i, c in enumerate(contexts):
            if i < skip_contexts:
                continue
            batch.append(c)
            if len(batch) == cfg.model_batch:
                yield _acts(subject.model, batch, store, hps[0], cfg.skip_first)
                batch = []
        if batch:
            yield _acts(subject.model, batch, store, hps[0], cfg.skip_first)


def _acts(model: Any, batch: list[list[int]], store: dict[str, Any], hp: str,
          skip_first: bool) -> Any:
    from neuroscribe.models import run_to_hooks

    ids = torch.tensor(batch, device=next(model.parameters()).device)
    with torch.inference_mode():
        a = run_to_hooks(model, ids, store)[hp].float()
    a = a[:, 1:] if skip_first else a
    return a.reshape(-1, a.shape[-1]).clone()  # a normal tensor, outside inference mode


def split_eval(chunks: Iterator[Any], n_eval: int) -> tuple[Any, Iterator[Any]]:
    """Take the first ``n_eval`` tokens off the stream as the held-out set."""
    held: list[Any] = []
    have = 0
    for c in chunks:
        if have >= n_eval:
            def rest(first: Any = c) -> Iterator[Any]:
                yield first
                yield from chunks
            return torch.cat(held)[:n_eval], rest()
        held.append(c)
        have += len(c)
    raise UserError(f"the source has fewer than eval_tokens={n_eval} tokens plus training data")


def shuffled(chunks: Iterator[Any], batch_size: int, buffer_tokens: int,
             seed: int) -> Iterator[Any]:
    """Mix tokens from many contexts: fill a buffer, emit random half of it in batches, refill."""
    gen = torch.Generator().manual_seed(seed)
    buf: list[Any] = []
    size = 0
    for c in chunks:
        buf.append(c)
        size += len(c)
        if size >= buffer_tokens:
            x = torch.cat(buf)
            x = x[torch.randperm(len(x), generator=gen)]
            n_out = (len(x) // 2) // batch_size * batch_size
            yield from x[:n_out].split(batch_size)
            buf, size = [x[n_out:]], len(x) - n_out
    if buf:
        x = torch.cat(buf)
        x = x[torch.randperm(len(x), generator=gen)]
        yield from (b for b in x.split(batch_size) if len(b) == batch_size)


# ---- the cached store -----------------------------------------------------------------------

def write_store(chunks: Iterator[Any], folder: Path, shard_tokens: int = 262_144,
                config: Any = None) -> Iterator[Any]:
    """Write chunks to shards as they pass (and pass them on): stream once, store once."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sizes: list[int] = []
    pending: list[Any] = []

    def flush() -> None:
        x = torch.cat(pending).cpu().contiguous()
        with atomic_path(folder / f"{len(sizes):05d}.safetensors") as tmp:
            save_file({"acts": x}, str(tmp))
        sizes.append(len(x))
        pending.clear()

    for c in chunks:
        pending.append(c)
        if sum(len(p) for p in pending) >= shard_tokens:
            flush()
        yield c
    if pending:
        flush()
    info = {"shards": sizes, "d_in": int(c.shape[-1]) if sizes else 0, "complete": True,
            "config": asdict(config) if config is not None else None}
    write_json(folder / "store.json", info)


def read_store_info(folder: Path) -> dict[str, Any]:
    path = folder / "store.json"
    if not path.exists():
        raise UserError(f"{folder} is not a complete activation store (no store.json)")
    return json.loads(path.read_text())


def store_batches(folder: Path, batch_size: int, seed: int, start_step: int = 0,
                  window: int = 4, epochs: int = 1) -> Iterator[Any]:
    """Batches from a store: shards in a seeded order, ``window`` shards at a time shuffled
    together. Each window's remainder (< batch_size tokens) is dropped."""
    from safetensors.torch import load_file

    sizes = read_store_info(folder)["shards"]
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed + epoch))
        for w, start in enumerate(range(0, len(order), window)):
            ids = order[start:start + window].tolist()
            n_batches = sum(sizes[i] for i in ids) // batch_size
            if step + n_batches <= start_step:  # skipped without reading
                step += n_batches
                continue
            x = torch.cat([load_file(str(folder / f"{i:05d}.safetensors"))["acts"] for i in ids])
            g = torch.Generator().manual_seed(seed * 100_003 + epoch * 1009 + w)
            x = x[torch.randperm(len(x), generator=g)]
            for b in range(n_batches):
                if step >= start_step:
                    yield x[b * batch_size:(b + 1) * batch_size]
                step += 1


def tensor_batches(x: Any, batch_size: int, seed: int, start_step: int = 0,
                   epochs: int = 1) -> Iterator[Any]:
    """Batches of an in-memory ``[N, d_in]`` tensor, reshuffled each epoch (deterministic)."""
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for b in range(len(x) // batch_size):
            if step >= start_step:
                yield x[perm[b * batch_size:(b + 1) * batch_size]]
            step += 1
