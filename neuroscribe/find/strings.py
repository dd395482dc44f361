"""FIND's string functions, drawn the way FIND's generator draws them.

This follows ``src/make_functions/make_strings/string_functions.py`` (``sample``,
``sample_single_f``, ``sample_compose``) and ``generate_string_functions.py`` in
multimodal-interpretability/FIND (Schwettmann et al. 2023):

- with probability 0.3 a *simple* function, uniform over FIND's 67 family names;
- otherwise a composition ``outer(inner(s))`` (FIND's ``compose_1input_1input``): the outer
  function is uniform over the same 67 names, the inner one uniform over FIND's "composed"
  list, redrawn while the pair is in FIND's avoid list for that outer function;
- each family draws its parameters as FIND does (a digit 1-9, an ascii letter, a short
  letter string, two distinct indexes 0-9, a permutation of a-z, a shift 0-25, ...).

The families, their code (written for neuroscribe, reproducing FIND's behaviour and quirks)
and their ground-truth descriptions live in ``data/find/find_strings.json``, whose comments
say where the functions here differ from FIND's: they never raise (FIND does on empty strings
and on counts above thirty) and ``add_order_to_inx``/``sub_order_to_inx`` are deterministic.
FIND's check against exact repeats (``check_list.json``) is not reproduced: every function
comes from its own random stream.
"""

from __future__ import annotations

import json
import random
import re
import string
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuroscribe.find.function import FindFunction

SPEC_PATH = Path(__file__).parents[1] / "data" / "find" / "find_strings.json"
P_SIMPLE = 0.3  # FIND's --ratio: a function is simple iff random() <= ratio
COMPOSE = "compose_1input_1input"
DOMAIN = "strings (words and phrases)"


@lru_cache(maxsize=1)
def load_spec() -> dict[str, Any]:
    """The whole of ``find_strings.json`` (shared: do not mutate)."""
    return json.loads(SPEC_PATH.read_text())


def load_families() -> dict[str, dict[str, str]]:
    """Family name -> {"params": sampler kind, "code": ..., "description": ...}."""
    return load_spec()["families"]


FIND_NAMES: list[str] = list(load_spec()["simple"])  # FIND's 67 simple names, in its order
COMPOSED: list[str] = list(load_spec()["composed"])  # FIND's inner list (remove_digits twice)
AVOID: dict[str, list[str]] = load_spec()["avoid"]  # outer -> inners that are redrawn


def sample_params(kind: str, rng: random.Random) -> dict[str, Any]:
    """One draw of a family's parameters; ``kind`` names the sampler in the JSON."""
    letters = string.ascii_letters
    if kind == "none":
        return {}
    if kind == "digit":
        return {"n": rng.randint(1, 9)}
    if kind == "letter":
        return {"c": rng.choice(letters)}
    if kind == "letters":
        return {"t": "".join(rng.choice(letters) for _ in range(rng.randint(1, 5)))}
    if kind == "index_pair":
        while True:
            i, j = rng.randint(0, 9), rng.randint(0, 9)
            if i != j:
                return {"i": i, "j": j}
    if kind == "permutation":
        return {"mapping": "".join(rng.sample(string.ascii_lowercase, 26))}
    if kind == "shift":
        return {"k": rng.randint(0, 25)}
    if kind == "letter_pair":
        while True:
            old, new = rng.choice(letters), rng.choice(letters)
            if old != new:
                return {"old": old, "new": new}
    raise ValueError(f"unknown parameter sampler: {kind}")


def _fill(template: str, params: dict[str, Any], show: Any) -> str:
    """Replace each ``{name}`` naming a parameter; other braces are left alone."""
    def one(m: re.Match[str]) -> str:
        return show(m.group(1), params[m.group(1)]) if m.group(1) in params else m.group(0)
    return re.sub(r"\{(\w+)\}", one, template)


def _show_code(_: str, value: Any) -> str:
    return repr(value)


