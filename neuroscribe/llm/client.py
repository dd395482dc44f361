"""LLM clients behind one small async interface, with what every backend needs in common:
bounded concurrency, retries with exponential backoff and jitter, a persistent response cache,
and token and cost accounting per stage.

A backend only turns one ``Request`` into one ``Response``: ``LlamaCppBackend`` (local GGUF
through llama-cpp-python), ``OpenAIBackend`` (any OpenAI-compatible HTTP endpoint: OpenAI,
vLLM, Ollama, llama.cpp's server), ``AnthropicBackend`` (the Messages API) and ``HFBackend``
(local transformers). ``Client`` wraps a backend with the shared machinery.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import sqlite3
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from neuroscribe.errors import UserError
from neuroscribe.runs import opt

log = logging.getLogger("neuroscribe")


@dataclass
class LLMConfig:
    """Which LLM to call and how."""

    provider: str = opt("llamacpp", "llamacpp (local GGUF), openai (any OpenAI-compatible "
                        "endpoint), anthropic, or hf (local transformers)")
    llm_model: str = opt("", "model: for llamacpp a .gguf path, 'qwen2.5-coder-1.5b' (the "
                         "default) or 'smollm2'; for HTTP providers the served model name "
                         "(required); for hf a folder or hub id (required)")
    base_url: str = opt("", "HTTP base URL, e.g. http://127.0.0.1:8000/v1, or several "
                        "separated by commas (each request goes to the least busy; one that "
                        "keeps failing is left out for a while) (default: the provider's "
                        "public API)", identity=False)
    api_key_env: str = opt("", "environment variable that holds the API key (default: "
                           "OPENAI_API_KEY for openai, ANTHROPIC_API_KEY for anthropic)",
                           identity=False)
    concurrency: int = opt(0, "LLM requests in flight at once, and units the score stage "
                           "works on at once (0: 1 for the in-process llamacpp and hf "
                           "backends, 8 for HTTP providers)", identity=False)
    retries: int = opt(5, "retries on 429, 5xx, timeouts and malformed replies",
                       identity=False)
    timeout: float = opt(120.0, "seconds before an HTTP request is abandoned and retried "
                         "(in-process llamacpp and hf calls cannot be stopped: they run to "
                         "the end, however long a CPU takes)", identity=False)
    cache_dir: str = opt("", "response cache folder (default: ~/.cache/neuroscribe/llm)",
                         identity=False)
    n_ctx: int = opt(4096, "context size of a local llamacpp model")
    price_in: float = opt(0.0, "USD per million prompt tokens, for cost accounting",
                          identity=False)
    price_out: float = opt(0.0, "USD per million completion tokens, for cost accounting",
                           identity=False)


@dataclass(frozen=True)
class Provider:
    """What a provider needs when the user gives nothing: its model, key and concurrency."""

    in_process: bool  # llamacpp and hf run in this process, one request at a time
    model: str = ""  # "" : the user must name one
    key_env: str = ""


PROVIDERS = {
    "llamacpp": Provider(in_process=True, model="qwen2.5-coder-1.5b"),
    "hf": Provider(in_process=True),
    "openai": Provider(in_process=False, key_env="OPENAI_API_KEY"),
    "anthropic": Provider(in_process=False, key_env="ANTHROPIC_API_KEY"),
}
HTTP_CONCURRENCY = 8


def concurrency_of(cfg: LLMConfig) -> int:
    """``--concurrency``, or the provider's default when it is 0."""
    p = PROVIDERS.get(cfg.provider)
    return cfg.concurrency or (1 if p is None or p.in_process else HTTP_CONCURRENCY)


