"""The program simulator: the LLM turns an explanation into code, and the code simulates.

One chat call per explanation (not per record) asks for a Python function
``activation(tokens) -> list[float]``; template and few-shot answers are in
``data/prompts/program.json``. The function never sees activations: it is written from the
explanation alone, then checked on a fixed probe text and run on every record in the sandbox
(``sandbox.Worker``: time, memory and CPU limits, no network, no writes outside its folder).
A program that fails on the probe gets ``program_repairs`` more calls with the error; one that
still fails, or fails on a record, raises ``SimulationError`` with the reason.

It needs no logprobs and costs one LLM call per explanation however many records are scored.
Code can state conditions (``only when negated``, ``right after "of"``) exactly, when the LLM
writes it right: Qwen2.5-Coder-1.5B mostly does not (1 of OpenAI's 19 puzzles, see README).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Sequence
from typing import Any

from neuroscribe.formats import SequenceSimulation
from neuroscribe.llm.client import Request
from neuroscribe.prompts import Messages, load
from neuroscribe.sandbox import SandboxConfig, Worker, fenced_code
from neuroscribe.simulate.core import SimulateConfig, SimulationError, point_simulation
from neuroscribe.simulate.llm import LLMSimulator, fit_values

ENTRY = "activation"


def program_messages(explanation: str, errors: Sequence[tuple[str, str]] = ()) -> Messages:
    """The chat prompt: system, few-shot explanation/code pairs, the explanation; then, for a
    repair, each failed code and the error it gave on the probe text."""
    t, prefix = load("program"), load("common")["prefix"]
    msgs: list[tuple[str, str]] = [("system", t["system"])]
    for ex in t["examples"]:
        msgs.append(("user", t["user"].format(prefix=prefix, explanation=ex["explanation"])))
        msgs.append(("assistant", t["answer"].format(code=ex["code"])))
    msgs.append(("user", t["user"].format(prefix=prefix, explanation=explanation.strip())))
    probe = json.dumps(t["probe"], ensure_ascii=False)
    for code, error in errors:
        msgs.append(("assistant", t["answer"].format(code=code)))
        msgs.append(("user", t["retry"].format(probe=probe, error=error)))
    return tuple(msgs)


def extract_code(text: str) -> str:
    """The reply's first fenced code block (a block cut off by the token limit is kept), or
    the whole reply when it has no fence but defines the function."""
    code = fenced_code(text)
    code = text.strip() if code is None else code
    if f"def {ENTRY}" not in code:
        raise SimulationError(f"the reply defines no function {ENTRY}(tokens): {text[:80]!r}")
    return code


def coerce_values(output: Any, n: int) -> tuple[list[float], str]:
    """One value 0-10 per token from what the program returned, and what was repaired ('' when
    nothing). A list of the wrong length is padded with 0 or cut; None, NaN and booleans
    become numbers; values are clamped. Anything that is not a list of numbers raises."""
    if not isinstance(output, list):
        raise SimulationError(f"{ENTRY}() returned {type(output).__name__}, not a list")
    notes, values = [], []
    for v in output:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            notes.append("None or NaN as 0")
            v = 0.0
        if not isinstance(v, (int, float)):
            raise SimulationError(f"{ENTRY}() returned a list holding {type(v).__name__}")
        values.append(float(v))
    clamped = fit_values(values, n, notes)
    return clamped, "; ".join(dict.fromkeys(notes))


class ProgramSimulator(LLMSimulator):
    """Writes (and caches) one program per explanation, then runs it on every sequence."""

    def __init__(self, cfg: SimulateConfig, client: Any = None) -> None:
        super().__init__(cfg, client)
        self.worker = Worker(SandboxConfig(timeout=cfg.program_timeout, isolation=cfg.sandbox))
        self.programs: dict[str, str | SimulationError] = {}
        self.pending: dict[str, asyncio.Task[str | SimulationError]] = {}
        self.lock = threading.Lock()  # one sandbox process serves every call, one at a time

    def _run(self, code: str, sequences: Sequence[Sequence[str]]) -> list[Any]:
        """Outputs of the code on each sequence; SimulationError for a sandbox failure or an
        exception on any sequence."""
        with self.lock:
            res = self.worker.call(code, [list(s) for s in sequences], ENTRY)
        if not res.ok:
            raise SimulationError(f"the program failed in the sandbox ({res.status}): "
                                  f"{res.reason}")
        for err in res.errors:
            if err:
                raise SimulationError(f"the program raised {err}")
        return res.outputs

    async def program(self, explanation: str) -> str:
        """The checked program for an explanation (written once; a failure is kept too)."""
        key = explanation.strip()
        got = self.programs.get(key)
        if got is None:  # concurrent callers share one write (per event loop)
            task = self.pending.get(key)
            if task is None or task.get_loop() is not asyncio.get_running_loop():
                task = self.pending[key] = asyncio.ensure_future(self._write(key))
            got = self.programs[key] = await task
            self.pending.pop(key, None)
        if isinstance(got, SimulationError):
            raise got
        return got

    async def _write(self, explanation: str) -> str | SimulationError:
        probe = load("program")["probe"]
        errors: list[tuple[str, str]] = []
        for attempt in range(self.cfg.program_repairs + 1):
            # greedy first; a repair samples, since a greedy loop would repeat itself
            resp = await self.client.complete(Request(
                messages=program_messages(explanation, errors), max_tokens=self.cfg.program_tokens,
                temperature=0.0 if attempt == 0 else 0.7, seed=attempt,
                frequency_penalty=self.cfg.program_penalty, stage="score"))
            if resp.completion_tokens >= self.cfg.program_tokens:
                errors.append((resp.text.strip(), f"the code was cut off at "
                               f"{self.cfg.program_tokens} tokens; write it shorter"))
                continue
            try:
                code = extract_code(resp.text)
            except SimulationError as e:
                errors.append((resp.text.strip(), str(e)))
                continue
            try:
                out = (await asyncio.to_thread(self._run, code, [probe]))[0]
                coerce_values(out, len(probe))
            except SimulationError as e:
                errors.append((code, str(e)))
                continue
            self.stats["programs"] += 1
            self.stats["repaired programs"] += bool(errors)
            return code
        self.stats["failed"] += 1
        return SimulationError(f"no working program after {len(errors)} tries; last: "
                               f"{errors[-1][1]}")

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> SequenceSimulation:
        return (await self.simulate_many(explanation, [tokens]))[0]

    async def simulate_many(self, explanation: str,
                            sequences: Sequence[Sequence[str]]) -> list[SequenceSimulation]:
        code = await self.program(explanation)
        outputs = await asyncio.to_thread(self._run, code, sequences)
        sims = []
        for tokens, out in zip(sequences, outputs):
            values, repaired = coerce_values(out, len(tokens))
            self.stats["repaired" if repaired else "exact"] += 1
            sims.append(point_simulation(tokens, values))
        return sims

    def program_of(self, explanation: str) -> str | None:
        """The code written for an explanation (None before it was written, or if it failed),
        saved with the unit's scores."""
        got = self.programs.get(explanation.strip())
        return got if isinstance(got, str) else None

    def close(self) -> None:
        self.worker.close()
