"""The queue's shared bookkeeping in Redis, so that every web process on every machine sees the same
counts: requests queued (the QUEUE_SIZE bound), requests in flight per API key (MAX_QUEUED_PER_KEY),
cancel marks, the claims that keep a redelivered task from running twice, the answers to /generate
requests, and the GPU workers' heartbeats. Checks and reservations are one Lua script, so N web processes
cannot let N times a limit through."""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated

import redis
from pydantic import BaseModel, Field, StringConstraints, ValidationError

from service.admission import FIRST_GUESS_S, key_share_used, queue_full, running_average
from service.interface import Description, ServiceState
from service.redis_connection import PREFIX, reachable

QUEUED = PREFIX + "queued"
AVERAGE_SECONDS = PREFIX + "average-seconds"
# A generation's time above this (an hour) is no GPU worker's record.
MAX_AVERAGE_S = 3600.0
WORKERS = PREFIX + "gpu-worker:"
log = logging.getLogger(__name__)
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


# KEYS: the claim. ARGV: the dead holder, the new one, ttl.
_TAKE_OVER = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


def owner_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}"


def cancel_key(request_id: str) -> str:
    return f"{PREFIX}cancel:{request_id}"


def reply_key(request_id: str) -> str:
    return f"{PREFIX}reply:{request_id}"


def claim_key(request_id: str) -> str:
    return f"{PREFIX}claim:{request_id}"


def done_key(request_id: str) -> str:
    return f"{PREFIX}done:{request_id}"


class Heartbeat(BaseModel):
    """What a GPU worker says of itself every few seconds."""

    name: Annotated[str, StringConstraints(max_length=300)]
    # Celery's names: the worker's node (as Flower lists it) and the queue it takes tasks from.
    node: Annotated[str, StringConstraints(max_length=300)] = ""
    queue: Annotated[str, StringConstraints(max_length=100)] = ""
    state: ServiceState
    device: Annotated[str, StringConstraints(max_length=100)]
    # What its model is, once loaded (/info answers it).
    about: Description | None = None
    running: int = Field(ge=0)
    images: int = Field(ge=0)
    # When it beat (its own clock): each beat differs from the last.
    beat: int = 0


class Ledger:
    def __init__(self, client: redis.Redis, queue_size: int, max_per_owner: int, horizon_s: float) -> None:
        """`horizon_s`: entries older than this are dropped (left by a process that died mid-way)."""
        self.redis = client
        self.queue_size, self.max_per_owner, self.horizon_s = queue_size, max_per_owner, horizon_s
        self._reserve = client.register_script(_RESERVE)
        self._take_over = client.register_script(_TAKE_OVER)

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

    def claim(self, request_id: str, worker: str) -> str | None:
        """None once `worker` holds the request (it is running it); else the worker that holds it (`worker`
        itself for a copy of its own task that Redis handed out again). A claim lasts until the request
        finishes, or another worker takes it over from a holder whose heartbeat stopped."""
        key = claim_key(request_id)
        if self.redis.set(key, worker, nx=True, ex=int(self.horizon_s)):
            return None
        return (self.redis.get(key) or b"").decode()

    def take_over(self, request_id: str, holder: str, worker: str) -> bool:
        """The claim of a dead `holder` passes to `worker`; False when someone else took it first."""
        return bool(self._take_over(keys=[claim_key(request_id)], args=[holder, worker, int(self.horizon_s)]))

    def heartbeat(self, worker: str) -> bytes | None:
        """The worker's last heartbeat as it lies in Redis (each beat differs), None once it expired."""
        return self.redis.get(WORKERS + worker)

    def finished(self, request_id: str) -> bool:
        return bool(self.redis.exists(done_key(request_id)))

    def finish(self, request_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.set(done_key(request_id), 1, ex=int(self.horizon_s))
        pipe.delete(claim_key(request_id))
        pipe.execute()

    def queue_depth(self) -> int:
        with reachable():
            self.redis.zremrangebyscore(QUEUED, "-inf", time.time() - self.horizon_s)
            return self.redis.zcard(QUEUED)

    def position(self, request_id: str) -> int | None:
        with reachable():
            return self.redis.zrank(QUEUED, request_id)

    def reply(self, request_id: str, message: dict) -> None:
        """A /generate request's answer, for the web process that waits for it (or for nobody, once it gave up:
        the answer then expires)."""
        pipe = self.redis.pipeline()
        pipe.rpush(reply_key(request_id), json.dumps(message))
        pipe.expire(reply_key(request_id), int(self.horizon_s))
        pipe.execute()

    def next_reply(self, client: redis.Redis, request_id: str, timeout_s: int) -> object | None:
        """The answer, read with `client` (its socket timeout longer than `timeout_s`), or None after `timeout_s`."""
        popped = client.blpop([reply_key(request_id)], timeout=timeout_s)
        return json.loads(popped[1]) if popped else None

    def average_seconds(self) -> float:
        """A generation's time, as the GPU workers recorded it (a value no worker could have written counts as
        the first guess)."""
        with reachable():
            value = self.redis.get(AVERAGE_SECONDS)
        try:
            average = float(value) if value else FIRST_GUESS_S
        except ValueError:
            return FIRST_GUESS_S
        return average if 0 <= average <= MAX_AVERAGE_S else FIRST_GUESS_S

    def record_seconds(self, seconds: float) -> None:
        self.redis.set(AVERAGE_SECONDS, running_average(self.average_seconds(), seconds))

    def beat(self, name: str, heartbeat: dict) -> None:
        self.redis.set(WORKERS + name, json.dumps(heartbeat), ex=HEARTBEAT_TTL_S)

    def workers(self) -> list[dict]:
        """The GPU workers whose heartbeat is fresh, as each describes itself (a heartbeat this service cannot
        have written is left out)."""
        with reachable():
            names = list(self.redis.scan_iter(match=WORKERS + "*", count=100))
            values = self.redis.mget(names) if names else []
        beats = []
        for value in filter(None, values):
            try:
                beats.append(Heartbeat.model_validate_json(value).model_dump())
            except ValidationError:
                log.warning("a GPU worker heartbeat in Redis that this service cannot have written is ignored")
        return beats

    def _refuse(self, refusal: int, count: int) -> None:
        if refusal == 1:
            raise key_share_used(count, self.average_seconds())
        if refusal == 2:
            raise queue_full(self.queue_size, self.average_seconds() * self.queue_size)
