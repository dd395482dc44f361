"""The LLM Client's shared machinery against a fake in-process backend: retries with
exponential backoff and jitter, timeouts, bounded concurrency, the persistent response cache
and per-stage accounting. Offline and fast: retry delays are recorded, never slept."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

import neuroscribe.llm.client as llm
from neuroscribe.errors import UserError
from neuroscribe.llm.client import (
    Client,
    LLMConfig,
    LLMError,
    Request,
    Response,
    ResponseCache,
    Retryable,
    make_client,
)

T = TypeVar("T")


class FakeBackend:
    """Plays a script of failures (exceptions, or "hang"), then answers; counts calls and the
    most calls in flight at once."""

    name = "fake"

    def __init__(self, model: str = "m", script: list[object] | None = None,
                 delay: float = 0.0) -> None:
        self.model = model
        self.script = list(script or [])
        self.delay = delay
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def complete(self, req: Request) -> Response:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            step = self.script.pop(0) if self.script else None
            if isinstance(step, BaseException):
                raise step
            if step == "hang":
                await asyncio.sleep(30)
            text = f"{self.model}:{req.prompt}:{req.temperature}:{req.seed}#{self.calls}"
            return Response(text=text, prompt_tokens=10 + len(req.prompt), completion_tokens=5)
        finally:
            self.in_flight -= 1


class Sleeps:
    """An injected ``sleep`` that records each backoff delay instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def cfg(**kw: object) -> LLMConfig:
    base: dict[str, object] = dict(provider="fake", llm_model="m", retries=3, timeout=5.0,
                                   concurrency=4)
    return LLMConfig(**{**base, **kw})  # type: ignore[arg-type]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_retries_retryable_errors_then_answers() -> None:
    fake = FakeBackend(script=[Retryable("HTTP 429"), Retryable("HTTP 503")])
    sleeps = Sleeps()
    client = Client(fake, cfg(retries=3), sleep=sleeps)
    resp = run(client.complete(Request(prompt="hi", stage="explain")))
    assert resp.text.endswith("#3") and not resp.cached
    assert fake.calls == 3 and len(sleeps.delays) == 2
    use = client.usage["explain"]
    assert (use.calls, use.retries, use.failed) == (1, 2, 0)


def test_backoff_grows_exponentially_with_bounded_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "random", random.Random(1234))  # jitter, reproducibly
    fake = FakeBackend(script=[Retryable("busy")] * 20)
    sleeps = Sleeps()
    client = Client(fake, cfg(retries=10), sleep=sleeps)
    with pytest.raises(LLMError):
        run(client.complete(Request(prompt="x")))
    assert fake.calls == 11 and len(sleeps.delays) == 10
    for attempt, delay in enumerate(sleeps.delays, start=1):
        base = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert base <= delay <= 2 * base <= 60.0  # exponential base plus up to 100% jitter
    grow = sleeps.delays[:6]  # below the 30 s cap the base doubles, so delays never shrink
    assert all(b >= a for a, b in zip(grow, grow[1:]))
    assert sleeps.delays[-1] > 4 * sleeps.delays[0]
    assert max(sleeps.delays) <= 60.0
    assert len(set(sleeps.delays)) == len(sleeps.delays)  # jittered, not a fixed ladder


def test_timeouts_are_retried() -> None:
    fake = FakeBackend(script=["hang", "hang"])
    sleeps = Sleeps()
    client = Client(fake, cfg(timeout=0.05, retries=2), sleep=sleeps)
    resp = run(client.complete(Request(prompt="slow")))
    assert resp.text.endswith("#3") and len(sleeps.delays) == 2
    assert client.usage["default"].retries == 2


def test_gives_up_after_retries_plus_one_attempts_with_a_reason() -> None:
    fake = FakeBackend(script=[Retryable("HTTP 500")] * 10)
    sleeps = Sleeps()
    client = Client(fake, cfg(retries=4), sleep=sleeps)
    with pytest.raises(LLMError, match=r"gave up after 5 attempts \(Retryable: HTTP 500\)"):
        run(client.complete(Request(prompt="x", stage="sim")))
    assert fake.calls == 5 and len(sleeps.delays) == 4
    use = client.usage["sim"]
    assert (use.calls, use.retries, use.failed) == (0, 4, 1)


