"""A worker's queue with two lanes: queries go ahead of bulk jobs.

A query (the broker marks a one-job request of up to 2 KB of text) that reaches a worker busy with
a bulk client's jobs was tokenized after them and merged into the next window with them, waiting
for whole windows of bulk work: measured on an H200 (bundled MiniLM, one worker, another client
sending 4,096-sentence requests), one-sentence calls had p50 5.2 ms but p90 106 ms and p99 173 ms;
on 2 CPU cores behind a 200,000-sentence flood, p50 1.4 s.

So each stage takes the oldest query first; a window holds one lane's jobs; and the compute thread
answers queries between the forward passes of a bulk window (service/worker.py). A bulk job is never
starved: once the oldest has waited `max_defer` seconds, it goes next whatever is in the query lane.

Since then the worker's I/O thread encodes queries itself, beside the bulk passes
(`Worker.runs_inline`); the query lane is used where every job goes through the stages (with fault
injection on, for drills).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

SMALL, BULK = "small", "bulk"
MAX_DEFER = 1.0  # seconds a bulk job may be passed over by small ones


class Empty(Exception):
    """`get` found nothing (in the lane asked for) before its timeout."""


class TwoLanes(Generic[T]):
    """A thread-safe FIFO per lane; `put(None)` (a stage's stop sentinel) goes behind everything."""

    def __init__(self, max_defer: float = MAX_DEFER) -> None:
        self.max_defer = max_defer
        self.lanes: dict[str, deque[tuple[float, T | None]]] = {SMALL: deque(), BULK: deque()}
        self.ready = threading.Condition()

    def put(self, item: T | None, lane: str = BULK) -> None:
        with self.ready:
            self.lanes[lane if item is not None else BULK].append((time.monotonic(), item))
            self.ready.notify()

    def get(self, timeout: float | None = None, lane: str | None = None,
            interrupt: str | None = None) -> tuple[str, T | None]:
        """(lane, item): the next item of `lane`, or of either lane when None (small first, unless the
        oldest bulk job has waited `max_defer`). Blocks up to `timeout` seconds (None: for ever;
        0: not at all), then raises `Empty`; at once too if lane `interrupt` has an item (a query
        waits: a stage gathering bulk jobs stops and lets it go first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.ready:
            while (chosen := self._choose(lane)) is None:
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or (interrupt is not None and self.lanes[interrupt]):
                    raise Empty
                self.ready.wait(left)
            return chosen, self.lanes[chosen].popleft()[1]

    def drain(self, lane: str) -> list[T | None]:
        """Every item of `lane`, oldest first, without waiting (for a stop sentinel, see `put`, ask BULK)."""
        with self.ready:
            items = [item for _, item in self.lanes[lane]]
            self.lanes[lane].clear()
            return items

    def waiting(self, lane: str) -> bool:
        """Whether `lane` has an item."""
        with self.ready:
            return bool(self.lanes[lane])

    def _choose(self, lane: str | None) -> str | None:
        small, bulk = self.lanes[SMALL], self.lanes[BULK]
        if lane is not None:
            return lane if self.lanes[lane] else None
        if bulk and bulk[0][1] is not None and time.monotonic() - bulk[0][0] >= self.max_defer:
            return BULK  # the oldest bulk job has been passed over long enough
        if small:
            return SMALL
        return BULK if bulk else None
