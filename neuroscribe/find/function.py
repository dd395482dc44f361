"""One function of a FIND-style suite: what an agent may call and what it is scored against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DOMAIN = (-128.0, 128.0)


@dataclass(frozen=True)
class FindFunction:
    id: str
    category: str  # numeric, string, entity, puzzle
    op: str  # family, "sum_two:a;b" / "multiply_two:a;b", string op, "entity", "puzzle"
    description: str
    domain: str
    code: str
    params: dict[str, Any] = field(default_factory=dict)
    interval: list[float] | None = None  # corrupted interval within DOMAIN (numeric)


def eval_points() -> list[float]:
    """FIND's evaluation inputs: x = i + 0.5 for i in [-128, 128)."""
    return [i + 0.5 for i in range(-128, 128)]
