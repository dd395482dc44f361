"""Tools of the FIND interpretability agent beyond calling f.

``FIT: <model>`` fits a model of FIND's op grammar to every numeric observation so far by
least squares (``find_fit``): one family, or two joined by ``+`` (sum) or ``*`` (product),
with a corrupted interval where f is constant when that explains the data better. The LLM
chooses the model and reads back the formula and its error; its final answer may then use
the code of a fit (``CODE: FIT <n>``) instead of writing the numbers out. Family names and
their aliases are data (``fit`` in ``data/find/aia.json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelFit:
    """One FIT tool call: the model asked for, and what the least squares fit found."""

    spec: str  # the model as the tool understood it, e.g. "cos + linear"
    formula: str  # the fitted description, with its corrupted interval if any
    code: str  # Python code defining f
    interval: list[float] | None
    nmse: float  # on the observations it was fitted to
    n: int  # observations it was fitted to


def parse_fit(text: str, aliases: dict[str, str]) -> tuple[list[str], str] | None | str:
    """The families and kind (atomic, sum, product) of a ``FIT: <model>`` reply: the first two
    parts between ``+`` or ``*`` that name a family (by its longest alias), joined as a sum
    when the line has a ``+`` and as a product otherwise. None when the reply has no FIT
    line, and a message when it names no known family."""
    m = re.search(r"FIT:\s*(.+)", text)
    if not m:
        return None
    line = m.group(1).strip().lower().replace("×", "*")
    ops = []
    for part in re.split(r"[+*]", line):
        found = [(len(a), name) for a, name in aliases.items()
                 if re.search(rf"(?<![a-z_]){re.escape(a)}(?![a-z_])", part)]
        if found:
            ops.append(max(found)[1])
    if not ops:
        return f"no known model family in {line[:60]!r}"
    kind = "atomic" if len(ops) == 1 else "sum" if "+" in line else "product"
    return ops[:2], kind


def model_name(ops: list[str], kind: str, names: dict[str, str] | None = None) -> str:
    """A model as shown to the agent, e.g. "sin + linear"."""
    shown = [(names or {}).get(o, o) for o in ops]
    return {"atomic": shown[0], "sum": " + ".join(shown), "product": " * ".join(shown)}[kind]


def _arrays(points: list[tuple[float, float]]) -> tuple[Any, Any]:
    """x and y of the points with a finite y, one per x, in order of x."""
    import numpy as np

    pts = sorted({x: y for x, y in points if np.isfinite(y)}.items())
    return np.array([x for x, _ in pts], float), np.array([y for _, y in pts], float)


def run_fit(points: list[tuple[float, float]], ops: list[str], kind: str,
            names: dict[str, str] | None = None) -> ModelFit | str:
    """Least squares fit of the named model to ``points`` (x, y); a message when too few.
    Its error is FIND's NMSE of the fit's own code on the points outside the stated
    corrupted interval (the code is the model everywhere, as FIND scores the clean
    function)."""
    import numpy as np

    from neuroscribe.find.eval import nmse
    from neuroscribe.find.fit import numeric_code, solve_named

    x, y = _arrays(points)
    if len(x) < 6:
        return f"too few observations to fit ({len(x)}); CALL f on more inputs first"
    with np.errstate(all="ignore"):
        result = solve_named(x, y, ops, kind)
    code, formula, interval = numeric_code(result)
    ns: dict[str, Any] = {}
    exec(compile(code, "<fit>", "exec"), ns)  # our own generated code, not the LLM's
    if interval is not None:
        keep = (x < interval[0]) | (x > interval[1])
        x, y = (x[keep], y[keep]) if keep.sum() >= 6 else (x, y)
    try:
        err = nmse(list(y), [float(ns["f"](v)) for v in x])
    except (OverflowError, ValueError, ZeroDivisionError):
        err = float("inf")
    err = err if np.isfinite(err) else float("inf")
    return ModelFit(model_name(ops, kind, names), formula, code, interval, err, len(x))


def family_ranking(points: list[tuple[float, float]], p: dict[str, Any]) -> str:
    """One line: the ``p["rank_n"]`` families that alone fit ``points`` best, with their
    error (NMSE), as the agent's quick look at the shape of f."""
    import numpy as np

    from neuroscribe.find.fit import best_single

    x, y = _arrays(points)
    if len(x) < 6:
        return ""
    scale = max(float(((y - y.mean()) ** 2).sum()), 1e-12)
    with np.errstate(all="ignore"):  # a reciprocal pole on an observed x
        fits = sorted(best_single(x, y), key=lambda f: f.sse)[: p["rank_n"]]
    names = p.get("names", {})
    return p["rank"].format(items=", ".join(
        f"{names.get(f.ops[0], f.ops[0])} {_error(f.sse / scale)}" for f in fits))


def _error(v: float) -> str:
    return f"{v:.2g}" if v >= 1e-6 else "0"


def fit_lines(fits: list[ModelFit], p: dict[str, Any]) -> list[str]:
    """The fits so far as prompt lines, numbered in call order, lowest error first."""
    order = sorted(range(len(fits)), key=lambda i: fits[i].nmse)
    return [p["header"]] + [
        p["line"].format(n=i + 1, spec=fits[i].spec, nmse=_error(fits[i].nmse), points=fits[i].n,
                         formula=_short(fits[i].formula, p["max_chars"])) for i in order]


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def use_fit(reply: str, fits: list[ModelFit]) -> tuple[str, ModelFit | None]:
    """The reply with ``CODE: FIT <n>`` replaced by the code of fit n (the lowest-error fit
    when n names no fit, as in a copied ``FIT <n>``), and that fit; the reply unchanged when
    it has no such line or there are no fits."""
    m = re.search(r"CODE:\s*\**\s*FIT\b[^\n]*", reply)
    if not m or not fits:
        return reply, None
    n = re.match(r"FIT\s*#?(\d+)", m.group(0)[m.group(0).index("FIT"):])
    ok = n is not None and 1 <= int(n.group(1)) <= len(fits)
    fit = fits[int(n.group(1)) - 1] if n and ok else min(fits, key=lambda f: f.nmse)
    return reply[: m.start()] + f"CODE:\n```python\n{fit.code}```\n", fit
