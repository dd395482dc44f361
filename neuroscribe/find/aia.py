"""FIND's automated interpretability agent (AIA) on any ``neuroscribe.llm.client`` client, and the
single-round baseline (random inputs, then one answer).

Each round the LLM sees the task, every observation so far (the most recent ones when there
are many) and the protocol, and replies ``CALL: [inputs]`` or ``FINAL`` with a description,
the domain of unexpected behaviour and code. A CALL of inputs that were all observed already
is refused as no experiment, and after two such CALLs in a row the next turn asks for the
answer. Replies that follow neither form, a final answer without code or with code that does
not parse, and LLM errors end as failures with a reason.

For the categories listed under ``guesses`` in the prompts (entity neurons), the rounds where
the AIA must experiment ask for one hypothesis at a time: a ``GUESS:`` (a category of the
input with the largest output that no tested guess called for) and a CALL of its members.
The mean output of the call's distinct inputs that were not observed before is kept with the
guess, and later prompts list every tested guess, highest mean first, marked large or small.
For the categories listed under ``fit`` (numeric), the AIA also has a least squares tool:
``FIT: <model>`` fits a model of the op grammar to every observation so far and shows its
formula and error, and a final ``CODE: FIT <n>`` takes the code (and the corrupted interval)
of fit n (``find_tools``). Prompts live in ``data/find/aia.json``.
"""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.find.agents import CODE_CATEGORIES, Answer, BlackBox, FunctionFailure, load_data
from neuroscribe.find.tools import (
    ModelFit,
    family_ranking,
    fit_lines,
    model_name,
    parse_fit,
    run_fit,
    use_fit,
)
from neuroscribe.llm.client import Client, Request
from neuroscribe.sandbox import fenced_code

MAX_OBSERVATIONS = 60  # observation lines shown per prompt (the most recent ones)
MAX_VIOLATIONS = 3  # consecutive replies with neither CALL nor FINAL before giving up
MAX_REPEATS = 2  # consecutive CALLs of only observed inputs, after which the AIA must answer


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, str) else str(v)


def _show_sentence(v: Any) -> str:
    if not isinstance(v, list):
        return str(v)
    return "".join(f"{t}({a:g})" if a else str(t) for t, a in v)


def _key(x: Any) -> str:
    return json.dumps(x)


def observation(category: str, x: Any, y: Any) -> str:
    shown = _show_sentence(y) if category == "puzzle" else _show(y)
    return f"f({_show(x)}) = {shown}"


COERCE: dict[str, Callable[[Any], Any]] = {
    "numeric": float, "string": str, "entity": str, "puzzle": int}


def parse_call(text: str, category: str, max_inputs: int) -> list[Any] | None:
    """The inputs of a ``CALL: [...]`` reply, or None when there is no usable call."""
    m = re.search(r"CALL:\s*", text)
    if not m:
        return None
    rest = text[m.end():].strip()
    if category == "numeric" and (grid := _expand_ellipsis(rest, max_inputs)) is not None:
        return grid
    try:
        raw, _ = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        try:
            raw = ast.literal_eval(rest.splitlines()[0].strip())
        except (ValueError, SyntaxError, IndexError, MemoryError, RecursionError):
            raw = _cut_list(rest)
            if raw is None:
                return None
    if not isinstance(raw, (list, tuple)):
        raw = [raw]
    out = []
    for v in list(raw)[:max_inputs]:
        try:
            out.append(COERCE[category](v))
        except (TypeError, ValueError, OverflowError):
            continue
    return out or None


def _expand_ellipsis(text: str, max_inputs: int) -> list[Any] | None:
    """A numeric list written with an ellipsis, ``[a, b, ..., c]`` (evenly spaced from a in
    steps of b - a, up to c), as its first ``max_inputs`` numbers; None for any other text."""
    m = re.match(r"\[([^\]]*?)(?:\.\.\.|…)([^\]]*)\]", text)
    if not m:
        return None
    try:
        head = [float(v) for v in m.group(1).split(",") if v.strip()]
        tail = [float(v) for v in m.group(2).split(",") if v.strip()]
    except ValueError:
        return None
    if len(head) < 2 or len(tail) != 1 or head[1] == head[0]:
        return None
    step, out = head[1] - head[0], head[:1]
    if (tail[0] - head[0]) / step < 0:
        return None
    while len(out) < max_inputs and (out[-1] + step - tail[0]) * step <= 1e-9:
        out.append(round(out[-1] + step, 10))
    return out


