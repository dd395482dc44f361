"""De-quantized GGUF subjects, cached on disk.

transformers de-quantizes every tensor of a GGUF file on each load (about 18 s for
SmolLM2-135M on 2 CPU cores, before the first token). The first load saves the float weights
and the tokenizer as a plain transformers folder under ``<cache>/subjects/<sha256>-<dtype>``,
keyed by the file's content hash, and later loads read that folder instead (well under a
second). The hash of a file is remembered by (path, size, mtime), so a large file is hashed
once. ``NEUROSCRIBE_SUBJECT_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("neuroscribe")


def root() -> Path:
    from neuroscribe.corpus import cache_dir

    return cache_dir() / "subjects"


def enabled() -> bool:
    return os.environ.get("NEUROSCRIBE_SUBJECT_CACHE", "1") not in ("0", "false", "no")


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, remembered by (real path, size, mtime)."""
    st = path.stat()
    memo_key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    memo = root() / "digests.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if memo_key in known:
        return str(known[memo_key])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    known[memo_key] = h.hexdigest()
    from neuroscribe.runs import write_json

    write_json(memo, known)
    return h.hexdigest()


def folder_for(gguf: Path, dtype: str) -> Path:
    return root() / f"{file_digest(gguf)}-{dtype}"


def lookup(gguf: Path, dtype: str) -> Path | None:
    """The cached folder of this file and dtype, if a complete one exists."""
    if not enabled():
        return None
    folder = folder_for(gguf, dtype)
    return folder if (folder / ".complete").exists() else None


def store(gguf: Path, dtype: str, model: Any, tokenizer: Any) -> Path | None:
    """Save a model loaded from ``gguf`` (de-quantized) and its tokenizer; another process
    writing the same entry at once is harmless (each writes its own folder, then renames)."""
    if not enabled():
        return None
    folder = folder_for(gguf, dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        # The weights are plain tensors now; the GGUF quantizer only refuses to serialise.
        quantizer = getattr(model, "hf_quantizer", None)
        had_qcfg = hasattr(model.config, "quantization_config")
        qcfg = getattr(model.config, "quantization_config", None)
        model.hf_quantizer = None
        if had_qcfg:
            del model.config.quantization_config
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if had_qcfg:
                model.config.quantization_config = qcfg
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps({"source": str(gguf), "dtype": dtype}))
        with contextlib.suppress(OSError):  # another process finished first: the same copy
            os.replace(tmp, folder)
    except OSError as e:  # a full disk or a read-only cache: load without caching
        log.warning("could not cache the de-quantized model in %s: %s", folder.parent, e)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
