"""Bounded work: each kind of slow work (decoding images, running the model) has its own small pool of
threads and a bounded number of requests allowed to wait for it. A request beyond that bound is answered
503 with Retry-After at once, so a burst costs the server the bytes of the requests it refused, not
their decoded images. The event loop only parses and routes, so /healthz and /v1/info answer while
every worker is busy.

Within a stage, quick calls (depth at points of an already encoded image) go before slow ones
(encoding an upload), except that a slow call waits for at most `QUICK_STREAK` quick ones: clients
querying encoded images keep their latency during a flood of uploads, and uploads still progress.
Decoding threads run at a lower CPU priority (nice +10) so that decoding floods cannot starve the
model or the event loop on a small machine.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

QUICK_STREAK = 4  # quick calls served in a row while a slow one waits


class Busy(Exception):
    """A stage's queue is full: the request should be retried later (503 + Retry-After)."""

    def __init__(self, stage: "Stage") -> None:
        super().__init__(f"the service is busy: {stage.capacity} requests are already {stage.doing} "
                         f"(spd serve --max-queue); retry in a moment")
        self.stage = stage


def _lower_priority() -> None:
    """Thread initializer: this thread yields the CPU to the rest of the process (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority as the rest
        pass


class Stage:
    """`workers` threads run this stage's calls; at most `max_waiting` more calls wait; beyond, `Busy`.

    All bookkeeping (`active`, the free workers, the waiters) happens on the event loop, so it needs no lock.
    """

    def __init__(self, name: str, doing: str, workers: int, max_waiting: int, low_priority: bool = False) -> None:
        self.name, self.doing = name, doing
        self.capacity = workers + max_waiting
        self.active = 0  # admitted calls: running or waiting
        self.refused = 0
        self._free = workers
        self._waiting: dict[bool, deque] = {True: deque(), False: deque()}  # quick?, -> futures
        self._quick_streak = 0
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"spd-{name}",
                                            initializer=_lower_priority if low_priority else None)

    async def run(self, function: Callable[..., Any], *args: Any, quick: bool = False) -> Any:
        """`function(*args)` on this stage's threads; Busy at once when `capacity` calls are admitted."""
        if self.active >= self.capacity:
            self.refused += 1
            raise Busy(self)
        self.active += 1
        try:
            await self._turn(quick)
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
            finally:
                self._hand_on()
        finally:
            self.active -= 1

    async def _turn(self, quick: bool) -> None:
        """Returns when a worker is this call's."""
        if self._free > 0 and not (self._waiting[True] or self._waiting[False]):
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting[quick].append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._hand_on()  # it was granted as it was cancelled: pass the worker on
            else:
                self._waiting[quick].remove(turn)
            raise

    def _hand_on(self) -> None:
        """A worker is free: give it to the next waiter (quick first, a slow one after QUICK_STREAK quick)."""
        quick, slow = self._waiting[True], self._waiting[False]
        if quick and (not slow or self._quick_streak < QUICK_STREAK):
            self._quick_streak += 1
            quick.popleft().set_result(None)
        elif slow:
            self._quick_streak = 0
            slow.popleft().set_result(None)
        else:
            self._free += 1

    def submit_when_idle(self, function: Callable[[], Any]) -> bool:
        """Runs `function` on this stage's threads if nothing else is admitted (housekeeping); whether it did."""
        if self.active == 0:
            self._executor.submit(function)
            return True
        return False

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
