"""The queue's shared bookkeeping in Redis, so that every web process on every machine sees the same
counts: requests queued (the QUEUE_SIZE bound), requests in flight per API key (MAX_QUEUED_PER_KEY),
cancel marks, replies from GPU workers, and the GPU workers' heartbeats. Checks and reservations are one
Lua script, so N web processes cannot let N times a limit through."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from service.errors import QueueFull, QueueUnreachable, TooManyRequests

PREFIX = "sd:"
QUEUED = PREFIX + "queued"
AVERAGE_SECONDS = PREFIX + "average-seconds"
WORKERS = PREFIX + "gpu-worker:"
# A GPU worker that has not renewed its heartbeat for this long counts as gone.
HEARTBEAT_TTL_S = 10

# KEYS: queued, the owner's set. ARGV: now, stale-before, queue size (0: do not queue), per-owner limit, id, ttl.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
local mine = redis.call('ZCARD', KEYS[2])
if mine >= tonumber(ARGV[4]) then return {1, mine} end
local queued = redis.call('ZCARD', KEYS[1])
if tonumber(ARGV[3]) > 0 then
  if queued >= tonumber(ARGV[3]) then return {2, queued} end
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[5])
end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {0, queued}
"""


# KEYS: the lease. ARGV: the follower, ttl. Renewed when it is the follower's or free; 0 when another's.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def owner_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}"


def cancel_key(request_id: str) -> str:
    return f"{PREFIX}cancel:{request_id}"


def reply_key(request_id: str) -> str:
    return f"{PREFIX}reply:{request_id}"


def follow_key(request_id: str) -> str:
    return f"{PREFIX}follow:{request_id}"


def claim_key(request_id: str) -> str:
    return f"{PREFIX}claim:{request_id}"


def done_key(request_id: str) -> str:
    return f"{PREFIX}done:{request_id}"


