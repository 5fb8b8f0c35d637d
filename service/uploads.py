"""Admission of uploads: how many are decoded at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from stable_diffusion.errors import DecodersBusy


class DecodeSlots:
    """At most `count` uploads decoded (and turned into edge maps) at once, whatever the number of HTTP
    threads: a picture at the pixel limit takes several hundred MB while it is decoded, so this bounds
    the memory all requests together can take. A request waits up to `wait_s` for a slot, then gets a
    503 with Retry-After: refusing beats swapping or being killed for memory."""

    def __init__(self, count: int, wait_s: float = 10.0) -> None:
        self.count, self.wait_s = count, wait_s
        self._slots = threading.BoundedSemaphore(count)

    @contextmanager
    def hold(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise DecodersBusy(
                f"The server is busy decoding other uploads ({self.count} at once, MAX_CONCURRENT_DECODES); "
                "retry in a few seconds.",
                retry_after=2,
            )
        try:
            yield
        finally:
            self._slots.release()
