"""A fault-injecting HTTP proxy for tests, on 127.0.0.1 in front of a real local server.

Each request either gets a fault or is forwarded upstream. The fault comes from ``schedule``
(consumed in arrival order) while it lasts, then from a seeded random choice keyed by the
request body and how many times that body was seen before, so a run is reproducible however
concurrent requests interleave; a body that contains ``doomed`` always gets a fault. Setting
``active`` to False switches all faults off. Faults:

* ``429`` and ``500``: that status with a small JSON error body;
* ``stall``: no reply for ``stall_s`` seconds (past the client's timeout), then a closed
  connection;
* ``truncate``: status 200 and a full ``Content-Length``, but the connection is cut mid-body;
* ``malformed``: status 200 and a complete body that is not JSON.

``forwarded`` counts the requests passed upstream, per body digest; ``faults`` counts the
faults injected, per kind. The proxy binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "stall", "truncate", "malformed")
HOST = "127.0.0.1"


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


class FaultProxy:
    def __init__(self, upstream_port: int, fault_rate: float = 0.5, seed: int = 0,
                 schedule: list[str] | None = None, doomed: bytes | None = None,
                 stall_s: float = 5.0,
                 upstream_timeout: float = 60.0, faults: tuple[str, ...] = FAULTS) -> None:
        self.upstream_port = upstream_port
        self.fault_rate, self.seed, self.faults = fault_rate, seed, faults
        self.schedule, self.doomed, self.active = list(schedule or []), doomed, True
        self.stall_s, self.upstream_timeout = stall_s, upstream_timeout
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()  # requests received, per body digest
        self.forwarded: Counter[str] = Counter()  # requests passed upstream, per body digest
        self.injected: Counter[str] = Counter()  # faults injected, per kind
        self.stopping = threading.Event()
        handler = type("Handler", (_Handler,), {"proxy": self})
        self.server = ThreadingHTTPServer((HOST, 0), handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # ends every stall at once
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def choose(self, body: bytes) -> tuple[str, str]:
        """(body digest, what to do: a fault kind or "forward")."""
        key = digest(body)
        with self.lock:
            nth = self.seen[key]
            self.seen[key] += 1
            rng = random.Random(f"{self.seed}:{key}:{nth}")
            doomed = self.doomed is not None and self.doomed in body
            if not self.active:
                action = "forward"
            elif self.schedule:
                action = self.schedule.pop(0)
            elif rng.random() < self.fault_rate or doomed:
                action = rng.choice(self.faults)
            else:
                action = "forward"
            if action != "forward":
                self.injected[action] += 1
        return key, action

    def forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.upstream_port,
                                          timeout=self.upstream_timeout)
        try:
            conn.request(method, path, body=body or None,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        self._handle(self.rfile.read(size) if size > 0 else b"")

    def _send(self, status: int, body: bytes, cut_at: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if cut_at is None else body[:cut_at])
        self.wfile.flush()

    def _handle(self, body: bytes) -> None:
        proxy = self.proxy
        key, action = proxy.choose(body)
        if action in ("429", "500"):
            self._send(int(action), b'{"error": {"message": "injected fault"}}')
        elif action == "stall":
            proxy.stopping.wait(proxy.stall_s)
            self.close_connection = True
        elif action == "truncate":
            full = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]}'
            self._send(200, full, cut_at=len(full) // 2)
            self.close_connection = True
        elif action == "malformed":
            self._send(200, b'{"choices": [{"text": "unterminated}')
        else:
            with proxy.lock:
                proxy.forwarded[key] += 1
            try:
                status, data = proxy.forward(self.command, self.path, body)
            except OSError as e:
                status, data = 502, f'{{"error": "upstream: {e}"}}'.encode()
            self._send(status, data)
