"""Numeric functions drawn as FIND's generator draws them (``data/find/find_numeric.json``).

FIND (Schwettmann et al. 2023, ``src/make_functions/make_numeric``) draws 85% of its functions
from 16 families and 15% as the sum or product of two of 9 simpler ones, with parameters
rounded to one decimal. Each released function is one of three variants:

- **clean**: the function as written;
- **corrupted**: on an interval (``x <= a``, ``x >= a`` or ``a < x < b``) it returns
  normal noise (scale 0.1) around the function's mean over its domain;
- **noised**: one draw of normal, uniform or Poisson noise of scale 1 is added per call.

The code written here is FIND's code for the function (numpy, the same expressions and
quirks), plus ``f``: a float in, a float out (NaN where FIND's function gives no real
number). The noise comes from a seeded ``RandomState``, so a suite is reproducible.

FIND's evaluator (``src/evaluate_interpretations/mse_indicator.py``) scores an answer against
each folder's ``function_code.py``: the clean function, whichever variant the agent called.
So ``f_truth`` is the clean function, as FIND writes it: a simple family in full (a square
wave's period and shift included), a compound in FIND's one-line form. An agent that saw a
noised or corrupted variant is scored against the function without the noise or corruption.
"""

from __future__ import annotations

import json
import math
import random
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).parents[1] / "data" / "find" / "find_numeric.json"
EVAL_LO, EVAL_HI = -128.0, 128.0  # FIND's agents may probe [-128, 128]


@cache
def spec() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def _draw(rng: random.Random, kind: str, *args: float) -> Any:
    if kind == "u":
        return round(rng.uniform(args[0], args[1]), 1)
    if kind == "grid":
        lo, hi = args
        return round(lo + (hi - lo) * rng.randrange(100) / 99, 1)
    if kind == "int":
        return rng.randint(int(args[0]), int(args[1]))
    if kind == "poly":  # degree in [a0, a1]; coefficients, highest degree first
        d = rng.randint(int(args[0]), int(args[1]))
        return [round(rng.uniform(args[2], args[3]), 1) for _ in range(d + 1)]
    if kind == "rational":  # numerator order <= a0, denominator order in (num, a1]
        num = rng.randint(0, int(args[0]))
        den = rng.randint(num + 1, int(args[1]))
        return ([round(rng.uniform(args[2], args[3]), 1) for _ in range(num + 1)],
                [round(rng.uniform(args[2], args[3]), 1) for _ in range(den + 1)])
    raise ValueError(f"unknown parameter kind {kind!r} in {DATA.name}")


def sample_params(rng: random.Random, family: str) -> Any:
    """FIND's params: a tuple in FIND's order, a list (polynomial), an int (constant) or
    None (ceil, floor)."""
    ps = spec()["families"][family]["params"]
    if not ps:
        return None
    vals = [_draw(rng, kind, *args) for _, kind, *args in ps]
    if family in ("polynomial", "constant"):
        return vals[0]
    return tuple(vals[0]) if family == "rational" else tuple(vals)


def expression(family: str, params: Any, truncated: bool = False) -> str:
    """FIND's return expression for one family (``truncated``: the one-line form FIND keeps
    in compounds, corrupted and noised code, which turns a square wave into a sign)."""
    fam = spec()["families"][family]
    if truncated and "truncated" in fam:
        return fam["truncated"]
    if family == "polynomial":
        d = len(params) - 1
        return " + ".join(f"{c}*x**{d - k}" for k, c in enumerate(params))
    if family == "rational":
        num, den = ([f"{c}*x**{k}" for k, c in enumerate(cs)] for cs in params)
        return f"({' + '.join(num)}) / ({' + '.join(den)})"
    names = [p[0] for p in fam["params"]]
    vals = [params] if not isinstance(params, tuple) else list(params)
    return fam["code"].format(**dict(zip(names, vals)))


def find_name(families: list[str], params: list[Any], op: str = "") -> str:
    """The ``name`` FIND writes into data.json, e.g. ``absolute((26.8, -8.2))``."""
    head = ";".join([*families, op]) if op else families[0]
    ps = params if op else (params[0] if isinstance(params[0], list) else [params[0]])
    return f"{head}({', '.join(str(p) for p in ps)})"


def _clean_mean(expr: str, lo: float, hi: float) -> float:
    import numpy as np

    xs = np.linspace(lo, hi, 100)
    with np.errstate(all="ignore"):
        ys = np.asarray(eval(expr, {"np": np, "x": xs}), dtype=complex)  # noqa: S307 - ours
    return float(np.mean(ys).real)


def _variant(rng: random.Random, p_corrupt: float, p_noise: float) -> str:
    r = rng.random()
    return "corrupted" if r < p_corrupt else "noised" if r < p_corrupt + p_noise else "clean"


