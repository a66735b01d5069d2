"""Bounded work: each kind of slow work (decoding images, running the model) has its own small pool of
threads and a bounded number of requests allowed to wait for it. A request beyond that bound is answered
503 with Retry-After at once, so a burst costs the server the bytes of the requests it refused, not
their decoded images. The event loop only parses and routes, so /healthz and /v1/info answer while
every worker is busy.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class Busy(Exception):
    """A stage's queue is full: the request should be retried later (503 + Retry-After)."""

    def __init__(self, stage: "Stage") -> None:
        super().__init__(f"the service is busy: {stage.capacity} requests are already {stage.doing} "
                         f"(spd serve --max-queue); retry in a moment")
        self.stage = stage


class Stage:
    """`workers` threads run this stage's calls; at most `max_waiting` more calls wait; beyond, `Busy`.

    `active` (running + waiting) is read and written on the event loop only, so it needs no lock.
    """

    def __init__(self, name: str, doing: str, workers: int, max_waiting: int) -> None:
        self.name, self.doing = name, doing
        self.capacity = workers + max_waiting
        self.active = 0
        self.refused = 0
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"spd-{name}")

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on this stage's threads; Busy at once when `capacity` calls are admitted."""
        if self.active >= self.capacity:
            self.refused += 1
            raise Busy(self)
        self.active += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        finally:
            self.active -= 1

    def submit_when_idle(self, function: Callable[[], Any]) -> None:
        """Runs `function` on this stage's threads if nothing else is admitted (housekeeping)."""
        if self.active == 0:
            self._executor.submit(function)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
