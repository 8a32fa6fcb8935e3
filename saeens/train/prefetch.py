"""Batches fetched ahead of the step on a background thread, so host reads overlap device compute.

A step on an accelerator takes a few milliseconds; gathering, checking and transferring its batch
synchronously would leave the device idle most of the time. `Prefetch` runs `fetch(step)` for the
steps of a range in order on one thread and hands the results over through a bounded queue (at
most `depth` batches wait, so memory stays bounded). What a fetch raised (NaN rows, a missing
shard) is re-raised by `get` at the step it belongs to, never earlier. The thread is a daemon and
stops at `close`, so an interrupted or failed run never waits on it at exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_POLL_S = 0.05  # how often a blocked producer looks at the stop flag
_JOIN_S = 10.0  # how long close() waits for a fetch in flight


class Prefetch:
    """`fetch(step)` for each step of `steps`, `depth` ahead; use as a context manager."""

    def __init__(self, fetch: Callable[[int], Any], steps: range, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(fetch, steps), name="saeens-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, fetch: Callable[[int], Any], steps: range) -> None:
        for step in steps:
            try:
                item = (step, fetch(step), None)
            except BaseException as e:  # handed to the consumer, raised at its step
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int) -> Any:
        """The batch of `step` (steps must be asked for in order), or what its fetch raised."""
        got, value, error = self._queue.get()
        if got != step:
            raise RuntimeError(f"prefetch out of order: asked for step {step}, next fetched is {got}")
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        """Stop the thread; a fetch in flight is waited for a bounded time (the thread is a daemon)."""
        self._stop.set()
        self._thread.join(timeout=_JOIN_S)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