def _noise_kind(rng: random.Random) -> str:
    n = spec()["noise"]
    if rng.random() < n["p_normal"]:
        return "normal"
    return "uniform" if rng.random() < n["p_uniform_given_not_normal"] else "poisson"


ADAPTER = """
def _real(v):
    v = np.asarray(v).item()
    if isinstance(v, complex):
        return v.real if v.imag == 0 else float("nan")
    return float(v)


def f(x):
    return _real(function(float(x)))


def f_truth(x):
    return _real(globals().get("_truth_function", function)(float(x)))
"""


def numeric_function(rng: random.Random, i: int, p_corrupt: float, p_noise: float) -> Any:
    """One FIND-distributed numeric function as a ``FindFunction``."""
    from neuroscribe.find.function import FindFunction

    s = spec()
    if rng.random() < s["p_simple"]:
        families, op = [rng.choice(s["simple"])], ""
    else:
        op = rng.choice(sorted(s["compound_ops"]))
        families = [rng.choice(s["compose_only"]), rng.choice(s["compose_only"])]
    params = [sample_params(rng, fam) for fam in families]
    variant = _variant(rng, p_corrupt, p_noise)
    one_line = bool(op) or variant != "clean"
    exprs = [expression(fam, p, truncated=one_line) for fam, p in zip(families, params)]
    expr = s["compound_ops"][op].format(*exprs) if op else exprs[0]
    lo, hi = s["domain"].get(families[0] if not op else "default", s["domain"]["default"])
    body, interval, extra = expr, None, {}
    if variant == "corrupted":
        c = s["corruption"]
        mean = _clean_mean(expr, lo, hi)
        a = round(rng.uniform(max(lo, -100), 100), 1)
        noise = f"_rs.normal(loc={mean!r}, scale={c['scale']}, size=np.shape(x))"
        if rng.random() < c["p_one_sided"]:
            ctype = rng.choice(["interval_smaller", "interval_larger"])
            bound = [a]
            body = (f"np.where(x > {a}, {expr}, {noise})" if ctype == "interval_smaller"
                    else f"np.where(x < {a}, {expr}, {noise})")
            interval = [EVAL_LO, a] if ctype == "interval_smaller" else [a, EVAL_HI]
        else:
            ctype, b = "interval_inside", rng.uniform(a + c["width"][0], a + c["width"][1])
            bound = [a, b]
            body = f"np.where((x > {a}) & (x < {b!r}), {noise}, {expr})"
            interval = [a, min(b, EVAL_HI)]
        extra = {"corruption_type": ctype, "corruption_params": {"std": mean, "boundary": bound}}
    elif variant == "noised":
        kind = _noise_kind(rng)
        body = f"{expr} + {s['noise']['code'][kind].replace('np.random.', '_rs.')}"
        extra = {"noise_type": kind, "noise_params": 1}
    lines = ["import numpy as np", f"_rs = np.random.RandomState({rng.randrange(2**31)})", "",
             "def function(x):", "    x = np.asarray(x, dtype=float)",
             "    with np.errstate(all='ignore'):", f"        return {body}", ""]
    if variant != "clean":  # FIND's truth: function_code.py, a simple family in full
        clean = [expression(fam, p, truncated=bool(op)) for fam, p in zip(families, params)]
        clean_expr = s["compound_ops"][op].format(*clean) if op else clean[0]
        lines += ["", "def _truth_function(x):", "    x = np.asarray(x, dtype=float)",
                  "    with np.errstate(all='ignore'):", f"        return {clean_expr}", ""]
    lines.append(ADAPTER)
    name = find_name(families, params, op)
    desc = describe(families, op, expr, variant, extra)
    return FindFunction(
        f"numeric-{i:04d}", "numeric", f"{op}:{';'.join(families)}" if op else families[0],
        desc, f"real x; FIND's domain [{lo}, {hi}], probed on [-128, 128]", "\n".join(lines),
        json.loads(json.dumps({"name": name, "families": families, "params": params,
                               "variant": variant, "expression": expr, "domain": [lo, hi],
                               **extra})), interval)  # tuples as lists, as saved


def describe(families: list[str], op: str, expr: str, variant: str,
             extra: dict[str, Any]) -> str:
    what = (f"{families[0]} function" if not op else
            f"{'sum' if op == 'sum_two' else 'product'} of {families[0]} and {families[1]}")
    text = f"{what}: f(x) = {expr.replace('np.', '')}"
    if variant == "corrupted":
        b, mean = extra["corruption_params"]["boundary"], extra["corruption_params"]["std"]
        where = {"interval_smaller": f"x <= {b[0]}", "interval_larger": f"x >= {b[0]}",
                 "interval_inside": f"{b[0]} < x < {b[-1]:.4g}"}[extra["corruption_type"]]
        text += (f"; for {where} it returns noise around {mean:.4g} (normal, scale 0.1) "
                 "instead")
    elif variant == "noised":
        text += f"; plus {extra['noise_type']} noise of scale 1, drawn per call"
    return text


def is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
