"""The toy one-layer transformer of the SAE replication: it learns, saves and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuroscribe.errors import UserError
from neuroscribe.sae.toy import NEURONS, ToyConfig, train_toy, unigram_loss


def test_unigram_loss_matches_hand_computed() -> None:
    import math

    import torch

    ids = torch.tensor([0, 0, 1, 2])  # p = 1/2, 1/4, 1/4
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert unigram_loss(ids, 5) == pytest.approx(want)


def test_toy_learns_saves_and_resumes(tmp_path: Path, corpus_file: Path) -> None:
    import torch

    from neuroscribe.models import load_subject

    cfg = ToyConfig(corpus=str(corpus_file), vocab_size=300, d_model=32, d_mlp=64, n_heads=2,
                    ctx_len=32, batch_size=8, steps=40, lr=1e-2, warmup=5, eval_every=20,
                    val_frac=0.1)
    out = tmp_path / "toy"
    train_toy(cfg, out)
    log = json.loads((out / "train_log.json").read_text())
    # The test corpus draws words uniformly from a 27-word sentence: a model that learned
    # anything beyond token frequencies beats the unigram loss on the held-out tail.
    assert log["final_val_loss"] < log["unigram_loss"] - 0.3
    assert log["loss"][-1] < log["loss"][0] - 1.0

    subject = load_subject(str(out))
    module = subject.model.get_submodule(NEURONS)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    ids = subject.tokenizer("the cat sat on a mat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        subject.model(input_ids=ids)
    handle.remove()
    assert seen[0].shape == (1, ids.shape[1], 64)
    assert float(seen[0].min()) >= 0.0  # ReLU neurons

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    train_toy(cfg, out, resume=True)  # same config: kept, not retrained
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="different run"):
        train_toy(ToyConfig(**{**cfg.__dict__, "steps": 41}), out, resume=True)
