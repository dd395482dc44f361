"""Agents that interpret a FIND function through a black box: they may only call it, out of
process, on inputs they choose.

- ``OfflineAgent``: no LLM. Symbolic regression over the op grammar with interval detection
  for numeric functions (``find_fit``), a search over transformation chains for strings, a
  concept search for entity neurons, and the token-statistics explainer for puzzles.
- ``LLMAgent``: FIND's automated interpretability agent (AIA): at most ``rounds`` rounds of
  ``CALL: [...]`` experiments, then ``FINAL`` with a description, the domain of unexpected
  behaviour and code. With ``rounds=0`` and random inputs it is the single-round baseline.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroscribe.find.string_search import search_strings
from neuroscribe.sandbox import SandboxResult, Worker

DATA = Path(__file__).parents[1] / "data" / "find"
CODE_CATEGORIES = ("numeric", "string")  # where the answer's code is what gets scored


class FunctionFailure(Exception):
    """The function under study crashed, hung or broke out of its limits."""


class BlackBox:
    """Calls one function's ``f`` in a sandboxed worker; the agent sees nothing else."""

    def __init__(self, code: str, worker: Worker, timeout: float = 10.0) -> None:
        self.__code, self.__worker, self.__timeout = code, worker, timeout
        self.n_inputs = 0

    def __call__(self, inputs: list[Any]) -> list[Any]:
        self.n_inputs += len(inputs)
        r: SandboxResult = self.__worker.call(self.__code, list(inputs), "f", self.__timeout)
        if not r.ok:
            raise FunctionFailure(f"the function failed ({r.status}): {r.reason}")
        return r.outputs


@dataclass
class Answer:
    description: str = ""
    code: str = ""
    interval: list[float] | None = None
    failure: str | None = None
    rounds: int = 0
    llm_calls: int = 0
    n_inputs: int = 0
    transcript: list[str] = field(default_factory=list)


def load_data(name: str) -> Any:
    return json.loads((DATA / name).read_text())


# ---------------------------------------------------------------- offline agent

def string_candidates() -> list[tuple[str, dict[str, Any], Callable[[str], Any]]]:
    """Every transformation of ``string_ops.json`` with every parameter value."""
    out = []
    letters = string.ascii_lowercase
    for name, op in sorted(load_data("string_ops.json").items()):
        code = op["code"]
        grid: list[dict[str, Any]] = [{}]
        if "{a}" in code and "{b}" in code:
            grid = [{"a": a, "b": b} for a, b in itertools.permutations(letters, 2)]
        elif "{a}" in code:
            grid = [{"a": a} for a in letters]
        elif "{k}" in code:
            grid = [{"k": k} for k in range(1, 26)]
        for params in grid:
            fn = eval("lambda x: " + code.format(**params))  # noqa: S307 - our own grammar
            out.append((name, params, fn))
    return out


def chain_code(chain: list[tuple[str, dict[str, Any]]]) -> tuple[str, str]:
    ops = load_data("string_ops.json")
    body = ["def f(x):", "    x = str(x)"]
    body += ["    x = " + ops[n]["code"].format(**p) for n, p in chain]
    desc = "; then ".join(ops[n]["description"].format(**p) for n, p in chain)
    return "\n".join(body + ["    return x", ""]), desc


def probe_numeric(box: Any, n_random: int = 256, seed: int = 0) -> tuple[Any, Any]:
    """Two rounds of inputs on [-128, 128]: a grid of step 0.5 (never FIND's evaluation
    points) plus ``n_random`` random points, whose irregular spacing keeps a sine faster
    than the grid's Nyquist rate from aliasing; then 12 points inside each of the gaps where
    f jumps most, to place the ends of rectangles, steps and corrupted intervals."""
    import numpy as np

    from neuroscribe.find.repeat import caller, gap_inputs

    call = caller(box)
    rng = np.random.default_rng(seed)
    x = np.sort(np.concatenate([np.arange(-128, 128, 0.5) + 0.25,
                                rng.uniform(-128, 128, n_random)]))
    y = call(x)
    if np.isfinite(y).sum() >= 20:
        more = gap_inputs(x, y)
        x, y = np.concatenate([x, more]), np.concatenate([y, call(more)])
        order = np.argsort(x)
        x, y = x[order], y[order]
    return x, y