def _cut_list(text: str) -> list[Any] | None:
    """The complete items of a JSON list that was cut off before its ``]`` (a reply that ran
    out of tokens), or None when the text starts no list or holds no complete item."""
    if not text.startswith("[") or "]" in text:
        return None
    items = re.findall(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?=\s*,)', text[1:])
    out = [json.loads(i) if i.startswith('"') else float(i) for i in items]
    return out or None


def parse_interval(text: str) -> list[float] | None:
    nums = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text)]
    if not nums or re.match(r"\s*(none|no|n/a|nowhere)\b", text, re.I):
        return None
    if len(nums) >= 2:
        return sorted(nums[:2])
    return [-128.0, nums[0]] if "<" in text else [nums[0], 128.0]


def parse_final(text: str, category: str) -> Answer | None:
    """A ``FINAL`` reply as an Answer (its failure set when the code is missing or broken),
    or None when the reply is not a final answer. A reply without the ``FINAL`` line still
    counts when it has a description and, where code is scored, code."""
    if not re.search(r"^\s*\**FINAL\b", text, re.M) and not (
            "DESCRIPTION:" in text and ("CODE:" in text or "```" in text
                                        or category not in CODE_CATEGORIES)):
        return None
    desc = re.search(r"DESCRIPTION:\s*(.+)", text)
    dom = re.search(r"DOMAIN:\s*(.+)", text)
    code = fenced_code(text)
    ans = Answer(description=desc.group(1).strip() if desc else "",
                 interval=parse_interval(dom.group(1)) if dom else None,
                 code=code + "\n" if code is not None else "")
    if not ans.description:
        ans.failure = "the final answer has no description"
    if category in CODE_CATEGORIES:
        if not ans.code.strip():
            ans.failure = "the final answer has no code"
        else:
            try:
                tree = ast.parse(ans.code)
            except SyntaxError as e:
                ans.failure = f"the code does not parse: {e.msg} (line {e.lineno})"
            else:
                if not any(isinstance(n, ast.FunctionDef) and n.name == "f" for n in tree.body):
                    ans.failure = "the code defines no function f"
    return ans


def parse_guess(text: str) -> str | None:
    m = re.search(r"GUESS:\s*(.+)", text)
    guess = m.group(1).strip().strip("*\"'").strip() if m else ""
    return guess[:120] or None


def guess_lines(guesses: list[tuple[str, float, int]], largest: float,
                p: dict[str, Any]) -> list[str]:
    """Tested guesses as prompt lines, highest mean output first (one line per guess text,
    its best test), each marked large when its mean is at least ``p["large"]`` times the
    largest output observed."""
    best: dict[str, tuple[float, int]] = {}
    for g, mean, n in guesses:
        if g.lower() not in best or mean > best[g.lower()][0]:
            best[g.lower()] = (mean, n)
    names = {g.lower(): g for g, _, _ in guesses}
    return [p["line"].format(guess=names[k], mean=m, n=n,
                             verdict=p["verdicts"][m > 0 and m >= p["large"] * largest])
            for k, (m, n) in sorted(best.items(), key=lambda kv: -kv[1][0])]


def next_to_explain(ranked: list[tuple[float, str, str]], tested: set[str]) -> str:
    """The input with the largest output among those that no tested guess called for (all
    inputs when every one was), as shown in the prompts."""
    fresh = [r for r in ranked if r[2] not in tested] or ranked
    return max(fresh)[2] if fresh else "none yet"


def random_inputs(category: str, rng: random.Random, n: int) -> list[Any]:
    words = load_data("words.json")["random_words"]
    makers: dict[str, Callable[[], list[Any]]] = {
        "numeric": lambda: [round(rng.uniform(-128, 128), 2) for _ in range(n)],
        "string": lambda: rng.sample(words, min(n, len(words))),
        "entity": lambda: rng.sample(words, min(n, len(words))),
        "puzzle": lambda: list(range(min(n, 6))),
    }
    return makers[category]()


