"""The engine a model servicer wraps: UNAVAILABLE until loaded, then either one request at a time (the
encoder: `call()`) or step-level batching (prior, decoder, upsamplers: `run()`, see unclip.batching).

Both bound the queue: a request beyond `max_queue_size` waiting ones is refused at once with
RESOURCE_EXHAUSTED and a retry hint, so memory stays bounded and accepted requests keep their latency. The
wait is what the metrics report as the queue (and what an autoscaler reads).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from unclip.batching.batcher import BatcherConfig, Cancelled, QueueFull, StepBatcher
from unclip.runtime.errors import RequestCancelled, StatusError, resource_exhausted
from unclip.runtime.settings import env_default
from unclip.runtime.threads import ThreadPolicy, single_threaded

# Metadata key of a per-request "deterministic" switch: "1" steps the request alone (bit-exact).
DETERMINISTIC_KEY = "x-unclip-deterministic"


def wants_deterministic(context: grpc.ServicerContext) -> bool:
    return any(k == DETERMINISTIC_KEY and v == "1" for k, v in context.invocation_metadata() or ())


# Metadata the orchestrator sends with a batch-priority request's stage calls (priority classes).
PRIORITY_KEY = "x-unclip-priority"


def is_batch(context: grpc.ServicerContext) -> bool:
    return any(k == PRIORITY_KEY and v == "batch" for k, v in context.invocation_metadata() or ())


# Metadata with a batch request's ageing deadline (seconds since the epoch): the stage's batcher pauses its
# rows for interactive work only until then (services/orchestrator/priority.py). Wall clock: it crosses
# processes.
AGE_AT_KEY = "x-unclip-batch-age-at"


def age_at(context: grpc.ServicerContext) -> float | None:
    """The request's ageing deadline as a time.monotonic() value, or None (not sent, or unreadable)."""
    for key, value in context.invocation_metadata() or ():
        if key == AGE_AT_KEY:
            try:
                wall = float(value)
            except ValueError:
                return None
            if wall != wall:  # NaN
                return None
            return time.monotonic() + max(0.0, min(wall - time.time(), 3600.0))
    return None