def resolve(cfg: LLMConfig) -> LLMConfig:
    """``cfg`` with the provider's defaults filled in; a provider that needs a model and got
    none is an error."""
    if cfg.provider not in PROVIDERS:
        raise UserError(f"unknown LLM provider {cfg.provider!r}; have {sorted(PROVIDERS)}")
    p = PROVIDERS[cfg.provider]
    model = cfg.llm_model or p.model
    if not model:
        raise UserError(f"--provider {cfg.provider} needs --llm-model: the "
                        + ("served model's name (e.g. gpt-4o-mini, or what your vLLM server "
                           "serves)" if not p.in_process else "a local folder or a hub id"))
    return dataclasses.replace(
        cfg, llm_model=model, api_key_env=cfg.api_key_env or p.key_env,
        concurrency=concurrency_of(cfg))


class LLMSetupError(UserError):
    """The endpoint refused who we are or what we asked for (HTTP 401, 403, 404): no unit can
    succeed, so the stage stops at once instead of failing every unit."""


# Newer fields: in the cache key only when set, so the keys of requests cached before they
# existed stay valid.
KEY_IF_SET = {"frequency_penalty", "segments", "values", "fill"}


@dataclass(frozen=True)
class Request:
    """One LLM call. ``messages`` for chat, or ``prompt`` for a raw completion."""

    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    max_tokens: int = 256
    temperature: float = 0.0
    # OpenAI's: lowers a token's logit by this per repeat (llamacpp and OpenAI-compatible
    # servers; the hf and anthropic backends have no such parameter and ignore it)
    frequency_penalty: float = 0.0
    seed: int = 0
    top_logprobs: int = 0  # top-k logprobs of each generated token
    prompt_logprobs: int = 0  # top-k logprobs of each prompt token (echo), for simulators
    stop: tuple[str, ...] = ()
    # Value reading (backends with ``reads_values``, see value_read.py): segment i is the text
    # before slot i; each slot's probabilities over ``values`` come back in ``value_probs``;
    # ``fill`` is written into a slot before the next is read ("self": its expected value).
    segments: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    fill: str = ""
    stage: str = field(default="", compare=False)  # for accounting only, not part of the key

    def key(self, provider: str, model: str) -> str:
        body = {k: v for k, v in dataclasses.asdict(self).items() if k != "stage"
                and not (k in KEY_IF_SET and not v)}
        raw = json.dumps([provider, model, body], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Response:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: list[str] = field(default_factory=list)  # echoed prompt tokens, then generated
    top_logprobs: list[dict[str, float]] = field(default_factory=list)  # one per token
    value_probs: list[list[float]] = field(default_factory=list)  # one per slot, per value
    cached: bool = False


class Retryable(Exception):
    """A transient failure: 429, 5xx, a timeout, a truncated or malformed reply."""


class LLMError(Exception):
    """A failure that retrying will not fix (a 4xx, a bad request, retries exhausted)."""


class Backend(Protocol):
    name: str
    model: str

    async def complete(self, req: Request) -> Response: ...


class ResponseCache:
    """A SQLite table of responses keyed by (provider, model, request); safe across threads
    and processes: WAL lets readers run beside a writer, and a writer waits up to
    ``busy_timeout`` seconds for another. A cache that stays locked longer costs a miss or an
    unsaved reply (logged), never a failed request."""

    def __init__(self, path: Path, busy_timeout: float = 60.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                  timeout=busy_timeout)
        self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT)")
        self.lock = threading.Lock()

    def get(self, key: str) -> Response | None:
        try:
            with self.lock:
                row = self.db.execute("SELECT value FROM responses WHERE key=?",
                                      (key,)).fetchone()
        except sqlite3.OperationalError as e:  # locked past busy_timeout: ask the LLM
            log.warning("response cache unreadable (%s): a miss", e)
            return None
        return None if row is None else Response(**{**json.loads(row[0]), "cached": True})

    def put(self, key: str, resp: Response) -> None:
        value = json.dumps({k: v for k, v in dataclasses.asdict(resp).items() if k != "cached"})
        try:
            with self.lock:
                self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, value))
        except sqlite3.OperationalError as e:  # the reply is still good: keep it, uncached
            log.warning("response cache not written (%s)", e)