@dataclass
class Notebook:
    """What the agent has observed and tested so far on one function."""

    obs: list[str] = field(default_factory=list)  # observation lines, in call order
    seen: set[str] = field(default_factory=set)  # inputs observed: a CALL of only these is none
    ranked: list[tuple[float, str, str]] = field(default_factory=list)  # (y, line, input shown)
    guesses: list[tuple[str, float, int]] = field(default_factory=list)  # (guess, mean, n)
    tested: set[str] = field(default_factory=set)  # inputs called to test a guess, as shown
    points: dict[float, tuple[float, str]] = field(default_factory=dict)  # numeric x: (y, line)
    fits: list[ModelFit] = field(default_factory=list)

    def observe(self, box: BlackBox, category: str, xs: list[Any]) -> dict[str, float]:
        """Calls f on xs; the numeric outputs of the distinct inputs not seen before."""
        new = {_key(x) for x in xs} - self.seen
        self.seen.update(map(_key, xs))
        fresh: dict[str, float] = {}
        for x, y in zip(xs, box(xs)):
            self.obs.append(observation(category, x, y))
            if isinstance(y, (int, float)) and not isinstance(y, bool) and y == y:
                self.ranked.append((float(y), self.obs[-1], _show(x)))
                if isinstance(x, (int, float)):
                    self.points[float(x)] = (float(y), self.obs[-1])
                if _key(x) in new:
                    fresh.setdefault(_key(x), float(y))
        return fresh

    def xy(self) -> list[tuple[float, float]]:
        """The numeric observations as (x, y), one per input, for the FIT tool."""
        return [(x, y) for x, (y, _) in self.points.items()]

    def shown(self, by_x: bool) -> list[str]:
        """The observation lines of a prompt: the most recent ones, or (``by_x``, numeric
        inputs) evenly spread over the inputs observed, in order of x."""
        if by_x and self.points:
            lines = [ln for _, (_, ln) in sorted(self.points.items())]
            step = max(1.0, len(lines) / MAX_OBSERVATIONS)
            picked = [lines[int(i * step)] for i in range(min(len(lines), MAX_OBSERVATIONS))]
            return ([f"({len(lines)} observations, {len(picked)} shown, in order of x)"]
                    if len(picked) < len(lines) else []) + picked
        shown = self.obs[-MAX_OBSERVATIONS:]
        return ([f"({len(self.obs) - len(shown)} earlier observations not shown)"]
                if len(self.obs) > len(shown) else []) + shown