def _show_text(name: str, value: Any) -> str:
    if name == "mapping":
        return ", ".join(f"{a}->{b}" for a, b in zip(string.ascii_lowercase, value))
    return repr(value) if isinstance(value, str) else str(value)


def describe(family: str, params: dict[str, Any]) -> str:
    """The family's ground-truth description with its parameters filled in."""
    return _fill(load_families()[family]["description"], params, _show_text)


def family_source(family: str, params: dict[str, Any], fname: str) -> str:
    """``def fname(s):`` computing the family with these parameters (helpers from the prelude)."""
    code = _fill(load_families()[family]["code"], params, _show_code)
    if "return" not in code:
        code = "return " + code
    body = "\n".join("    " + line for line in code.splitlines())
    return f"def {fname}(s):\n{body}\n"


def build_code(steps: list[tuple[str, dict[str, Any]]]) -> str:
    """Source of ``f(x)`` applying the steps in order (innermost first) to ``str(x)``."""
    names = [f"step{k + 1}" for k in range(len(steps))]
    defs = [family_source(fam, p, n) for (fam, p), n in zip(steps, names)]
    call = "str(x)"
    for n in names:
        call = f"{n}({call})"
    parts = ["import random", "import string", "", "", load_spec()["prelude"].rstrip("\n"),
             "", "", "\n\n".join(defs), "", f"def f(x):\n    return {call}\n", "",
             "f_truth = f", ""]
    return "\n".join(parts)


def find_param(kind: str, params: dict[str, Any]) -> Any:
    """The parameter value as FIND's sampler returns it (and ``create_string`` prints it)."""
    if kind == "none":
        return ()
    if kind == "index_pair":
        return (params["i"], params["j"])
    if kind == "letter_pair":
        return (params["old"], params["new"])
    if kind == "permutation":
        return dict(zip(string.ascii_lowercase, params["mapping"]))
    (value,) = params.values()
    return value


def find_name(op: str, values: list[Any]) -> str:
    """FIND's data.json name: ``create_string(func_name, params)``."""
    return f"{op}({', '.join(str(v) for v in values)})"


def draw(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    """FIND's draw: ``[(name, params)]`` for a simple function, ``[(outer, p), (inner, p)]``
    for a composition."""
    fams = load_families()
    if rng.random() <= P_SIMPLE:
        name = rng.choice(FIND_NAMES)
        return [(name, sample_params(fams[name]["params"], rng))]
    outer = rng.choice(FIND_NAMES)
    outer_params = sample_params(fams[outer]["params"], rng)
    while True:
        inner = rng.choice(COMPOSED)
        inner_params = sample_params(fams[inner]["params"], rng)
        if inner not in AVOID[outer]:
            return [(outer, outer_params), (inner, inner_params)]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def string_function(rng: random.Random, i: int) -> FindFunction:
    """A FIND string function: simple (p 0.3) or ``outer(inner(s))`` (p 0.7)."""
    from neuroscribe.find.function import FindFunction

    steps = draw(rng)
    fams = load_families()
    families = [name for name, _ in steps]
    values = [find_param(fams[n]["params"], p) for n, p in steps]
    if len(steps) == 1:
        op = families[0]
        description = _sentence(describe(*steps[0])) + "."
        kind = "simple"
    else:
        (outer, outer_p), (inner, inner_p) = steps
        op = f"{outer};{inner};{COMPOSE}"
        description = (f"{_sentence(describe(inner, inner_p))}; then "
                       f"{describe(outer, outer_p)}.")
        kind = "compose"
    code = build_code(steps[::-1])  # build_code applies its steps innermost first
    params = {"type": kind, "families": families, "params": [dict(p) for _, p in steps],
              "name": find_name(op, values)}
    return FindFunction(id=f"string-{i:04d}", category="string", op=op,
                        description=description, domain=DOMAIN, code=code, params=params,
                        interval=None)
