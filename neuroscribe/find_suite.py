"""A FIND-style function suite (Schwettmann et al. 2023), generated from a seed and saved as data.

Every function carries its ground-truth description, its domain (with the interval where it
misbehaves), reference Python code defining ``f`` (what an agent may call, noise included) and
``f_clean`` (the truth it is scored against), and the parameters that made it.

- numeric: FIND's 18 atomic ops, and sums or products of two, each with a corrupted interval
  (inside an interval, below or above a boundary, where it returns a constant) and uniform,
  normal or Poisson noise;
- string: replace, reverse, count, case, shift and filter transformations, and compositions;
- entity: scalar functions of a word or phrase, selective for one or two concepts through
  all-MiniLM-L6-v2 sentence embeddings (the sandbox's ``embed`` helper), with noise;
- puzzle: OpenAI's 19 neuron puzzles, ``f(i)`` giving sentence ``i`` as [token, activation].
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .runs import opt, write_json

DATA = Path(__file__).parent / "data" / "find"
DOMAIN = (-128.0, 128.0)


@dataclass(frozen=True)
class FindFunction:
    id: str
    category: str  # numeric, string, entity, puzzle
    op: str  # atomic op, "sum:a+b", "product:a*b", transformation chain, "entity", "puzzle"
    description: str
    domain: str
    code: str
    params: dict[str, Any] = field(default_factory=dict)
    interval: list[float] | None = None  # corrupted interval within DOMAIN (numeric)


@dataclass
class SuiteConfig:
    """Which functions the FIND-style suite holds."""

    seed: int = opt(0, "seed of the suite: the same seed gives the same functions")
    n_numeric: int = opt(60, "numeric functions")
    n_string: int = opt(20, "string transformations")
    n_entity: int = opt(10, "synthetic entity neurons")
    puzzles: str = opt("packaged", "OpenAI's puzzles.json for the token-activation category "
                       "('packaged': the copy shipped with neuroscribe; '' to skip)")
    p_composition: float = opt(0.5, "fraction of numeric functions that are a sum or product")
    p_corrupt: float = opt(1.0, "fraction of numeric functions with a corrupted interval")
    p_noise: float = opt(1.0, "fraction of numeric functions with noise")
    noise_level: float = opt(0.05, "noise scale as a fraction of the function's spread")


def _u(rng: random.Random, lo: float, hi: float, signed: bool = False) -> float:
    v = round(rng.uniform(lo, hi), 2)
    return -v if signed and rng.random() < 0.5 else v


# op -> (parameter sampler, Python expression in x). Parameters print with 2 decimals.
Sampler = Any
OPS: dict[str, tuple[Sampler, str]] = {
    "constant": (lambda r: {"c": _u(r, -10, 10)}, "{c}"),
    "cos": (lambda r: {"a": _u(r, 1, 10, True), "w": _u(r, 0.05, 1)}, "{a} * math.cos({w} * x)"),
    "sin": (lambda r: {"a": _u(r, 1, 10, True), "w": _u(r, 0.05, 1)}, "{a} * math.sin({w} * x)"),
    "rectangle": (lambda r: {"a": _u(r, 2, 10, True), "lo": _u(r, -100, 20),
                             "width": _u(r, 20, 80)},
                  "({a} if {lo} <= x <= {lo} + {width} else 0.0)"),
    "absolute": (lambda r: {"a": _u(r, 0.1, 2, True), "b": _u(r, -50, 50)},
                 "{a} * abs(x - {b})"),
    "polynomial": (lambda r: {"a": _u(r, 0.001, 0.02, True), "b": _u(r, -2, 2),
                              "c": _u(r, -10, 10)}, "{a} * x ** 2 + {b} * x + {c}"),
    "gaussian": (lambda r: {"a": _u(r, 2, 10, True), "m": _u(r, -80, 80), "s": _u(r, 5, 30)},
                 "{a} * math.exp(-((x - {m}) / {s}) ** 2 / 2)"),
    "reciprocal": (lambda r: {"a": _u(r, 1, 20, True), "b": float(r.randint(-60, 60))},
                   "{a} / (x - {b})"),
    "root": (lambda r: {"a": _u(r, 0.5, 3, True)}, "{a} * math.sqrt(abs(x))"),
    "tanh": (lambda r: {"a": _u(r, 1, 10, True), "w": _u(r, 0.02, 0.5), "b": _u(r, -60, 60)},
             "{a} * math.tanh({w} * (x - {b}))"),
    "rational": (lambda r: {"a": _u(r, 5, 50, True), "b": _u(r, 10, 400)},
                 "{a} * x / (x ** 2 + {b})"),
    "step": (lambda r: {"a": _u(r, -10, 10), "c": _u(r, -10, 10), "b": _u(r, -80, 80)},
             "({a} if x > {b} else {c})"),
    "square_wave": (lambda r: {"a": _u(r, 1, 10), "w": _u(r, 0.05, 0.5)},
                    "({a} if math.sin({w} * x) >= 0 else -{a})"),
    "logarithm": (lambda r: {"a": _u(r, 0.5, 5, True)}, "{a} * math.log(abs(x) + 1)"),
    "linear": (lambda r: {"a": _u(r, 0.05, 3, True), "b": _u(r, -10, 10)}, "{a} * x + {b}"),
    "relu": (lambda r: {"a": _u(r, 0.1, 2, True), "b": _u(r, -60, 60)},
             "{a} * max(0.0, x - {b})"),
    "floor": (lambda r: {"s": _u(r, 2, 20)}, "math.floor(x / {s})"),
    "ceil": (lambda r: {"s": _u(r, 2, 20)}, "math.ceil(x / {s})"),
}
NOISE = ("uniform", "normal", "poisson")
CORRUPTION = ("inside", "smaller", "larger")


def expression(op: str, params: dict[str, float]) -> str:
    return OPS[op][1].format(**params).replace("- -", "+ ").replace("+ -", "- ")


def eval_points() -> list[float]:
    """FIND's evaluation inputs: x = i + 0.5 for i in [-128, 128)."""
    return [i + 0.5 for i in range(-128, 128)]


