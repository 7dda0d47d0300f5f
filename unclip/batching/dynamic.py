"""Request-level dynamic batching (Triton's dynamic batcher) for stages without denoising steps: the encoder.

Requests wait in a bounded queue; the worker takes the oldest and every waiting request with the same key
(parameters that can share a forward pass), up to ``max_batch_size`` items, and runs them in one call of
``run_batch(payloads) -> outputs``. A deterministic request runs alone. Torch-free and grpc-free.

When the worker is idle (``config.idle_dispatch``, the default), a request starts at once: waiting
``max_queue_delay_s`` for company would only delay every lone request, and requests that arrive while a batch
runs queue up and form the next batch (continuous batching, as the step batcher does between steps). With
``idle_dispatch=False`` the oldest request waits up to ``max_queue_delay_s`` for company (Triton's dynamic
batcher). ``stats`` counts the batches and how many of them waited for company. Each item carries its
share of its batch's run time (``compute_seconds``, split by size), for usage accounting.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from unclip.batching.batcher import BatcherConfig, Cancelled, QueueFull

log = logging.getLogger(__name__)


class _Item:
    def __init__(self, payload: Any, key: Hashable, size: int, deterministic: bool):
        self.payload, self.key, self.size, self.deterministic = payload, key, size, deterministic
        self.started = threading.Event()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.compute_seconds = 0.0  # this item's share (by size) of its batch's run time

    def wait(self) -> Any:
        """Blocks until the batch holding this item has run; its output, or the batch's error raised."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


@dataclasses.dataclass
class DynamicStats:
    batches: int = 0  # batches run
    idle_dispatches: int = 0  # batches started at once because the worker was idle (no wait for company)
    delay_waits: int = 0  # batches whose oldest request waited (up to max_queue_delay_s) for company
    waited_s: float = 0.0  # seconds spent waiting for company, all batches together


class DynamicBatcher:
    """``run(payload, key=, size=, deterministic=)`` blocks until the batch holding it has run."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[Any]], list[Any]],
        config: BatcherConfig,
        on_busy: Callable[[float], None] | None = None,
    ):
        self.name = name
        self.run_batch = run_batch
        self.on_busy = on_busy  # called with each batch's run time (the busy-seconds metric)
        self.config = config
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._closed = False
        self.stats = DynamicStats()  # read under no lock: counters for tests and logs
        self._thread = threading.Thread(target=self._loop, name=f"dynamic-{name}", daemon=True)
        self._thread.start()

    def submit(self, payload: Any, *, key: Hashable, size: int = 1, deterministic: bool = False) -> _Item:
        item = _Item(payload, key, size, deterministic or self.config.deterministic)
        with self._cond:
            if self._closed or len(self._queue) >= self.config.max_queue_size:
                raise QueueFull(self.name, len(self._queue), 0.1)
            self._queue.append(item)
            self._cond.notify_all()
        return item

    def run(self, payload: Any, **kwargs: Any) -> Any:
        return self.submit(payload, **kwargs).wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _take(self) -> list[_Item] | None:
        with self._cond:
            idle = not self._queue  # nothing queued while the last batch ran: the worker waits idle
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                for item in self._queue:
                    item.error = Cancelled("the stage is shutting down")
                    item.done.set()
                return None
            first = self._queue.popleft()
            batch = [first]
            self.stats.batches += 1
            if first.deterministic:
                return batch
            self._gather(batch)
            if self.config.idle_dispatch:
                # Idle: start now with whoever is here. Busy: what queued during the last batch is the
                # company; later arrivals form the next batch.
                self.stats.idle_dispatches += idle
                return batch
            began = time.monotonic()
            until = began + self.config.max_queue_delay_s
            waited = False
            while sum(item.size for item in batch) < self.config.max_batch_size:
                left = until - time.monotonic()
                if left <= 0:
                    break
                waited = True
                self._cond.wait(left)
                self._gather(batch)
            if waited:
                self.stats.delay_waits += 1
                self.stats.waited_s += time.monotonic() - began
            return batch

    def _gather(self, batch: list[_Item]) -> None:
        """Moves queued items with the first one's key into the batch, in arrival order, while they fit
        (called with the lock held)."""
        first = batch[0]
        size = sum(item.size for item in batch)
        for item in list(self._queue):
            if item.key == first.key and not item.deterministic:
                if size + item.size > self.config.max_batch_size:
                    break
                self._queue.remove(item)
                batch.append(item)
                size += item.size

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            for item in batch:
                item.started.set()
            began = time.perf_counter()
            try:
                outputs = self.run_batch([item.payload for item in batch])
                for item, output in zip(batch, outputs, strict=True):
                    item.result = output
            except Exception as error:  # a failing batch fails its requests, not the stage
                log.exception("%s batch of %d failed", self.name, len(batch))
                for item in batch:
                    item.error = error
            elapsed = time.perf_counter() - began
            total = sum(item.size for item in batch) or 1
            for item in batch:
                item.compute_seconds = elapsed * item.size / total
            if self.on_busy is not None:
                self.on_busy(elapsed)
            for item in batch:
                item.done.set()