def test_no_timeout_for_a_backend_whose_calls_cannot_be_stopped() -> None:
    """An in-process model (llama.cpp, transformers) runs in a thread that a timeout cannot
    stop: retrying would queue a second call behind the first, so the call runs to the end."""
    fake = FakeBackend(delay=0.2)
    fake.stoppable = False  # type: ignore[attr-defined]
    client = Client(fake, cfg(timeout=0.02, retries=2), sleep=Sleeps())
    resp = run(client.complete(Request(prompt="slow")))
    assert resp.text.endswith("#1") and fake.calls == 1
    assert client.usage["default"].retries == 0
    stoppable = FakeBackend(delay=0.2)
    with pytest.raises(LLMError, match="timed out"):
        run(Client(stoppable, cfg(timeout=0.02, retries=0), sleep=Sleeps()).complete(
            Request(prompt="slow")))


def test_timeout_reason_is_named() -> None:
    client = Client(FakeBackend(script=["hang"] * 3), cfg(timeout=0.02, retries=1),
                    sleep=Sleeps())
    with pytest.raises(LLMError, match=r"2 attempts \(Retryable: timed out after 0.02 s\)"):
        run(client.complete(Request(prompt="x")))


def test_llm_error_is_not_retried() -> None:
    fake = FakeBackend(script=[LLMError("HTTP 400: bad request")])
    sleeps = Sleeps()
    client = Client(fake, cfg(retries=5), sleep=sleeps)
    with pytest.raises(LLMError, match="HTTP 400"):
        run(client.complete(Request(prompt="x")))
    assert fake.calls == 1 and sleeps.delays == []
    use = client.usage["default"]
    assert (use.calls, use.retries, use.failed) == (0, 0, 1)


def test_other_exceptions_propagate_unretried() -> None:
    fake = FakeBackend(script=[ValueError("bug")])
    client = Client(fake, cfg(), sleep=Sleeps())
    with pytest.raises(ValueError, match="bug"):
        run(client.complete(Request(prompt="x")))
    assert fake.calls == 1


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_never_exceeds_the_limit(limit: int) -> None:
    fake = FakeBackend(delay=0.01)
    client = Client(fake, cfg(concurrency=limit))

    async def main() -> list[Response]:
        return await asyncio.gather(*[client.complete(Request(prompt=str(i)))
                                      for i in range(12)])

    out = run(main())
    assert len({r.text for r in out}) == 12 and fake.calls == 12
    assert fake.max_in_flight == limit


def test_retry_waits_do_not_hold_a_concurrency_slot() -> None:
    fake = FakeBackend(script=[Retryable("429")] * 3, delay=0.01)
    progress: list[int] = []

    async def sleep(delay: float) -> None:  # a real wait, during which others must proceed
        before = fake.calls
        await asyncio.sleep(0.03)
        progress.append(fake.calls - before)

    client = Client(fake, cfg(concurrency=1, retries=5), sleep=sleep)

    async def main() -> list[Response]:
        return await asyncio.gather(*[client.complete(Request(prompt=str(i)))
                                      for i in range(4)])

    assert len(run(main())) == 4 and fake.max_in_flight == 1
    assert fake.calls == 7 and len(progress) == 3 and all(n >= 1 for n in progress)


def test_one_client_serves_several_event_loops() -> None:
    fake = FakeBackend(delay=0.01)
    client = Client(fake, cfg(concurrency=1))

    async def batch(tag: str) -> list[Response]:
        return await asyncio.gather(*[client.complete(Request(prompt=f"{tag}{i}"))
                                      for i in range(3)])

    for tag in "abc":  # callers run one asyncio.run per unit with the same client
        assert len(run(batch(tag))) == 3
    assert fake.calls == 9 and fake.max_in_flight == 1


