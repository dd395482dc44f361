"""The offline agent's search over FIND's string families (``find_strings``): every family
with every parameter it can take, alone or as ``outer(inner(s))``.

Parameters that cannot be enumerated are read off the observations: the letters a
``replace_substring`` may replace come from the probes and what they become from the
outputs, a concatenated suffix from the outputs' ends, and ``map_string``'s permutation from
the letters of equal-length pairs. A composition is checked on the first probe before the
others, so most of the pairs cost one call.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from typing import Any

Step = tuple[str, dict[str, Any]]
PROBES = ["the quick brown fox jumps over the lazy dog", "Hello World 42", "banana",
          "abcdefghijklmnopqrstuvwxyz", "Mississippi River 2024", "a1b2C3 d4E5", "xyz",
          "Quiz Of The Month", "AEIOU aeiou", "z", "programming language 7", "Zebra"]


def _params(kind: str, probes: list[str], outputs: list[Any]) -> Iterator[dict[str, Any]]:
    letters = string.ascii_letters
    if kind == "none":
        yield {}
    elif kind == "digit":
        yield from ({"n": n} for n in range(1, 10))
    elif kind == "letter":
        yield from ({"c": c} for c in letters)
    elif kind == "shift":
        yield from ({"k": k} for k in range(26))
    elif kind == "index_pair":
        yield from ({"i": i, "j": j} for i in range(10) for j in range(10) if i != j)
    elif kind == "letter_pair":
        seen_in = {c for p in probes for c in p if c in letters}
        seen_out = {c for o in outputs if isinstance(o, str) for c in o if c in letters}
        yield from ({"old": a, "new": b} for a in sorted(seen_in) for b in sorted(seen_out)
                    if a != b)
    elif kind == "letters":
        out = outputs[0] if outputs and isinstance(outputs[0], str) else ""
        yield from ({"t": out[-k:]} for k in range(1, 6) if len(out) >= k
                    and all(c in letters for c in out[-k:]))
    elif kind == "permutation":
        m: dict[str, str] = {}
        for p, o in zip(probes, outputs):
            if isinstance(o, str) and len(o) == len(p):
                for a, b in zip(p.lower(), o):
                    if a in string.ascii_lowercase:
                        m.setdefault(a, b)
        if len(m) == 26 and len(set(m.values())) == 26:
            yield {"mapping": "".join(m[c] for c in string.ascii_lowercase)}


def candidates(probes: list[str], outputs: list[Any]) -> list[tuple[Step, Callable[[str], Any]]]:
    """Every (family, params) with a callable, built in one namespace with FIND's helpers."""
    from neuroscribe.find.strings import family_source, load_families, load_spec

    ns: dict[str, Any] = {}
    exec("import random\nimport string\n" + load_spec()["prelude"], ns)  # noqa: S102 - ours
    out: list[tuple[Step, Callable[[str], Any]]] = []
    for fam, spec in sorted(load_families().items()):
        for k, p in enumerate(_params(spec["params"], probes, outputs)):
            name = f"_{fam}_{k}"
            exec(family_source(fam, p, name), ns)  # noqa: S102 - our own families
            out.append(((fam, p), ns[name]))
    return out


def _safe(fn: Callable[[Any], Any], x: Any) -> Any:
    try:
        return fn(x)
    except Exception:  # noqa: BLE001 - a candidate that fails on an input is just wrong
        return object()


def search_strings(probes: list[str], outputs: list[Any],
                   cands: list[tuple[str, dict[str, Any], Callable[[str], Any]]]
                   ) -> list[tuple[str, dict[str, Any]]] | None:
    """The shortest chain (1 or 2 transformations) that maps every probe to its output."""
    want = tuple(outputs)
    firsts: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    for name, params, fn in cands:
        got = tuple(_safe(fn, p) for p in probes)
        if got == want:
            return [(name, params)]
        if name != "count":
            firsts.setdefault(got, (name, params))
    for got, first in firsts.items():
        for name, params, fn in cands:
            if _safe(fn, got[0]) == want[0] and all(
                    _safe(fn, g) == w for g, w in zip(got[1:], want[1:])):
                return [first, (name, params)]
    return None


def search(probes: list[str], outputs: list[Any]) -> list[Step] | None:
    """The steps, innermost first, of one family or a composition of two that maps every
    probe to its output; None when none does (``search_strings`` does the search over
    these candidates)."""
    cands = candidates(probes, list(outputs))
    return search_strings(probes, list(outputs), [(f, p, fn) for (f, p), fn in cands])


def steps_answer(steps: list[Step]) -> tuple[str, str]:
    """Code defining ``f`` and a description, inner step first."""
    from neuroscribe.find.strings import build_code, describe

    desc = "; then ".join(describe(f, p) for f, p in steps)
    return build_code(steps), desc