class OfflineAgent:
    """Program search over the suite's grammars; needs no LLM."""

    name = "offline"

    def __init__(self) -> None:
        self._strings: list[Any] | None = None
        self.solvers: dict[str, Callable[[BlackBox], Awaitable[Answer]]] = {
            "numeric": self.numeric, "string": self.string, "entity": self.entity,
            "puzzle": self.puzzle}

    async def solve(self, box: BlackBox, category: str) -> Answer:
        return await self.solvers[category](box)

    async def numeric(self, box: BlackBox) -> Answer:
        import numpy as np

        from neuroscribe.find.fit import fit_model, numeric_code, solve_numeric
        from neuroscribe.find.repeat import caller, repeat

        x, y = probe_numeric(box)
        seen = repeat(caller(box), x, y)  # noise everywhere, a corrupted region, or neither
        ok = np.isfinite(seen.y)
        if ok.sum() < 20:
            return Answer(failure="the function returned too few finite values", rounds=2)
        if seen.region is None:  # a plateau f keeps (noisy or not) is part of the function
            code, desc, _ = numeric_code(solve_numeric(seen.x[ok], seen.y[ok]),
                                         code_interval=True)
            return Answer(desc + seen.describe(), code, rounds=3)
        fit, kind = fit_model(seen.x[ok], seen.y[ok])  # outside the corrupted region
        code, desc, interval = numeric_code({"fit": fit, "kind": kind, "interval": seen.region})
        return Answer(desc, code, interval, rounds=3)

    async def string(self, box: BlackBox) -> Answer:
        from neuroscribe.find.string_search import PROBES, search, steps_answer

        steps = search(PROBES, box(PROBES))  # FIND's families, alone or composed
        if steps is not None:
            code, desc = steps_answer(steps)
            return Answer(desc, code, rounds=1)
        probes = load_data("words.json")["string_probes"]
        self._strings = self._strings or string_candidates()
        chain = search_strings(probes, box(probes), self._strings)
        if chain is None:
            return Answer(failure="no FIND family or composition of two fits, nor a chain "
                          "of up to two transformations", rounds=2)
        code, desc = chain_code(chain)
        return Answer(desc, code, rounds=2)

    async def entity(self, box: BlackBox) -> Answer:
        concepts = load_data("concepts.json")
        words = [w for ws in concepts.values() for w in ws]
        acts = dict(zip(words, box(words)))
        mean = {c: sum(acts[w] or 0.0 for w in ws) / len(ws) for c, ws in concepts.items()}
        top = sorted(mean, key=mean.get, reverse=True)  # type: ignore[arg-type]
        chosen = top[:1] + [c for c in top[1:2] if mean[c] > max(1.0, 0.4 * mean[top[0]])]
        names = " or ".join(c.replace("_", " ") for c in chosen)
        return Answer(f"fires on words and phrases related to {names}", rounds=1)

    async def puzzle(self, box: BlackBox) -> Answer:
        from neuroscribe.explain.core import ExplainConfig, TokenStatsExplainer
        from neuroscribe.formats import ActivationRecord

        seen: list[Any] = []
        for s in box(list(range(32))):  # f(i) wraps around: stop at the first repeat
            if s in seen:
                break
            seen.append(s)
        records = [ActivationRecord(tokens=[t for t, _ in s], activations=[a for _, a in s])
                   for s in seen]
        text = (await TokenStatsExplainer(ExplainConfig()).explain(records, []))[0]
        return Answer(text, rounds=1)
