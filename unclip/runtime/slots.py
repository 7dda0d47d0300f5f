"""The engine a model servicer wraps: UNAVAILABLE until loaded, then one request at a time on it.

Requests beyond the one computing wait on the lock; that wait is the queue the metrics report (and an
autoscaler reads). Dynamic batching (issue 6) replaces the lock with a batcher behind the same `call()`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from unclip.runtime.errors import StatusError


class EngineSlot:
    def __init__(self, name: str, metrics: Any = None):
        self.name = name  # the stage, for messages
        self.metrics = metrics  # unclip.runtime.metrics.ServiceMetrics, or None (no metrics)
        self.engine: Any = None  # set by __main__ once weights are loaded and warmed up
        self.lock = threading.Lock()

    def get(self) -> Any:
        if self.engine is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"{self.name} is loading its weights")
        return self.engine

    @contextlib.contextmanager
    def call(self, method: str, batch_size: int) -> Iterator[None]:
        """Holds the engine for one request of `batch_size` images (queue and compute time measured)."""
        if self.metrics is None:
            with self.lock:
                yield
        else:
            with self.metrics.engine_call(method, batch_size, self.lock):
                yield
