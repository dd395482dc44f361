"""The endpoint pool behind ``--base-url a,b,c``: least-busy choice, removal after failures
and re-probing on a fake clock, waiting when every endpoint is out, and the OpenAI backend
spreading requests and retries over several (fake, in-process) HTTP endpoints."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from neuroscribe.llm.endpoints import Endpoints, split_urls


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:  # time passes only when someone waits
        self.slept.append(s)
        self.t += s


def pool(n: int = 3, **kw: Any) -> tuple[Endpoints, FakeClock]:
    clock = FakeClock()
    return Endpoints([f"u{i}" for i in range(n)], clock=clock, sleep=clock.sleep, **kw), clock


def fail(p: Endpoints, url: str, times: int) -> None:
    e = next(e for e in p.endpoints if e.url == url)
    for _ in range(times):
        e.in_flight += 1  # as if picked
        p.release(e, False)


def test_split_urls() -> None:
    assert split_urls(" http://a:1/v1/, http://b:2/v1,,") == ["http://a:1/v1", "http://b:2/v1"]


def test_requests_go_to_the_least_busy_endpoint() -> None:
    p, _ = pool()
    first = [p.pick().url for _ in range(3)]  # type: ignore[union-attr]
    assert first == ["u0", "u1", "u2"]  # idle endpoints take turns
    assert [e.in_flight for e in p.endpoints] == [1, 1, 1]
    p.release(p.endpoints[1], True)
    assert p.pick().url == "u1"  # type: ignore[union-attr]  # the only one with room
    p.endpoints[0].in_flight = 5
    got = Counter(p.pick().url for _ in range(4))  # type: ignore[union-attr]
    assert got == {"u1": 2, "u2": 2}  # u0 stays the busiest until the others catch up


def test_a_retry_avoids_the_endpoint_that_failed_it() -> None:
    p, _ = pool()
    e = p.pick("req")
    assert e is not None and e.url == "u0"
    p.release(e, False, "req")
    p.endpoints[1].in_flight = p.endpoints[2].in_flight = 1
    assert p.pick("req").url == "u1"  # type: ignore[union-attr]  # busier, but not u0
    assert p.pick("other").url == "u0"  # type: ignore[union-attr]  # others still use it
    for x in p.endpoints:
        x.in_flight = 0
    p.release(p.pick("req"), True, "req")  # type: ignore[arg-type]  # answered: forgotten
    p.endpoints[1].in_flight = p.endpoints[2].in_flight = 1
    assert p.pick("req").url == "u0"  # type: ignore[union-attr]


def test_failing_endpoint_leaves_rotation_and_is_probed_after_a_doubling_cooldown() -> None:
    p, clock = pool(max_failures=3, cooldown=30.0)
    fail(p, "u0", 2)
    assert "u0" in {p.pick().url for _ in range(3)}  # type: ignore[union-attr]  # 2 < 3
    for e in p.endpoints:
        e.in_flight = 0
    fail(p, "u0", 1)  # the third in a row: out for 30 s
    assert all(p.pick().url != "u0" for _ in range(6))  # type: ignore[union-attr]
    for e in p.endpoints:
        e.in_flight = 0
    fail(p, "u0", 2)  # requests sent before it went out fail late: no longer out
    clock.t = 29.9
    assert all(p.pick().url != "u0" for _ in range(3))  # type: ignore[union-attr]
    clock.t = 30.0  # back on probation: one probe at a time, even though it is the least busy
    probe = p.pick()
    assert probe is not None and probe.url == "u0"
    assert all(p.pick().url != "u0" for _ in range(3))  # type: ignore[union-attr]
    p.release(probe, False)  # the probe failed: out again, for twice as long
    clock.t = 89.9
    assert all(p.pick().url != "u0" for _ in range(3))  # type: ignore[union-attr]
    clock.t = 90.0
    probe = p.pick()
    assert probe is not None and probe.url == "u0"
    p.release(probe, True)  # the probe succeeded: back for good, cooldown reset
    assert (probe.failures, probe.next_cooldown) == (0, 30.0)
    for e in p.endpoints:
        e.in_flight = 0
    assert {p.pick().url for _ in range(3)} == {"u0", "u1", "u2"}  # type: ignore[union-attr]


def test_when_all_are_out_a_request_waits_for_the_first_back() -> None:
    p, clock = pool(2, cooldown=30.0)
    fail(p, "u1", 3)
    clock.t = 10.0
    fail(p, "u0", 3)  # u0 back at 40, u1 at 30
    assert p.pick() is None
    e = asyncio.run(p.acquire())
    assert e.url == "u1" and clock.t == 30.0 and clock.slept == [20.0]
    # While the only one back is being probed, the next request polls until it is answered.
    clock.slept.clear()
    assert asyncio.run(p.acquire()).url == "u0" and clock.t == 40.0


def test_a_single_endpoint_is_never_taken_out() -> None:
    p, _ = pool(1)
    fail(p, "u0", 10)
    assert p.pick() is not None and p.endpoints[0].out_until == 0.0


def test_a_429_is_no_verdict() -> None:
    p, _ = pool(2)
    e = p.pick()
    assert e is not None
    p.release(e, None)
    assert e.failures == 0 and e.in_flight == 0


# --- the OpenAI backend over three fake endpoints -------------------------------------------


def test_openai_backend_spreads_requests_and_retries_around_a_dead_endpoint() -> None:
    httpx = pytest.importorskip("httpx")
    from neuroscribe.llm.backends import OpenAIBackend
    from neuroscribe.llm.client import Client, LLMConfig, Request

    seen: Counter[str] = Counter()
    in_flight: Counter[str] = Counter()

    async def handler(request: Any) -> Any:
        host = request.url.host
        seen[host] += 1
        if host == "dead":
            raise httpx.ConnectError("refused", request=request)
        in_flight[host] += 1
        await asyncio.sleep(0.01)
        in_flight[host] -= 1
        return httpx.Response(200, json={"choices": [{"text": f"from {host}"}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    async def no_wait(_: float) -> None:
        await asyncio.sleep(0)

    cfg = LLMConfig(provider="openai", llm_model="m", concurrency=6, retries=2,
                    base_url="http://a/v1, http://dead/v1,http://b/v1")
    backend = OpenAIBackend(cfg)
    assert [e.url for e in backend.pool.endpoints] == ["http://a/v1", "http://dead/v1",
                                                       "http://b/v1"]
    client = Client(backend, cfg, None, sleep=no_wait)

    async def go() -> list[Any]:
        backend._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        backend._loop = asyncio.get_running_loop()
        return await asyncio.gather(*[client.complete(Request(prompt=f"p{i}", max_tokens=1))
                                      for i in range(30)])

    out = asyncio.run(go())
    assert all(r.text in ("from a", "from b") for r in out)  # every retry went elsewhere
    assert seen["dead"] == 3  # three failures in a row, then out of rotation
    assert abs(seen["a"] - seen["b"]) <= 6 and seen["a"] + seen["b"] == 30
    report = backend.pool.report()
    assert report["http://dead/v1"] == {"sent": 3, "failed": 3}
    assert client.usage["default"].retries == 3
