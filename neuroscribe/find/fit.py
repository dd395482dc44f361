"""Symbolic regression over FIND's op grammar, for the offline agent and the AIA's FIT tool.

Each op family is a set of candidate nonlinear parameters (a grid) and, per candidate, a few
basis columns; amplitudes and an offset are then linear, so every candidate of a family is
fitted at once by batched least squares. Sums are found by backfitting two families, products
by fitting ``(g1 + u) (g2 + v)`` around the best single fits, and a corrupted interval by a
prefix-sum search for the interval where a constant explains the residual best. Models are
compared by BIC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuroscribe.find.families import COMPOUND_PARTS, FIXED, NAMES, NONLINEAR, SEARCHED, Columns


def _f(v: float) -> str:
    return f"{float(v):.8g}"


@dataclass
class Fit:
    sse: float
    n_params: int
    exprs: list[str]  # basis expressions; the model is offset + sum(coef * expr)
    coef: list[float]
    offset: float
    ops: list[str] = field(default_factory=list)
    pred: np.ndarray | None = None  # values at the points it was fitted on

    def expression(self) -> str:
        terms = [_f(self.offset)] + [f"{_f(c)} * ({e})" for c, e in zip(self.coef, self.exprs)]
        return " + ".join(terms)

    def bic(self, n: int) -> float:
        return n * math.log(max(self.sse, 1e-12) / n) + self.n_params * math.log(n)


Best = tuple[int, float, np.ndarray, float, np.ndarray]


def batched_fit(vals: np.ndarray, y: np.ndarray) -> Best:
    """Least squares with an intercept for every candidate of ``vals`` (T, k, n) at once:
    the best candidate, its SSE, coefficients, offset and predictions."""
    yc = y - y.mean()
    if vals.shape[1] == 0:
        return 0, float(yc @ yc), np.zeros(0), float(y.mean()), np.full(len(y), y.mean())
    vc = vals - vals.mean(-1, keepdims=True)
    a = vc @ vc.transpose(0, 2, 1)
    eye = np.eye(vals.shape[1])
    a = a + (1e-9 * np.einsum("tkk->tk", a)[:, :, None] + 1e-12) * eye  # relative ridge
    b = vc @ yc
    coef = np.linalg.solve(a, b[..., None])[..., 0]
    sse = yc @ yc - (coef * b).sum(-1)
    sse = np.where(np.isfinite(sse), sse, np.inf)
    t = int(np.argmin(sse))
    off = float(y.mean() - coef[t] @ vals[t].mean(-1))
    return t, float(max(sse[t], 0.0)), coef[t], off, off + coef[t] @ vals[t]


def fit_family(name: str, x: np.ndarray, y: np.ndarray,
               times: tuple[np.ndarray, str] | None = None) -> Fit:
    """Best member of a family; with ``times`` = (g, expr), of ``(g + u) * (family + v)``."""
    target = y
    if times is not None and name in SEARCHED:  # search on y / g where g is not near 0
        g = times[0]
        big = np.abs(g) > 0.1 * np.abs(g).max()
        target = np.where(big, y / np.where(big, g, 1.0), 0.0)
    vals, exprs = _columns(name, x, target)
    n_nonlin = NONLINEAR.get(name, 0)
    if times is None:
        t, sse, coef, off, pred = batched_fit(vals, y)
        return Fit(sse, n_nonlin + vals.shape[1] + 1, exprs[t], list(coef), off, [name], pred)
    g, gexpr = times
    both = np.concatenate([vals * g, vals, np.broadcast_to(g, (vals.shape[0], 1, len(x)))], 1)
    t, sse, coef, off, pred = batched_fit(both, y)
    ex = [f"({gexpr}) * ({e})" for e in exprs[t]] + exprs[t] + [gexpr]
    return Fit(sse, n_nonlin + both.shape[1] + 3, ex, list(coef), off, [name], pred)


_CACHE: dict[tuple[str, bytes], Columns] = {}


def _columns(name: str, x: np.ndarray, y: np.ndarray) -> Columns:
    """A family's candidate columns at ``x`` (a searched family's, for ``y``), cached for the
    last few point sets."""
    key = (name, x.tobytes(), y.tobytes() if name in SEARCHED else b"")
    if key not in _CACHE:
        if len(_CACHE) > 8 * len(NAMES):
            _CACHE.clear()
        _CACHE[key] = SEARCHED[name](x, y) if name in SEARCHED else FIXED[name](x)
    return _CACHE[key]


def best_single(x: np.ndarray, y: np.ndarray) -> list[Fit]:
    with np.errstate(all="ignore"):
        fits = [fit_family(n, x, y) for n in NAMES]
    return sorted(fits, key=lambda f: f.bic(len(x)))


def _pred(fit: Fit) -> np.ndarray:
    assert fit.pred is not None
    return fit.pred


def _add(a: Fit, b: Fit, y: np.ndarray) -> Fit:
    pred = _pred(a) + _pred(b)
    return Fit(float(((y - pred) ** 2).sum()), a.n_params + b.n_params - 1, a.exprs + b.exprs,
               a.coef + b.coef, a.offset + b.offset, a.ops + b.ops, pred)


def fit_sum(x: np.ndarray, y: np.ndarray, first: Fit, second: str | None = None) -> Fit:
    """Backfit: a second family (the best one, or ``second``) on the residual of the first,
    then the first again."""
    names = [second] if second else COMPOUND_PARTS
    b = min((fit_family(n, x, y - _pred(first)) for n in names), key=lambda f: f.sse)
    return _add(fit_family(first.ops[0], x, y - _pred(b)), b, y)


def fit_product(x: np.ndarray, y: np.ndarray, seeds: list[Fit],
                second: str | None = None) -> Fit | None:
    """``(seed + u) * (family + v)`` for each seed and family (or only ``second``)."""
    fits = []
    for s in seeds:
        g = _pred(s) - s.offset
        if np.ptp(g) < 1e-9:
            continue
        gexpr = " + ".join(f"{_f(c)} * ({e})" for c, e in zip(s.coef, s.exprs))
        for n in [second] if second else COMPOUND_PARTS:
            f = fit_family(n, x, y, times=(g, gexpr))
            f.ops = [s.ops[0], n]
            f.n_params += s.n_params - 1
            fits.append(f)
    return min(fits, key=lambda f: f.bic(len(x))) if fits else None


def fit_model(x: np.ndarray, y: np.ndarray, n_seeds: int = 2,
              singles: list[Fit] | None = None) -> tuple[Fit, str]:
    """The best of single, sum and product models by BIC, and which kind it is."""
    singles = singles or best_single(x, y)
    cands = [(singles[0], "atomic")]
    cands += [(fit_sum(x, y, s), "sum") for s in singles[:n_seeds]]
    if (prod := fit_product(x, y, singles[:n_seeds])) is not None:
        cands.append((prod, "product"))
    return min(cands, key=lambda c: c[0].bic(len(x)))


def find_interval(x: np.ndarray, y: np.ndarray, resid: np.ndarray,
                  step: int | None = None) -> tuple[float, float, float, float] | None:
    """The interval [x_i, x_j] where replacing the model by a constant lowers the SSE most:
    (lo, hi, constant, SSE saved), or None when nothing is saved. Its ends are searched
    every ``step`` points (every point below 200 points, else every second one)."""
    n = len(x)
    step = step or (1 if n < 200 else 2)
    r2 = np.concatenate([[0], np.cumsum(resid ** 2)])
    s1 = np.concatenate([[0], np.cumsum(y)])
    s2 = np.concatenate([[0], np.cumsum(y * y)])
    idx = np.unique(np.concatenate([np.arange(0, n + 1, step), [n]]))
    i, j = np.meshgrid(idx, idx, indexing="ij")
    ok = j - i >= 3
    i, j = i[ok], j[ok]
    cnt = j - i
    const_sse = (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / cnt
    saved = (r2[j] - r2[i]) - const_sse
    k = int(np.argmax(saved))
    if saved[k] <= 0:
        return None
    a, b = int(i[k]), int(j[k])
    return float(x[a]), float(x[b - 1]), float((s1[b] - s1[a]) / (b - a)), float(saved[k])


Model = Callable[[np.ndarray, np.ndarray], tuple[Fit, str]]


def with_interval(x: np.ndarray, y: np.ndarray, model: Model, seeds: list[Fit]) -> dict[str, Any]:
    """``model`` fitted to all points, or outside a corrupted interval where f is constant,
    whichever has the better BIC (an interval costs 3 parameters). Candidate intervals come
    from the residuals of the ``seeds`` fits."""
    n = len(x)
    fit, kind = model(x, y)
    best = (fit.bic(n), fit, kind, None)
    tried: list[tuple[float, float]] = []
    for seed in seeds:
        found = find_interval(x, y, y - _pred(seed))
        if found is None or any(abs(found[0] - a) < 2 and abs(found[1] - b) < 2
                                for a, b in tried):
            continue
        lo, hi, c, _ = found
        tried.append((lo, hi))
        inside = (x >= lo) & (x <= hi)
        if inside.all() or (~inside).sum() < 10:
            continue
        f, k = model(x[~inside], y[~inside])
        sse = f.sse + float(((y[inside] - c) ** 2).sum())
        bic = n * math.log(max(sse, 1e-12) / n) + (f.n_params + 3) * math.log(n)
        if bic < best[0]:
            best = (bic, f, k, (lo, hi, c))
    return {"fit": best[1], "kind": best[2], "interval": best[3]}


def solve_numeric(x: np.ndarray, y: np.ndarray, n_intervals: int = 2) -> dict[str, Any]:
    """The best model of the grammar plus a corrupted interval. Candidate intervals come from
    the residuals of the best atomic fits (before a composite can absorb the corruption)."""
    singles = best_single(x, y)
    return with_interval(x, y, lambda a, b: fit_model(a, b, singles=singles if a is x else None),
                         singles[:n_intervals])


COMBINE: dict[str, Callable[[np.ndarray, np.ndarray, Fit, str], Fit | None]] = {
    "sum": lambda x, y, first, second: fit_sum(x, y, first, second),
    "product": lambda x, y, first, second: fit_product(x, y, [first], second),
}


def fit_named(x: np.ndarray, y: np.ndarray, ops: list[str], kind: str) -> tuple[Fit, str]:
    """The best model of the named families: ``kind`` is atomic (one op), sum or product. A
    sum or product is fitted both ways round (each family's parameter grid is searched in
    full only when it comes second) and the better one kept."""
    first = fit_family(ops[0], x, y)
    if kind not in COMBINE:
        return first, "atomic"
    both = [COMBINE[kind](x, y, fit_family(a, x, y), b) for a, b in (ops, ops[::-1])]
    fits = [f for f in both if f is not None]
    return (min(fits, key=lambda f: f.sse), kind) if fits else (first, "atomic")


def solve_named(x: np.ndarray, y: np.ndarray, ops: list[str], kind: str) -> dict[str, Any]:
    """``fit_named`` plus a corrupted interval, found from the residual of its first op."""
    return with_interval(x, y, lambda a, b: fit_named(a, b, ops, kind),
                         [fit_family(ops[0], x, y)])


def numeric_code(result: dict[str, Any], lo_edge: float = -128.0, hi_edge: float = 128.0,
                 code_interval: bool = False) -> tuple[str, str, list[float] | None]:
    """Python code defining ``f``, a description, and the stated interval. FIND scores the
    code against the clean function, so a corrupted interval is stated (description and
    ``interval``), not coded; ``code_interval``: the interval is part of the function (a
    plateau f keeps), and the code returns its constant there."""
    fit: Fit = result["fit"]
    expr = fit.expression()
    lines = ["import math", "", "def f(x):", "    x = float(x)"]
    desc = f"{result['kind']} of {' and '.join(fit.ops)}: f(x) = {expr.replace('math.', '')}"
    interval = None
    if result["interval"] is not None:
        lo, hi, c = result["interval"]
        lo = lo_edge if lo <= lo_edge + 1 else lo
        hi = hi_edge if hi >= hi_edge - 1 else hi
        interval = [lo, hi]
        desc += f", except for x in [{lo:g}, {hi:g}] where it returns about {c:.3g}"
        if code_interval:
            cond = " and ".join([*([f"x >= {float(lo)!r}"] if lo > lo_edge else []),
                                 *([f"x <= {float(hi)!r}"] if hi < hi_edge else [])]) or "True"
            lines += [f"    if {cond}:", f"        return {_f(c)}"]
    lines += ["    try:", f"        return {expr}", "    except (ZeroDivisionError, ValueError):",
              "        return 0.0", ""]
    return "\n".join(lines), desc, interval