def test_cache_returns_identical_responses_without_calling_the_backend(tmp_path: Path) -> None:
    fake = FakeBackend()
    client = Client(fake, cfg(), ResponseCache(tmp_path / "r.sqlite"))
    req = Request(messages=(("system", "be brief"), ("user", "hello")), prompt="p",
                  max_tokens=7, stop=("\n",))
    first = run(client.complete(req))
    second = run(client.complete(req))
    assert fake.calls == 1
    assert not first.cached and second.cached
    assert second == Response(**{**first.__dict__, "cached": True})


def test_cache_round_trips_tokens_and_logprobs(tmp_path: Path) -> None:
    class Logprobs(FakeBackend):
        async def complete(self, req: Request) -> Response:
            self.calls += 1
            return Response(text="", prompt_tokens=3, tokens=["a", " b", "\u00e9"],
                            top_logprobs=[{}, {" b": -0.5, " c": -1.25}, {"\u00e9": -3.0}])

    fake = Logprobs()
    client = Client(fake, cfg(), ResponseCache(tmp_path / "r.sqlite"))
    req = Request(prompt="a b\u00e9", prompt_logprobs=2)
    first, second = run(client.complete(req)), run(client.complete(req))
    assert fake.calls == 1 and second.cached
    assert (second.tokens, second.top_logprobs) == (first.tokens, first.top_logprobs)


@pytest.mark.parametrize("change", [
    dict(temperature=0.7), dict(seed=1), dict(prompt="other"), dict(max_tokens=9),
    dict(stop=("x",)), dict(top_logprobs=3), dict(prompt_logprobs=3),
    dict(messages=(("user", "hi"),)),
])
def test_cache_key_covers_prompt_and_params(tmp_path: Path, change: dict) -> None:
    fake = FakeBackend()
    client = Client(fake, cfg(), ResponseCache(tmp_path / "r.sqlite"))
    base = Request(prompt="p")
    a = run(client.complete(base))
    b = run(client.complete(Request(**{**base.__dict__, **change})))
    assert fake.calls == 2 and not a.cached and not b.cached and a.text != b.text


def test_cache_key_covers_provider_and_model(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "r.sqlite")
    req = Request(prompt="p")
    m1, m2 = FakeBackend(model="m1"), FakeBackend(model="m2")
    other = FakeBackend(model="m1")
    other.name = "other-provider"
    for backend in (m1, m2, other):
        assert not run(Client(backend, cfg(), cache).complete(req)).cached
    assert (m1.calls, m2.calls, other.calls) == (1, 1, 1)
    assert run(Client(FakeBackend(model="m1"), cfg(), cache).complete(req)).cached


def test_stage_is_not_part_of_the_key(tmp_path: Path) -> None:
    fake = FakeBackend()
    client = Client(fake, cfg(), ResponseCache(tmp_path / "r.sqlite"))
    run(client.complete(Request(prompt="p", stage="explain")))
    hit = run(client.complete(Request(prompt="p", stage="simulate")))
    assert hit.cached and fake.calls == 1
    assert Request(prompt="p", stage="a").key("x", "y") == Request(prompt="p").key("x", "y")
    assert client.usage["explain"].calls == 1 and client.usage["simulate"].cached == 1


