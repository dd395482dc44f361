"""The intervention scorer's LLM judge (``--intervention-judge llm``): the continuations a
steered or unsteered model wrote, shuffled and in batches, each answered 1 when it shows what
the explanation describes (``data/prompts/classify.json``, ``intervention``). A text's score
is the judge's P(1) where the provider gives logprobs, else its 0/1 answer."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from neuroscribe.score.classify import Example, LLMClassifier


class LLMJudge(LLMClassifier):
    kind = "intervention"

    async def _rate(self, explanation: str, texts: list[str]) -> list[float]:
        answers, probs = await self._batch(explanation, [Example((t,), False) for t in texts])
        return probs if probs is not None else [float(a) for a in answers]

    async def __call__(self, explanation: str, texts: list[str]) -> list[float]:
        """One score per text, in the order given (the judge sees them shuffled)."""
        order = list(range(len(texts)))
        random.Random(self.cfg.classify_seed).shuffle(order)
        size = max(1, self.cfg.classify_batch)
        parts = [order[i:i + size] for i in range(0, len(order), size)]
        rated = await asyncio.gather(*[self._rate(explanation, [texts[j] for j in p])
                                       for p in parts])
        out: list[Any] = [None] * len(texts)
        for p, r in zip(parts, rated):
            for j, v in zip(p, r):
                out[j] = v
        return out
