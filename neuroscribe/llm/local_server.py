"""Local OpenAI-compatible servers (``python -m llama_cpp.server``) on loopback: start, wait
until they answer, stop. For the end-to-end tests and benchmarks that need a real server, and
for users who want to try ``--base-url`` with several endpoints on one machine.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_command(model: Path | str, port: int, threads: int = 1, n_ctx: int = 2048,
                   logits_all: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", HOST,
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "false"]
    return cmd + (["--logits_all", "true"] if logits_all else [])


def start(model: Path | str, log: Path | None = None, port: int = 0,
          **kw: int | bool) -> tuple[subprocess.Popen[bytes], str]:
    """A server process and its base URL (``http://127.0.0.1:PORT/v1``); not yet ready."""
    port = port or free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it)
    try:
        proc = subprocess.Popen(server_command(model, port, **kw), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    return proc, f"http://{HOST}:{port}/v1"


def wait_ready(proc: subprocess.Popen[bytes], base_url: str, log: Path | None = None,
               timeout: float = 120.0) -> None:
    """Until ``GET /models`` answers 200; RuntimeError (with the log's tail) if the server
    exits or does not answer in time."""
    import httpx

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log and log.exists() else ""

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{tail()}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"llama_cpp.server did not answer in {timeout:g} s:\n{tail()}")
        time.sleep(0.25)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextmanager
def local_servers(model: Path | str, n: int, log_dir: Path | None = None,
                  **kw: int | bool) -> Iterator[list[tuple[subprocess.Popen[bytes], str]]]:
    """``n`` ready servers (process, base URL); stopped on exit."""
    logs = [log_dir / f"server{i}.log" if log_dir else None for i in range(n)]
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for log in logs:
            started.append(start(model, log, **kw))
        for (proc, url), log in zip(started, logs):
            wait_ready(proc, url, log)
        yield started
    finally:
        for proc, _ in started:
            stop(proc)
