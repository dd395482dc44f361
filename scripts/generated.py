"""Pages that scripts generate from the code or the data, and the check that they are current."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(out: Path, text: str, command: str) -> int:
    """With ``--check`` on the command line: 1 (and a message) if ``out`` differs from
    ``text``, else 0. Without: write ``text`` to ``out``."""
    if "--check" in sys.argv[1:]:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run {command}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0
