"""What admitting a generation request means wherever its queue lives (a thread's in local mode, Redis in celery
mode): the two refusals, in one wording, and the running average of a generation's time that says how long to
wait."""

from __future__ import annotations

import math

from service.errors import QueueFull, TooManyRequests

# A generation's time before any has run, in seconds.
FIRST_GUESS_S = 1.0


def running_average(average_s: float, seconds: float) -> float:
    """A generation's time as the latest ones tell it: each new one counts for a fifth."""
    return 0.8 * average_s + 0.2 * seconds


def key_share_used(count: int, average_s: float) -> TooManyRequests:
    wait = max(1, math.ceil(average_s))
    return TooManyRequests(
        f"This API key already has {count} requests queued or running, the most one key may have "
        f"(MAX_QUEUED_PER_KEY); wait for one to finish (about {wait} s).",
        retry_after=wait,
    )


def queue_full(queue_size: int, wait_s: float) -> QueueFull:
    wait = max(1, math.ceil(wait_s))
    return QueueFull(
        f"The generation queue is full ({queue_size} waiting); retry in about {wait} s.", retry_after=wait
    )