class InferenceModeStage:
    """A step-wise stage whose start, step and finish run under torch.inference_mode()
    (UNCLIP_INFERENCE_MODE).

    The engines run under no_grad; inference mode also skips autograd's version counters and view
    tracking: the same kernels, so bit-exact, and measured ~5 % less CPU per denoising step on the toy
    model (`python -m benchmarks.compute`; BENCHMARKS.md, "Caveats"). Inference mode is per thread, so every
    method enters it (start runs on the request's thread, step and finish on the batcher's). The tensors a
    task holds are inference tensors: only these methods and the servicer's read-only conversion touch them.
    """

    def __init__(self, stage: Any):
        self.stage = stage

    def start(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.stage.start(*args, **kwargs)

    def step(self, tasks: list[Any]) -> Any:
        import torch

        with torch.inference_mode():
            return self.stage.step(tasks)

    def finish(self, task: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.stage.finish(task)

    def __getattr__(self, name: str) -> Any:  # name, key, engine attributes: the stage's own
        return getattr(self.stage, name)


class ThreadedStage:
    """A step-wise stage whose start, step and finish first set the calling thread's torch thread count
    (``unclip.runtime.threads``): start runs on the request's thread, single-threaded (conditioning and
    initial noise: small work, and no OpenMP team there); step and finish on the batcher's, the process's
    one compute thread, at the policy's count (an automatic policy re-decides before every step)."""

    def __init__(self, stage: Any, threads: ThreadPolicy):
        self.stage = stage
        self.threads = threads

    def start(self, *args: Any, **kwargs: Any) -> Any:
        single_threaded()
        return self.stage.start(*args, **kwargs)

    def step(self, tasks: list[Any]) -> Any:
        self.threads.apply()
        return self.stage.step(tasks)

    def finish(self, task: Any) -> Any:
        self.threads.apply()
        return self.stage.finish(task)

    def __getattr__(self, name: str) -> Any:  # name, key, engine attributes: the stage's own
        return getattr(self.stage, name)


class EngineSlot:
    def __init__(self, name: str, metrics: Any = None, config: BatcherConfig | None = None):
        self.name = name  # the stage, for messages
        self.metrics = metrics  # unclip.runtime.metrics.ServiceMetrics, or None (no metrics)
        self.config = config or BatcherConfig()
        self.engine: Any = None  # set by attach() once weights are loaded and warmed up
        self.stage: Any = None  # the step-wise view of the engine (unclip.batching.stages), if batched
        self.batcher: StepBatcher | None = None
        self.lock = threading.Lock()
        self._waiting = 0  # call(): requests waiting for the lock
        self._count_lock = threading.Lock()
        self.threads: ThreadPolicy | None = None  # torch threads of the calling thread, set by attach()

    def attach(self, engine: Any, batched: bool = True, threads: ThreadPolicy | None = None) -> None:
        """Makes the loaded engine available; `batched` puts a step-level batcher in front of it.
        `threads`: the process's thread policy, applied on every thread before it runs the engine."""
        self.threads = threads
        if batched:
            from unclip.batching.stages import stage_for

            self.stage = stage_for(engine)
            if env_default("inference_mode"):
                self.stage = InferenceModeStage(self.stage)
            if threads is not None:
                self.stage = ThreadedStage(self.stage, threads)
            from unclip.batching.hold import STAGE_HOLD

            on_batch = on_busy = None
            if self.metrics is not None:
                on_batch, on_busy = self.metrics.forward_pass, self.metrics.busy
            # hold: the orchestrator's stack-wide pause of batch rows (BatchHold, unclip.runtime.hold).
            self.batcher = StepBatcher(
                self.stage, self.config, on_batch=on_batch, hold=STAGE_HOLD.held, on_busy=on_busy
            )
        self.engine = engine

    def get(self) -> Any:
        if self.engine is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"{self.name} is loading its weights")
        return self.engine

    @contextlib.contextmanager
    def call(self, method: str, batch_size: int) -> Iterator[None]:
        """Holds the engine for one request of `batch_size` images (queue and compute time measured). The
        body runs in the request's thread, single-threaded: only a process's batcher computes with a team
        of threads (``unclip.runtime.threads``)."""
        with self._count_lock:
            if self._waiting >= self.config.max_queue_size:
                raise resource_exhausted(
                    f"{self.name} is at capacity ({self._waiting} requests waiting)", retry_after_s=0.5
                )
            self._waiting += 1
        holding = False
        try:
            hold = (
                self.lock if self.metrics is None else self.metrics.engine_call(method, batch_size, self.lock)
            )
            with hold:
                with self._count_lock:
                    self._waiting -= 1
                holding = True
                single_threaded()
                yield
        finally:
            if not holding:
                with self._count_lock:
                    self._waiting -= 1

    def run(
        self,
        method: str,
        batch_size: int,
        start: Callable[[], Any],
        context: grpc.ServicerContext,
        on_step: Callable[[int, int], None] | None = None,
        on_accepted: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Runs one request through the step-level batcher: refused at once when the queue is full,
        prepared (`start()`), then stepped with the others until done, cancelled or past its deadline.
        on_accepted(queue_position, total_steps) once queued; on_step(step, total) after each step."""
        batcher = self.batcher
        if batcher is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, f"{self.name} is loading its weights")
        try:
            batcher.check_capacity()
            began = time.perf_counter()
            task = start()
            start_seconds = time.perf_counter() - began  # usage and busy time count the preparation too
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e6 else None
            ticket = batcher.submit(
                task,
                deterministic=wants_deterministic(context),
                deadline=deadline,
                is_cancelled=lambda: not context.is_active(),
                on_step=on_step,
                batch=is_batch(context),
                start_seconds=start_seconds,
                age_at=age_at(context),
            )
            context.add_callback(ticket.cancel)  # the call ended (client gone): leave the batch now
            if on_accepted is not None:
                on_accepted(ticket.queue_position, task.total)
            try:
                if self.metrics is None:
                    return ticket.result()
                with self.metrics.queued(method):
                    ticket.wait_started()
                with self.metrics.compute(method, batch_size):
                    return ticket.result()
            finally:
                _usage.compute_seconds = ticket.compute_seconds
        except QueueFull as error:
            raise resource_exhausted(str(error), error.retry_after_s) from error
        except Cancelled as error:
            code = grpc.StatusCode.DEADLINE_EXCEEDED if error.deadline else grpc.StatusCode.CANCELLED
            raise RequestCancelled(str(error), code) from error


# The compute seconds of the last request `run()` ran on this thread (the servicer's handler thread), for the
# response's usage field (the step batcher splits every step's time over the requests in it).
_usage = threading.local()


def last_compute_seconds() -> float:
    """The compute seconds of the last request this thread ran through `Slot.run()` (0 when none)."""
    return getattr(_usage, "compute_seconds", 0.0)
