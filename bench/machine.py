"""What every benchmark records about the machine and the code it measured."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_rev() -> str | None:
    """The commit of the working tree, with "+dirty" when it has uncommitted changes."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--short") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes on the machine skew timings."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
