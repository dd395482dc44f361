"""A registry of named implementations, imported on first use.

Entries are ``"module:attribute"`` paths, so a module that registers its implementations never
imports its own importers (no import cycles), and heavy modules load only when chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import Any


class Registry(MutableMapping[str, Any]):
    """``name -> object``; a value given as ``"module:attribute"`` is imported when read."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> Any:
        value = self._entries[name]
        if isinstance(value, str):
            module, _, attr = value.partition(":")
            value = self._entries[name] = getattr(importlib.import_module(module), attr)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
