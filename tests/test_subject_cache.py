"""The de-quantized GGUF cache: keyed by the file's bytes, reused, and equal to a fresh load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_digest_follows_the_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroscribe import subject_cache

    monkeypatch.setenv("NEUROSCRIBE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc")
    a = subject_cache.file_digest(f)
    assert a == subject_cache.file_digest(f)  # remembered
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))  # a new mtime and new bytes: a new key
    assert subject_cache.file_digest(f) != a
    assert subject_cache.lookup(f, "float32") is None


def test_store_then_lookup_loads_the_same_model(tiny_model: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroscribe import subject_cache

    monkeypatch.setenv("NEUROSCRIBE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"stands for a gguf file")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    folder = subject_cache.store(src, "float32", model, tok)
    assert folder is not None and subject_cache.lookup(src, "float32") == folder
    assert subject_cache.lookup(src, "bfloat16") is None  # a dtype has its own entry
    again = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert subject_cache.store(src, "float32", model, tok) == folder  # a second writer: harmless
    monkeypatch.setenv("NEUROSCRIBE_SUBJECT_CACHE", "0")
    assert subject_cache.lookup(src, "float32") is None


@pytest.mark.integration
def test_smollm2_second_load_skips_dequantizing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from neuroscribe.models import load_subject

    monkeypatch.setenv("NEUROSCRIBE_CACHE", str(tmp_path / "cache"))
    first = load_subject("smollm2")
    ids = torch.tensor([first.tokenizer("To be, or not to be: 10 cats")["input_ids"]])

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", refuse)
    second = load_subject("smollm2")
    assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert first.token_strings() == second.token_strings()