@dataclass
class Usage:
    calls: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class Client:
    """A backend plus concurrency, retries, the cache and accounting."""

    def __init__(self, backend: Backend, cfg: LLMConfig, cache: ResponseCache | None = None,
                 sleep: Any = asyncio.sleep) -> None:
        self.backend, self.cfg, self.cache = backend, cfg, cache
        self.usage: dict[str, Usage] = defaultdict(Usage)
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self._sleep = sleep

    def _semaphore(self) -> asyncio.Semaphore:
        # One per event loop: a semaphore that once waited is bound to its loop, and callers
        # such as the puzzle check run one asyncio.run per item with the same client.
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.cfg.concurrency or 1), loop
        return self._sem

    @property
    def _timeout(self) -> float | None:
        """No timeout for a backend whose calls run in a thread that cannot be stopped: an
        abandoned call would go on holding the model, and its retry would queue behind it."""
        return self.cfg.timeout if getattr(self.backend, "stoppable", True) else None

    async def complete(self, req: Request) -> Response:
        key = req.key(self.backend.name, self.backend.model)
        use = self.usage[req.stage or "default"]
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            use.cached += 1
            return hit
        last: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                use.retries += 1
                delay = min(30.0, 0.5 * 2 ** (attempt - 1))
                await self._sleep(delay + random.uniform(0, delay))
            try:
                async with self._semaphore():
                    resp = await asyncio.wait_for(self.backend.complete(req), self._timeout)
            except LLMError:
                use.failed += 1
                raise
            except asyncio.TimeoutError:
                last = Retryable(f"timed out after {self.cfg.timeout:g} s")
                log.info("LLM attempt %d failed: %s", attempt + 1, last)
                continue
            except Retryable as e:
                last = e
                log.info("LLM attempt %d failed: %s", attempt + 1, e)
                continue
            use.calls += 1
            use.prompt_tokens += resp.prompt_tokens
            use.completion_tokens += resp.completion_tokens
            use.cost_usd += (resp.prompt_tokens * self.cfg.price_in
                             + resp.completion_tokens * self.cfg.price_out) / 1e6
            if self.cache is not None:
                self.cache.put(key, resp)
            return resp
        use.failed += 1
        reason = f"{type(last).__name__}: {last}" if last else "no reply"
        raise LLMError(f"gave up after {self.cfg.retries + 1} attempts ({reason})")

    def usage_report(self) -> dict[str, dict[str, Any]]:
        return {stage: dataclasses.asdict(u) for stage, u in self.usage.items()}


def usage_of(*users: Any) -> dict[str, dict[str, Any]]:
    """The LLM usage of explainers, simulators or scorers, summed per stage over their
    distinct clients (empty when none calls an LLM)."""
    clients = {id(c): c for u in users
               if isinstance(c := getattr(u, "client", None), Client)}.values()
    total: dict[str, dict[str, Any]] = {}
    for client in clients:
        for stage, use in client.usage_report().items():
            acc = total.setdefault(stage, dict.fromkeys(use, 0))
            for k, v in use.items():
                acc[k] += v
    return total


def default_cache_dir() -> Path:
    from neuroscribe.corpus import cache_dir

    return cache_dir() / "llm"


BACKENDS: dict[str, str] = {
    "llamacpp": "neuroscribe.llm.backends:LlamaCppBackend",
    "openai": "neuroscribe.llm.backends:OpenAIBackend",
    "anthropic": "neuroscribe.llm.backends:AnthropicBackend",
    "hf": "neuroscribe.llm.hf:HFBackend",
}


def make_client(cfg: LLMConfig) -> Client:
    """The configured backend wrapped in a Client, with the persistent cache."""
    import importlib

    cfg = resolve(cfg)
    module, _, cls = BACKENDS[cfg.provider].partition(":")
    backend = getattr(importlib.import_module(module), cls)(cfg)
    cache = ResponseCache(Path(cfg.cache_dir or default_cache_dir()) / "responses.sqlite")
    return Client(backend, cfg, cache)