@contextmanager
def reachable() -> Iterator[None]:
    """Redis failures become a 503 that says what to do, at once (the client has short timeouts)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError):
        raise QueueUnreachable(
            "The queue's Redis server (REDIS_URL) cannot be reached; retry in a few seconds.", retry_after=5
        ) from None


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30, retry_on_timeout=False
    )


class Ledger:
    def __init__(self, client: redis.Redis, queue_size: int, max_per_owner: int, horizon_s: float) -> None:
        """`horizon_s`: entries older than this are dropped (left by a process that died mid-way)."""
        self.redis = client
        self.queue_size, self.max_per_owner, self.horizon_s = queue_size, max_per_owner, horizon_s
        self._reserve = client.register_script(_RESERVE)
        self._renew = client.register_script(_RENEW)

    def check(self, owner: str) -> None:
        """Raise now what `reserve` would (without reserving)."""
        with reachable():
            mine = self.redis.zcard(owner_key(owner))
            queued = self.redis.zcard(QUEUED)
        self._refuse(1 if mine >= self.max_per_owner else 2 if queued >= self.queue_size else 0, mine)

    def reserve(self, owner: str, request_id: str, queue: bool = True) -> None:
        """Count the request against the key (and, with `queue`, against the queue), or raise."""
        now = time.time()
        args = [now, now - self.horizon_s, self.queue_size if queue else 0, self.max_per_owner, request_id,
                int(self.horizon_s)]
        with reachable():
            refusal, count = self._reserve(keys=[QUEUED, owner_key(owner)], args=args)
        self._refuse(refusal, count)

    def left_queue(self, request_id: str) -> bool:
        """A GPU worker took it; False when it had left already (canceled, or taken by another worker)."""
        with reachable():
            return bool(self.redis.zrem(QUEUED, request_id))

    def release(self, owner: str, request_id: str) -> None:
        with reachable():
            pipe = self.redis.pipeline()
            pipe.zrem(QUEUED, request_id)
            pipe.zrem(owner_key(owner), request_id)
            pipe.execute()

    def cancel(self, request_id: str, owner: str) -> bool:
        """Marked for the GPU worker (it skips the task, or stops the run at its next step); a queued request
        leaves the queue and its key's count now (True)."""
        with reachable():
            pipe = self.redis.pipeline()
            pipe.set(cancel_key(request_id), 1, ex=int(self.horizon_s))
            pipe.zrem(QUEUED, request_id)
            _, was_queued = pipe.execute()
            if was_queued and owner:
                self.redis.zrem(owner_key(owner), request_id)
        return bool(was_queued)

    def canceled(self, request_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(request_id)))

    def claim(self, request_id: str, worker: str) -> bool:
        """Whether this worker may run the request: no live worker holds it (a claim lapses unless renewed
        every HEARTBEAT_TTL_S) and it has not finished."""
        if self.redis.exists(done_key(request_id)):
            return False
        return bool(self.redis.set(claim_key(request_id), worker, nx=True, ex=HEARTBEAT_TTL_S))

    def holder(self, request_id: str) -> str | None:
        """The worker running the request now, if any."""
        value = self.redis.get(claim_key(request_id))
        return value.decode() if value else None

    def finished(self, request_id: str) -> bool:
        return bool(self.redis.exists(done_key(request_id)))

    def renew(self, request_ids: list[str]) -> None:
        pipe = self.redis.pipeline()
        for request_id in request_ids:
            pipe.expire(claim_key(request_id), HEARTBEAT_TTL_S)
        pipe.execute()

    def finish(self, request_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.set(done_key(request_id), 1, ex=int(self.horizon_s))
        pipe.delete(claim_key(request_id))
        pipe.execute()

    def hold(self, request_id: str, follower: str, first: bool = False) -> bool:
        """The web process `follower` reads the request's replies (a lease, renewed while it does);
        `first`: only when nobody holds it (a follower whose process died lets its lease lapse)."""
        return bool(self.redis.set(follow_key(request_id), follower, ex=HEARTBEAT_TTL_S, nx=first))

    def renew_hold(self, request_id: str, follower: str) -> bool:
        """Renew `follower`'s lease; False when another follower holds it."""
        return bool(self._renew(keys=[follow_key(request_id)], args=[follower, HEARTBEAT_TTL_S]))

    def queue_depth(self) -> int:
        with reachable():
            self.redis.zremrangebyscore(QUEUED, "-inf", time.time() - self.horizon_s)
            return self.redis.zcard(QUEUED)

    def position(self, request_id: str) -> int | None:
        with reachable():
            return self.redis.zrank(QUEUED, request_id)

    def reply(self, request_id: str, message: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.rpush(reply_key(request_id), json.dumps(message))
        pipe.expire(reply_key(request_id), int(self.horizon_s))
        pipe.execute()

    def next_reply(self, request_id: str, timeout_s: int) -> dict | None:
        popped = self.redis.blpop([reply_key(request_id)], timeout=timeout_s)
        return json.loads(popped[1]) if popped else None

    def forget(self, request_id: str) -> None:
        """Replies nobody reads any more; a cancel mark stays (until it expires) for a worker yet to see it."""
        self.redis.delete(reply_key(request_id))

    def average_seconds(self) -> float:
        with reachable():
            value = self.redis.get(AVERAGE_SECONDS)
        return float(value) if value else 1.0

    def record_seconds(self, seconds: float) -> None:
        average = self.average_seconds()
        self.redis.set(AVERAGE_SECONDS, 0.8 * average + 0.2 * seconds)

    def beat(self, name: str, about: dict) -> None:
        self.redis.set(WORKERS + name, json.dumps(about), ex=HEARTBEAT_TTL_S)

    def workers(self) -> list[dict]:
        """The GPU workers whose heartbeat is fresh, as each describes itself."""
        with reachable():
            names = list(self.redis.scan_iter(match=WORKERS + "*", count=100))
            values = self.redis.mget(names) if names else []
        return [json.loads(value) for value in values if value]

    def _refuse(self, refusal: int, count: int) -> None:
        if refusal == 1:
            wait = max(1, math.ceil(self.average_seconds()))
            raise TooManyRequests(
                f"This API key already has {count} requests queued or running, the most one key may have "
                f"(MAX_QUEUED_PER_KEY); wait for one to finish (about {wait} s).",
                retry_after=wait,
            )
        if refusal == 2:
            wait = max(1, math.ceil(self.average_seconds() * self.queue_size))
            raise QueueFull(
                f"The generation queue is full ({self.queue_size} waiting); retry in about {wait} s.",
                retry_after=wait,
            )