def _spread(expr: str) -> float:
    ys = [eval(expr, {"math": math, "x": x}) for x in eval_points()]  # noqa: S307 - our own
    mean = sum(ys) / len(ys)
    return math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys)) or abs(mean) or 1.0


def _corruption(rng: random.Random) -> tuple[str, list[float], float]:
    kind = rng.choice(CORRUPTION)
    if kind == "inside":
        lo = _u(rng, -100, 60)
        iv = [lo, round(lo + _u(rng, 10, 40), 2)]
    elif kind == "smaller":
        iv = [DOMAIN[0], _u(rng, -118, -70)]
    else:
        iv = [_u(rng, 70, 118), DOMAIN[1]]
    return kind, iv, _u(rng, -10, 10)


def numeric_function(rng: random.Random, i: int, cfg: SuiteConfig) -> FindFunction:
    names = sorted(OPS)
    kind = "atomic"
    if rng.random() < cfg.p_composition:
        kind = rng.choice(["sum", "product"])
    ops = [rng.choice(names)] + ([rng.choice(names)] if kind != "atomic" else [])
    parts = [(op, OPS[op][0](rng)) for op in ops]
    exprs = [expression(op, p) for op, p in parts]
    expr = exprs[0] if kind == "atomic" else (
        f"({exprs[0]}) + ({exprs[1]})" if kind == "sum" else f"({exprs[0]}) * ({exprs[1]})")
    op = ops[0] if kind == "atomic" else f"{kind}:{ops[0]}{'+' if kind == 'sum' else '*'}{ops[1]}"
    params: dict[str, Any] = {"kind": kind, "ops": [{"op": o, **p} for o, p in parts],
                              "expression": expr}
    desc = "f(x) = " + expr.replace("math.", "")
    domain = "all real x"
    lines = ["import math", "import random", f"_rng = random.Random({rng.randrange(2**31)})", "",
             "def f_clean(x):", "    x = float(x)"]
    interval = None
    if rng.random() < cfg.p_corrupt:
        ckind, interval, value = _corruption(rng)
        params["corruption"] = {"kind": ckind, "interval": interval, "value": value}
        cond = {"inside": f"{interval[0]} <= x <= {interval[1]}",
                "smaller": f"x <= {interval[1]}", "larger": f"x >= {interval[0]}"}[ckind]
        lines.append(f"    if {cond}:\n        return {value}")
        where = {"inside": f"for x in [{interval[0]}, {interval[1]}]",
                 "smaller": f"for x <= {interval[1]}", "larger": f"for x >= {interval[0]}"}[ckind]
        domain = f"all real x; {where} it returns the constant {value} instead"
        desc += f", except {where} where f(x) = {value}"
    lines.append(f"    return {expr}")
    noise_line = "    return f_clean(x)"
    if rng.random() < cfg.p_noise:
        nkind = rng.choice(NOISE)
        s = round(cfg.noise_level * _spread(expr), 4)
        params["noise"] = {"kind": nkind, "scale": s}
        noise_line = {"uniform": f"    return f_clean(x) + _rng.uniform(-{s}, {s})",
                      "normal": f"    return f_clean(x) + _rng.gauss(0.0, {s})",
                      "poisson": f"    return f_clean(x) + {s} * (_poisson(4.0) - 4.0) / 2.0"
                      }[nkind]
        desc += f"; plus {nkind} noise of scale {s}"
    lines += ["", "def _poisson(lam):", "    k, p, t = 0, 1.0, math.exp(-lam)",
              "    while True:", "        p *= _rng.random()", "        if p < t:",
              "            return k", "        k += 1", "", "def f(x):", noise_line, ""]
    return FindFunction(f"numeric-{i:04d}", "numeric", op, desc, domain, "\n".join(lines),
                        params, interval)


