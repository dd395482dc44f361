"""Read a language model's distribution over activation values at the slots of a prompt.

The ``openai`` simulator asks a model to continue ``token<tab>`` with an activation 0-10. Two
facts of real tokenizers make reading that continuation harder than OpenAI's code assumed:

- **Numbers are split.** Qwen2.5, SmolLM2, Llama-2, Mistral and Gemma write "10" as the
  tokens "1" "0". The probability of the value 1 is P("1") * (1 - P("0" | "1")) and that of
  10 is P("1") * P("0" | "1"). ``value_probs`` walks the values' token sequences as a trie and
  evaluates each shared prefix once, so any tokenizer is read exactly.
- **A top-k list may hold no digit.** Here the model's full next-token distribution is read,
  so every value gets its probability, and the *value mass* (the sum over all values) says
  how much of the model's belief was an activation at all.

``read_slots`` fills a prompt slot by slot through a KV cache. The filler written into each
slot before the next is read is either fixed text (OpenAI's ``unknown``, or ``0``) or the
model's own expected value (``self``), which shows the model a normal ``token<tab>value``
column instead of a column of ``unknown`` to copy.

Backends supply an ``LM``: llama.cpp (``neuroscribe.llm.backends``) and transformers
(``HFLM`` here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

FILL_SELF = "self"  # fill each slot with the rounded expected value just read


class LM(Protocol):
    """A causal LM with a KV cache that can be cut back."""

    n_past: int

    def evaluate(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids``; return the log-probabilities of the next token (full vocabulary)."""
        ...

    def truncate(self, n: int) -> None:
        """Forget every position from ``n`` on."""
        ...


def log_softmax(logits: Any) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def value_probs(lm: LM, logp: np.ndarray, codes: Sequence[Sequence[int]],
                floor: float = 1e-4) -> list[float]:
    """Probability of each value (``codes[v]`` is the token sequence of value v) at the
    position whose next-token log-probabilities are ``logp``; the KV cache ends there.

    A prefix shared with a longer value (the "1" of "10") is evaluated once to split its
    probability between the values that stop there and those that go on. A prefix whose
    probability is below ``floor`` is not evaluated: its probability goes to the value that
    stops there (the error is at most ``floor`` times the value range)."""
    probs = [0.0] * len(codes)

    def walk(prefix: tuple[int, ...], logp: np.ndarray, p_prefix: float) -> None:
        kids: dict[int, list[int]] = {}
        for v, code in enumerate(codes):
            if len(code) > len(prefix) and tuple(code[: len(prefix)]) == prefix:
                kids.setdefault(code[len(prefix)], []).append(v)
        for tok, vals in kids.items():
            node = (*prefix, tok)
            p = p_prefix * math.exp(logp[tok])
            stops = [v for v in vals if len(codes[v]) == len(node)]
            if len(stops) == len(vals) or p < floor:
                if stops:
                    probs[stops[0]] += p
                continue
            mark = lm.n_past
            deeper = lm.evaluate([tok])
            before = sum(probs)
            walk(node, deeper, p)
            lm.truncate(mark)
            if stops:  # what the longer values did not take stops here
                probs[stops[0]] += max(0.0, p - (sum(probs) - before))

    walk((), logp, 1.0)
    return probs


def expected_value(probs: Sequence[float]) -> float:
    """Expected value of the distribution renormalised over the values (0 with no mass)."""
    mass = sum(probs)
    return sum(v * p for v, p in enumerate(probs)) / mass if mass > 0 else 0.0


def read_slots(lm: LM, segments: Sequence[Sequence[int]], codes: Sequence[Sequence[int]],
               fill: Sequence[int] | None) -> list[list[float]]:
    """Value probabilities at each slot. Segment i is the text before slot i (segment 0 is
    the whole prefix, appended to what the cache holds); ``fill`` is the filler's tokens, or
    None to fill each slot with its rounded expected value."""
    out: list[list[float]] = []
    pending: list[int] = []
    for seg in segments:
        logp = lm.evaluate([*pending, *seg])
        probs = value_probs(lm, logp, codes)
        out.append(probs)
        pending = list(codes[min(len(codes) - 1, round(expected_value(probs)))]
                       if fill is None else fill)
    return out


def prepare(lm: LM, cached: Sequence[int], prefix: Sequence[int]) -> list[int]:
    """Keep the cached positions shared with ``prefix`` (at least one token is always
    evaluated again, so its log-probabilities are fresh); return the rest of ``prefix``."""
    keep = 0
    while keep < min(len(cached), len(prefix) - 1) and cached[keep] == prefix[keep]:
        keep += 1
    lm.truncate(keep)
    return list(prefix[keep:])


def read_request(lm: LM, tokenize: Callable[[str], list[int]], cached: Sequence[int],
                 segments: Sequence[str], values: Sequence[str],
                 fill: str) -> tuple[list[list[float]], int]:
    """Tokenize a request's texts and read its slots; also return the tokens evaluated."""
    segs = [tokenize(s) for s in segments]
    segs[0] = prepare(lm, cached, segs[0])
    start = lm.n_past
    codes = [tokenize(v) for v in values]
    probs = read_slots(lm, segs, codes, None if fill == FILL_SELF else tokenize(fill))
    return probs, lm.n_past - start


class LlamaLM:
    """A llama-cpp-python ``Llama`` (built with ``logits_all=True``) as an ``LM``."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    @property
    def n_past(self) -> int:
        return int(self.llm.n_tokens)

    def evaluate(self, ids: Sequence[int]) -> np.ndarray:
        if self.llm.n_tokens + len(ids) > self.llm.n_ctx():
            from neuroscribe.llm.client import LLMError

            raise LLMError(f"the simulation prompt needs more than n_ctx {self.llm.n_ctx()} "
                           "tokens: lower --sim-batch-tokens or raise --n-ctx")
        self.llm.eval(list(ids))
        return log_softmax(self.llm.scores[self.llm.n_tokens - 1])

    def truncate(self, n: int) -> None:
        self.llm.n_tokens = min(n, self.llm.n_tokens)


class HFLM:
    """A transformers causal LM as an ``LM`` (DynamicCache, cut back with ``crop``)."""

    def __init__(self, model: Any) -> None:
        self.model, self.cache, self.n_past, self.ids = model, None, 0, []

    def evaluate(self, ids: Sequence[int]) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        x = torch.tensor([list(ids)], device=self.model.device)
        with torch.inference_mode():
            out = self.model(x, past_key_values=self.cache, use_cache=True)
        self.cache, self.n_past = out.past_key_values, self.n_past + len(ids)
        self.ids = self.ids[: self.n_past - len(ids)] + list(ids)
        return log_softmax(out.logits[0, -1].float().cpu().numpy())

    def truncate(self, n: int) -> None:
        if n <= 0:
            self.cache = None
        elif n < self.n_past and self.cache is not None:
            self.cache.crop(n - self.n_past)  # negative: drop that many (newer transformers
            # refuse a positive length; older ones take both)
        self.n_past = min(n, self.n_past)
        self.ids = self.ids[: self.n_past]
