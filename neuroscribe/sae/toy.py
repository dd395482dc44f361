"""Toy subject: a one-layer transformer with a 512-neuron ReLU MLP, trained on a corpus, as in
Anthropic's *Towards Monosemanticity* (at a far smaller scale).

The model is a transformers ``GPT2LMHeadModel`` saved as a local folder (config, safetensors
weights, tokenizer), so every stage loads it like any subject: ``--model runs/toy``. Its MLP
neurons are the hookpoint ``transformer.h.0.mlp.act``. The tokenizer is a byte-level BPE
trained on the same corpus (8192 tokens by default): with SmolLM2's 49152-token vocabulary the
unembedding costs ~30x the transformer layer and training on 2 CPU cores is ~8x slower.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroscribe.corpus import iter_texts
from neuroscribe.runs import claim_stage, opt, save_stage, write_json

log = logging.getLogger("neuroscribe")
NEURONS = "transformer.h.0.mlp.act"  # the hookpoint of the 512 MLP neurons
EOT = "<|endoftext|>"


@dataclass
class ToyConfig:
    """How to build and train the one-layer toy transformer."""

    corpus: str = opt("default", "training text: 'default' (Gutenberg Shakespeare), files, "
                      "folders or globs (comma-separated)")
    vocab_size: int = opt(8192, "byte-level BPE vocabulary trained on the corpus (0: SmolLM2's "
                          "49152-token tokenizer)")
    d_model: int = opt(128, "residual stream width (Anthropic: 128)")
    d_mlp: int = opt(512, "MLP neurons (Anthropic: 512)")
    n_heads: int = opt(4, "attention heads")
    ctx_len: int = opt(128, "tokens per training window (and the model's context length)")
    batch_size: int = opt(16, "windows per step")
    steps: int = opt(2500, "optimizer steps (tokens seen: steps x batch_size x ctx_len)")
    lr: float = opt(2e-3, "peak AdamW learning rate (linear warm-up, cosine decay to 10%)")
    warmup: int = opt(100, "warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay")
    val_frac: float = opt(0.02, "tail of the token stream held out for the validation loss")
    eval_every: int = opt(250, "steps between validation losses")
    seed: int = opt(0, "seed of the initialisation and the window sampling")
    device: str = opt("cpu", "torch device: cpu, cuda, mps")


def make_tokenizer(cfg: ToyConfig) -> Any:
    """A byte-level BPE trained on the corpus, or SmolLM2's own tokenizer (vocab_size 0)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.vocab_size == 0:
        from neuroscribe.models import default_model_path

        path = default_model_path()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(iter_texts(cfg.corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT)


def tokenize(corpus: str, tokenizer: Any) -> Any:
    """The whole corpus as one int64 tensor of token ids."""
    import torch

    ids: list[int] = []
    for text in iter_texts(corpus):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_model(cfg: ToyConfig, tokenizer: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    mc = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.ctx_len, n_embd=cfg.d_model,
                    n_layer=1, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                    activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(mc)


def unigram_loss(ids: Any, vocab: int) -> float:
    """Cross-entropy (nats) of the corpus' own unigram distribution: the bar to beat."""
    import torch

    p = torch.bincount(ids, minlength=vocab).double() / len(ids)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def train_toy(cfg: ToyConfig, out: Path, resume: bool = False) -> Path:
    """Train the toy model into ``out``; with ``resume``, a finished same-config run is kept."""
    import torch
    from tqdm import tqdm

    if claim_stage(out, "toy", cfg, resume):
        log.info("toy: %s already trained with this config", out)
        return out
    save_stage(out, "toy", cfg, complete=False)  # guards the folder while it trains
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer = make_tokenizer(cfg)
    ids = tokenize(cfg.corpus, tokenizer)
    n_val = int(len(ids) * cfg.val_frac)
    train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    model = make_model(cfg, tokenizer).to(cfg.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                              betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        n = (len(val_ids) - 1) // cfg.ctx_len * cfg.ctx_len
        x = val_ids[:n].view(-1, cfg.ctx_len)
        losses = [model(input_ids=b.to(cfg.device), labels=b.to(cfg.device)).loss.item()
                  for b in x.split(cfg.batch_size)]
        model.train()
        return sum(losses) / max(1, len(losses))

    logs: dict[str, list[float]] = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    bar = tqdm(range(cfg.steps), desc="toy", unit="step", disable=None)
    for step in bar:
        starts = torch.randint(0, len(train_ids) - cfg.ctx_len, (cfg.batch_size,), generator=gen)
        x = torch.stack([train_ids[s: s + cfg.ctx_len] for s in starts]).to(cfg.device)
        for g in optim.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        logs["step"].append(step)
        logs["loss"].append(round(loss.item(), 4))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            logs["val_step"].append(step + 1)
            logs["val_loss"].append(round(val_loss(), 4))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{logs['val_loss'][-1]:.3f}")
            log.info("toy: step %d, loss %.3f, val loss %.3f", step + 1, loss.item(),
                     logs["val_loss"][-1])
    seconds = time.perf_counter() - t0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {"corpus_tokens": len(ids), "train_tokens": cfg.steps * cfg.batch_size * cfg.ctx_len,
               "unigram_loss": round(unigram_loss(train_ids, len(tokenizer)), 4),
               "final_val_loss": logs["val_loss"][-1], "seconds": round(seconds, 1),
               "n_params": sum(p.numel() for p in model.parameters()), "hookpoint": NEURONS}
    write_json(out / "train_log.json", {**summary, **logs})
    save_stage(out, "toy", cfg, complete=True, **summary)
    log.info("toy: val loss %.3f (unigram %.3f) in %.0fs -> %s", summary["final_val_loss"],
             summary["unigram_loss"], seconds, out)
    return out