class LLMAgent:
    """The AIA (``rounds`` > 0) or the single-round baseline (``rounds`` = 0).

    Both start from ``n_random`` random observations (the same ones, for a fair comparison);
    the AIA must then run at least ``min_rounds`` experiments of its own before answering."""

    def __init__(self, client: Client, name: str, rounds: int = 20, max_inputs: int = 40,
                 n_random: int = 20, min_rounds: int = 1, max_tokens: int = 350,
                 seed: int = 0, tools: str = "fit") -> None:
        self.client, self.name, self.rounds = client, name, rounds
        self.max_inputs, self.n_random, self.max_tokens = max_inputs, n_random, max_tokens
        self.min_rounds, self.seed = min(min_rounds, rounds), seed
        self.tools = [t for t in tools.split(",") if t]
        self.prompts = load_data("aia.json")

    def _form(self, category: str, book: Notebook, rnd: int) -> str:
        """The reply form of this round: explore (one hypothesis) or free (CALL or answer)."""
        p = self.prompts
        if self._tools(category):
            few = len(book.seen) < p["fit"]["min_points"]
            return (p["fit"]["explore_call" if few else "explore"] if rnd <= self.min_rounds
                    else p["fit"]["format"])
        explore = p["explore_formats"].get(category, p["explore_formats"]["default"])
        return explore if rnd <= self.min_rounds else p["format"]

    def _prompt(self, category: str, book: Notebook, rnd: int, last: bool, note: str) -> str:
        p = self.prompts
        tools = self._tools(category)
        answer = p["fit"]["answer"] if tools and book.fits else p["answers"][category]
        lines = book.shown(by_x=tools)
        if book.ranked and category in p["largest"]["categories"]:
            best = sorted(book.ranked, key=lambda yl: -yl[0])[: p["largest"]["n"]]
            lines += ["", p["largest"]["text"].format(items="; ".join(ln for _, ln, _ in best))]
        if book.guesses and category in p["guesses"]["categories"]:
            largest = max(book.ranked or [(0.0, "", "")])[0]
            lines += ["", p["guesses"]["header"], *guess_lines(book.guesses, largest,
                                                                p["guesses"])]
        if tools and len(book.seen) >= p["fit"]["min_points"]:
            lines += ["", family_ranking(book.xy(), p["fit"])]
        if book.fits and tools:
            lines += ["", *fit_lines(book.fits, p["fit"])]
        text = p["last_turn" if last else "turn"].format(
            category=p["categories"][category],
            observations="\n".join(lines) or p["nothing_yet"], round=rnd,
            rounds=self.rounds + 1, answer=answer,
            format=self._form(category, book, rnd).format(
                max_inputs=self.max_inputs, answer=answer,
                families=", ".join(p["fit"]["families"]),
                top=next_to_explain(book.ranked, book.tested)))
        return f"{note}\n{text}" if note else text

    def _tools(self, category: str) -> bool:
        """Whether the AIA (not the single-round baseline) has the FIT tool here."""
        return (self.rounds > 0 and "fit" in self.tools
                and category in self.prompts["fit"]["categories"])

    def _fit(self, reply: str, book: Notebook) -> str | None:
        """Runs the reply's FIT, if any: None when there is none, else the note for the next
        prompt ("" when the fit was made)."""
        spec = parse_fit(reply, self.prompts["fit"]["aliases"])
        if spec is None:
            return None
        fp = self.prompts["fit"]
        if isinstance(spec, tuple) and (name := model_name(*spec, fp["names"])) in {
                f.spec for f in book.fits}:
            return fp["again"].format(model=name)
        made = run_fit(book.xy(), *spec, fp["names"]) if isinstance(spec, tuple) else spec
        if isinstance(made, str):
            return fp["bad"].format(reason=made)
        book.fits.append(made)
        return ""

    async def _ask(self, prompt: str, rnd: int) -> str:
        req = Request(messages=(("system", self.prompts["system"]), ("user", prompt)),
                      max_tokens=self.max_tokens, temperature=0.0, seed=self.seed + rnd,
                      stage=f"find-{self.name}")
        return (await self.client.complete(req)).text

    async def solve(self, box: BlackBox, category: str) -> Answer:
        book = Notebook()
        track = category in self.prompts["guesses"]["categories"]  # keep guesses only there
        tools = self._tools(category)
        calls, violations, note = 0, 0, ""
        transcript: list[str] = []

        def done(ans: Answer) -> Answer:
            ans.llm_calls, ans.rounds, ans.transcript = calls, calls, transcript[-6:]
            return ans

        try:
            if self.n_random:
                book.observe(box, category,
                             random_inputs(category, random.Random(self.seed), self.n_random))
            repeats, rnd, last = 0, 0, False
            while not last:
                rnd += 1
                last = rnd == self.rounds + 1 or repeats >= MAX_REPEATS
                reply = await self._ask(self._prompt(category, book, rnd, last, note), rnd)
                calls += 1
                transcript.append(reply[:600])
                reply, used = use_fit(reply, book.fits) if tools else (reply, None)
                final = parse_final(reply, category) if rnd > self.min_rounds or last else None
                if final is not None:
                    if used is not None:  # the fit's code, so its interval too
                        final.interval = used.interval
                    return done(final)
                xs = None if last else parse_call(reply, category, self.max_inputs)
                fitted = self._fit(reply, book) if tools and xs is None and not last else None
                if fitted is not None:
                    violations = violations + 1 if fitted else 0
                    repeats, note = 0, fitted
                    if violations >= MAX_VIOLATIONS:
                        return done(Answer(failure=f"the LLM never answered the protocol "
                                           f"({violations} unusable replies)"))
                    continue
                if xs is not None and not set(map(_key, xs)) - book.seen:
                    repeats += 1
                    note = self.prompts["repeated" if repeats < MAX_REPEATS else "nothing_new"]
                    continue
                if xs is None:
                    violations += 1
                    note = self.prompts["not_understood"]
                    if violations >= MAX_VIOLATIONS or last:
                        return done(Answer(failure=f"the LLM never answered the protocol "
                                           f"({violations} replies with neither a usable CALL "
                                           "nor FINAL)"))
                    continue
                repeats = 0
                violations, note = 0, ""
                values = list(book.observe(box, category, xs).values())
                guess = parse_guess(reply) if track else None
                if guess and values:  # judged on the new, distinct inputs of its CALL
                    book.guesses.append((guess, sum(values) / len(values), len(values)))
                    book.tested.update(map(_show, xs))
                if tools and (fitted := self._fit(reply, book)):
                    note = fitted  # a CALL and a FIT in one reply: the fit uses the new data
        except FunctionFailure as e:
            return done(Answer(failure=str(e)))
        except UserError:  # a setup error (401, 403, 404) ends the run, not one function
            raise
        except Exception as e:  # noqa: BLE001 - an LLM or backend failure ends this function
            return done(Answer(failure=f"LLM error: {type(e).__name__}: {e}"[:300]))
        return done(Answer(failure="no final answer"))
