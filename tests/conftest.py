"""Shared fixtures: a tiny randomly initialised GPT-2 with its own tokenizer, and a corpus.

Everything is built in a temporary folder at test time, offline, in about a second.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

SENTENCE = ("the cat sat on a mat while red birds sang about green hills and the king said "
            "that seven blue ships came over the sea in May with gold and salt")
WORDS = tuple(SENTENCE.split(" "))


def make_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
                     + rng.choice([".", "!", "?", ","]) for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text())
    return path


def build_tiny_gpt2(out: Path, corpus: Path, extra_tokens: tuple[str, ...] = (),
                    n_positions: int = 128) -> Path:
    """Save a 2-layer GPT-2 (d_model 32) with a 300-token byte-level BPE trained on ``corpus``
    (plus ``extra_tokens``, each kept as one token) into ``out``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import decoders as dec
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = dec.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(fast), n_positions=n_positions, n_embd=32, n_layer=2,
                     n_head=2, n_inner=64)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A local transformers folder: 2-layer GPT-2 (d_model 32) and a byte-level BPE tokenizer."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), corpus_file)
