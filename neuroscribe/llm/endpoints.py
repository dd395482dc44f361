"""A pool of equivalent HTTP endpoints (``--base-url a,b,c``): each request goes to the least
busy one, and one that keeps failing is taken out of rotation and probed again later.

* least busy: fewest requests in flight; ties go to the endpoint with fewer recent failures,
  then to the one picked least recently (so idle endpoints take turns);
* a retry avoids the endpoint that failed it, when another one is in rotation;
* ``max_failures`` consecutive failures (a connection error, a timeout, a 5xx, a broken
  reply) take an endpoint out for ``cooldown`` seconds, doubled each time it is taken out again
  (at most ``max_cooldown``); then one request at a time probes it, and one success puts it
  back for good;
* when every endpoint is out, a request waits for the first to come back instead of failing.

With a single endpoint nothing is ever taken out: the client's own backoff governs, as before.
This is a small in-process pool, not a cluster layer: each process balances its own requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("neuroscribe")
POLL_S = 0.1  # how often a request waits while every endpoint is out or being probed


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    failures: int = 0  # consecutive
    out_until: float = 0.0  # clock time it returns to rotation (probation) after a removal
    next_cooldown: float = 0.0
    last_pick: int = -1
    sent: int = 0
    failed: int = 0


def split_urls(spec: str) -> list[str]:
    """``a, b,c/`` -> ["a", "b", "c"]: comma-separated base URLs, trailing slashes dropped."""
    return [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]


class Endpoints:
    def __init__(self, urls: Sequence[str], max_failures: int = 3, cooldown: float = 30.0,
                 max_cooldown: float = 480.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if not urls:
            raise ValueError("no endpoints")
        self.endpoints = [Endpoint(u, next_cooldown=cooldown) for u in urls]
        self.max_failures, self.cooldown, self.max_cooldown = max_failures, cooldown, max_cooldown
        self.clock, self.sleep = clock, sleep
        self._picks = 0
        self._failed_at: dict[str, str] = {}  # request key -> the endpoint its last try failed

    def __len__(self) -> int:
        return len(self.endpoints)

    def _usable(self, e: Endpoint, now: float) -> bool:
        if e.failures < self.max_failures or len(self.endpoints) == 1:
            return True
        return e.out_until <= now and e.in_flight == 0  # back from its cooldown: one probe

    def pick(self, key: str = "") -> Endpoint | None:
        """The least busy endpoint in rotation, counted as in flight (for a retry of request
        ``key``, not the one it last failed at if another will do); None when every endpoint
        is out or being probed."""
        now, avoid = self.clock(), self._failed_at.get(key)
        usable = [e for e in self.endpoints if self._usable(e, now)]
        usable = [e for e in usable if e.url != avoid] or usable
        if not usable:
            return None
        e = min(usable, key=lambda e: (e.in_flight, e.failures, e.last_pick))
        e.in_flight += 1
        e.sent += 1
        e.last_pick, self._picks = self._picks, self._picks + 1
        return e

    async def acquire(self, key: str = "") -> Endpoint:
        """Like ``pick``, but waits while no endpoint is in rotation."""
        while (e := self.pick(key)) is None:
            now = self.clock()
            back = [e.out_until - now for e in self.endpoints if e.out_until > now]
            await self.sleep(min(back, default=POLL_S))
        return e

    def release(self, e: Endpoint, healthy: bool | None, key: str = "") -> None:
        """The end of a request: ``healthy`` True (an answer, even a 4xx), False (no usable
        answer) or None (no verdict, e.g. a 429: busy is not broken)."""
        e.in_flight -= 1
        if healthy:
            self._failed_at.pop(key, None)
        elif key and len(self._failed_at) < 100_000:
            self._failed_at[key] = e.url
        if healthy:
            if e.failures >= self.max_failures and len(self.endpoints) > 1:
                log.warning("LLM endpoint %s is back in rotation", e.url)
            e.failures, e.out_until, e.next_cooldown = 0, 0.0, self.cooldown
        elif healthy is False:
            e.failed += 1
            e.failures += 1
            now = self.clock()
            # Requests sent before it was taken out fail late: they do not extend its time out.
            if e.failures >= self.max_failures and len(self.endpoints) > 1 and e.out_until <= now:
                e.out_until = now + e.next_cooldown
                log.warning("LLM endpoint %s out of rotation for %g s after %d failures in a "
                            "row", e.url, e.next_cooldown, e.failures)
                e.next_cooldown = min(2 * e.next_cooldown, self.max_cooldown)

    def report(self) -> dict[str, dict[str, int]]:
        return {e.url: {"sent": e.sent, "failed": e.failed} for e in self.endpoints}