def _load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def string_function(rng: random.Random, i: int) -> FindFunction:
    """One or two transformations from ``data/find/string_ops.json``, applied in order."""
    ops = _load("string_ops.json")
    names = sorted(ops)
    chain = [rng.choice(names)]
    if rng.random() < 0.4:  # a composition; count gives a number, so it can only come last
        chain = [rng.choice([n for n in names if n != "count"]), rng.choice(names)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    args = []
    for _ in chain:
        a, b = rng.sample(letters, 2)
        args.append({"a": a, "b": b, "k": rng.randint(1, 25)})
    body = ["def f(x):", "    x = str(x)"]
    descs = []
    for name, a in zip(chain, args):
        body.append("    x = " + ops[name]["code"].format(**a))
        descs.append(ops[name]["description"].format(**a))
    body += ["    return x", "", "f_clean = f", ""]
    desc = "; then ".join(descs)
    return FindFunction(f"string-{i:04d}", "string", "+".join(chain), desc,
                        "strings (words and phrases)", "\n".join(body),
                        {"chain": [{"op": n, **a} for n, a in zip(chain, args)]})


def entity_function(rng: random.Random, i: int, cfg: SuiteConfig) -> FindFunction:
    """Selective for one or two concepts: 10 x the best cosine similarity of the input to a
    concept's centroid above a threshold, plus normal noise."""
    concepts = _load("concepts.json")
    chosen = rng.sample(sorted(concepts), 1 if rng.random() < 0.6 else 2)
    train = {c: concepts[c][:6] for c in chosen}
    noise = round(rng.uniform(0.05, 0.3), 2)
    code = "\n".join([
        "import random", f"_rng = random.Random({rng.randrange(2**31)})",
        f"CONCEPTS = {json.dumps(train)}", "_C = []", "",
        "def f_clean(x):", "    if not _C:",
        "        for words in CONCEPTS.values():",
        "            v = embed(words).mean(0)", "            _C.append(v / float((v @ v) ** 0.5))",
        "    v = embed([str(x)])[0]", "    s = max(float(v @ c) for c in _C)",
        "    return round(10.0 * max(0.0, (s - 0.35) / 0.65), 3)", "",
        "def f(x):", f"    return max(0.0, f_clean(x) + _rng.gauss(0.0, {noise}))", ""])
    names = " or ".join(c.replace("_", " ") for c in chosen)
    return FindFunction(f"entity-{i:04d}", "entity", "+".join(chosen),
                        f"fires on words and phrases related to {names}",
                        "words and phrases", code,
                        {"concepts": chosen, "noise_sd": noise, "threshold": 0.35})


def puzzle_functions(path: str) -> list[FindFunction]:
    from .puzzles import load_puzzles

    out = []
    for j, p in enumerate(load_puzzles(path)):
        data = [[[t, a] for t, a in zip(r.tokens, r.activations)] for r in p.records]
        code = (f"DATA = {json.dumps(data)}\n\ndef f(i):\n    return DATA[int(i) % len(DATA)]\n"
                "\nf_clean = f\n")
        out.append(FindFunction(f"puzzle-{j:04d}", "puzzle", p.name, p.explanation,
                                f"sentence index 0..{len(data) - 1}; returns its tokens with "
                                "activations", code,
                                {"false_explanations": p.false_explanations,
                                 "n_sentences": len(data)}))
    return out


def make_suite(cfg: SuiteConfig) -> list[FindFunction]:
    """The same seed always gives the same functions (each category has its own stream)."""
    fns = [numeric_function(random.Random(f"{cfg.seed}-numeric-{i}"), i, cfg)
           for i in range(cfg.n_numeric)]
    fns += [string_function(random.Random(f"{cfg.seed}-string-{i}"), i)
            for i in range(cfg.n_string)]
    fns += [entity_function(random.Random(f"{cfg.seed}-entity-{i}"), i, cfg)
            for i in range(cfg.n_entity)]
    if cfg.puzzles:
        if cfg.puzzles != "packaged" and not Path(cfg.puzzles).is_file():
            raise UserError(f"puzzles file not found: {cfg.puzzles} (pass --puzzles '' to skip)")
        fns += puzzle_functions(cfg.puzzles)
    return fns


def save_suite(fns: list[FindFunction], cfg: SuiteConfig, path: Path) -> None:
    write_json(path, {"config": asdict(cfg), "functions": [asdict(f) for f in fns]})


def load_suite(path: Path) -> list[FindFunction]:
    if not path.is_file():
        raise UserError(f"suite file not found: {path}")
    return [FindFunction(**d) for d in json.loads(path.read_text())["functions"]]