def test_cache_persists_across_clients(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "responses.sqlite"
    first = FakeBackend()
    resp = run(Client(first, cfg(), ResponseCache(path)).complete(Request(prompt="p")))
    second = FakeBackend()
    again = run(Client(second, cfg(), ResponseCache(path)).complete(Request(prompt="p")))
    assert second.calls == 0 and again.cached and again.text == resp.text


def test_failures_are_not_cached(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "r.sqlite")
    fake = FakeBackend(script=[Retryable("down")] * 2)
    client = Client(fake, cfg(retries=1), cache, sleep=Sleeps())
    with pytest.raises(LLMError):
        run(client.complete(Request(prompt="p")))
    resp = run(client.complete(Request(prompt="p")))
    assert not resp.cached and fake.calls == 3


def test_usage_accounting_per_stage(tmp_path: Path) -> None:
    fake = FakeBackend(script=[Retryable("429"), None, None, Retryable("x"), Retryable("y")])
    client = Client(fake, cfg(retries=1, price_in=2.0, price_out=10.0),
                    ResponseCache(tmp_path / "r.sqlite"), sleep=Sleeps())

    async def main() -> None:
        await client.complete(Request(prompt="ab", stage="explain"))  # 1 retry, then answer
        await client.complete(Request(prompt="abcd", stage="explain"))
        await client.complete(Request(prompt="ab", stage="explain"))  # cached
        with pytest.raises(LLMError):
            await client.complete(Request(prompt="z", stage="simulate"))
        await client.complete(Request(prompt="abcd", stage="simulate"))  # cached
        await client.complete(Request(prompt="q"))  # no stage: "default"

    run(main())
    report = client.usage_report()
    assert set(report) == {"explain", "simulate", "default"}
    ex = report["explain"]
    assert (ex["calls"], ex["cached"], ex["retries"], ex["failed"]) == (2, 1, 1, 0)
    assert (ex["prompt_tokens"], ex["completion_tokens"]) == (12 + 14, 10)
    assert ex["cost_usd"] == pytest.approx((26 * 2.0 + 10 * 10.0) / 1e6)
    sim = report["simulate"]
    assert (sim["calls"], sim["cached"], sim["retries"], sim["failed"]) == (0, 1, 1, 1)
    assert (sim["prompt_tokens"], sim["completion_tokens"], sim["cost_usd"]) == (0, 0, 0.0)
    assert report["default"]["calls"] == 1 and report["default"]["prompt_tokens"] == 11


def test_make_client_rejects_unknown_providers() -> None:
    with pytest.raises(UserError, match="unknown LLM provider"):
        make_client(cfg(provider="nope"))


def test_usage_of_sums_distinct_clients_per_stage() -> None:
    """A simulator and scorers sharing one client count once; a second client adds to it."""
    from types import SimpleNamespace

    from neuroscribe.llm.client import Usage, usage_of

    def client_with(**stages: Usage) -> Client:
        c = Client(backend=None, cfg=LLMConfig())  # type: ignore[arg-type]
        c.usage.update(stages)
        return c

    a = client_with(score=Usage(calls=2, prompt_tokens=100, completion_tokens=4, cost_usd=0.5))
    b = client_with(score=Usage(calls=1, cached=3, prompt_tokens=10),
                    explain=Usage(calls=1, completion_tokens=7))
    sim, det, fuzz = (SimpleNamespace(client=a), SimpleNamespace(client=a),
                      SimpleNamespace(client=b))
    total = usage_of(sim, det, fuzz, SimpleNamespace())
    assert total["score"] == {"calls": 3, "cached": 3, "failed": 0, "retries": 0,
                              "prompt_tokens": 110, "completion_tokens": 4, "cost_usd": 0.5}
    assert total["explain"]["completion_tokens"] == 7
    assert usage_of(SimpleNamespace()) == {}


def test_run_prints_llm_use_per_stage(tmp_path: Path) -> None:
    from neuroscribe.results import format_usage

    assert format_usage(tmp_path) == ""  # no stage, no LLM: nothing printed
    use = {"calls": 3, "cached": 1, "failed": 0, "retries": 2, "prompt_tokens": 12345,
           "completion_tokens": 67, "cost_usd": 0.0123}
    (tmp_path / "explain.json").write_text(json.dumps({"llm_usage": {"explain": use}}))
    (tmp_path / "score.json").write_text(json.dumps({"llm_usage": {}}))
    assert format_usage(tmp_path).splitlines() == [
        "LLM use:",
        "  explain      3 calls     1 cached   0 failed    12,345 prompt      67 completion "
        "tokens  $0.0123"]
