"""The one Redis of QUEUE_BACKEND=celery, as every part of the service reaches it: how to connect, the key
prefix, and how its failures become a quick 503. A Redis that hangs (SIGSTOP, a network partition) looks
like one that answers slowly; each call waits at most a short socket timeout, and after one such timeout
calls fail at once for a moment instead of each waiting again, so every endpoint answers within 2 s."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from service.errors import QueueUnreachable

PREFIX = "sd:"
# A web process's calls: health, admission, job records (milliseconds on a live Redis). Twice this (the rate
# limiter's calls, then the service's) stays under the 2 s in which every endpoint answers.
WEB_TIMEOUT_S = 0.8
# After a failure, how long calls are refused without trying (then the next one tries again).
OPEN_S = 1.0
UNREACHABLE = "The queue's Redis server (REDIS_URL) cannot be reached; retry in a few seconds."


def connect(url: str, timeout_s: float = WEB_TIMEOUT_S) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=min(timeout_s, 2), socket_timeout=timeout_s, health_check_interval=30,
        retry_on_timeout=False,
    )


class _Breaker:
    """Redis counts as out of reach for OPEN_S after a call failed to reach it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_until = 0.0

    def check(self) -> None:
        if time.monotonic() < self._open_until:
            raise QueueUnreachable(UNREACHABLE, retry_after=5)

    def trip(self) -> None:
        with self._lock:
            self._open_until = time.monotonic() + OPEN_S


_BREAKER = _Breaker()


@contextmanager
def reachable() -> Iterator[None]:
    """Redis failures become a 503 that says what to do, at once (a process has one REDIS_URL)."""
    _BREAKER.check()
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError):
        _BREAKER.trip()
        raise QueueUnreachable(UNREACHABLE, retry_after=5) from None
