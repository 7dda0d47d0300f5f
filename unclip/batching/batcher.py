"""Step-level (iteration-level) batching for a denoising stage.

Requests wait in a bounded queue; one worker thread owns the running batch and, between two denoising steps,
lets waiting requests join (up to ``max_batch_size`` images), drops the ones that finished, were cancelled or
ran past their deadline, and steps everyone left in as few forward passes as their parameters allow. A new
request therefore waits at most one step of the running batch, not the whole of a running request (continuous
batching, as LLM servers do it). When the stage is idle, the first request may wait up to
``first_step_delay_s`` (else ``max_queue_delay_s``) for company before the first step (Triton's dynamic
batcher ``max_queue_delay``); the services start at once (UNCLIP_STEP_QUEUE_DELAY_MS=0): a request arriving
a moment later joins at the next step anyway, so the wait would only delay every lone request.

Priority classes: interactive requests are admitted first and, while interactive work waits or runs in
this stage or the ``hold`` callable says interactive work is in flight elsewhere in the stack
(``unclip.batching.hold``: the orchestrator tells every denoising stage), batch tickets are paused between
steps: they keep their state and their place, and step again as soon as the hold ends. Ageing: a batch
ticket is paused only until its ``age_at`` — the request's own ageing deadline when the caller sends one
(the orchestrator: UNCLIP_BATCH_MAX_HOLD_S after it admitted the request, so a batch request waits at most
that long in all, wherever it is), else ``max_hold_s`` after it arrived; after that it steps
beside the interactive work, one aged ticket per iteration (the oldest first) and in at most one iteration
out of every ``AGED_REST + 1`` iterations' time (a duty cycle: every stage of the stack does the same while
the hold is on, and on a small machine they all share the interactive request's cores): batch work slows
down under interactive load, never starves.

Deterministic requests (per request, or every request when the deployment says so) step alone: their forward
passes hold no other request's rows, so their output is the engine's bit for bit.

Torch-free and grpc-free: the stage (``unclip.batching.stages``) does the math, the servicer maps the errors
(``QueueFull`` -> RESOURCE_EXHAUSTED with a retry hint, ``Cancelled`` -> CANCELLED / DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the batcher itself stays torch-free
    from unclip.batching.stages import DenoisingStage, Task

from unclip.runtime.settings import env_default

log = logging.getLogger(__name__)


@dataclass
class BatcherConfig:
    max_batch_size: int = (
        8  # images per forward pass (before guidance doubles them); bigger requests run alone
    )
    max_queue_delay_s: float = 0.002  # how long an idle stage waits for more requests before its first step
    # Request-level batching (the encoder, unclip.batching.dynamic): True starts a batch as soon as the worker
    # is free (a lone request on an idle stage waits for nobody); False waits max_queue_delay_s for company.
    idle_dispatch: bool = True
    # When set, replaces max_queue_delay_s before the first step (the services set it from
    # UNCLIP_STEP_QUEUE_DELAY_MS, default 0: with step-level batching a later arrival joins at the next
    # step, so waiting only delays a lone request; max_queue_delay_s stays the request-level delay).
    first_step_delay_s: float | None = None
    max_queue_size: int = 16  # requests waiting to join; one more is refused with QueueFull
    deterministic: bool = False  # True: every request steps alone (bit-exact with the engine, no batching)
    # Ageing: the longest a batch ticket is paused for interactive work, in all (0: never paused).
    max_hold_s: float = field(default_factory=lambda: float(env_default("batch_max_hold_s")))


# Ageing's duty cycle: after an iteration that stepped an aged batch ticket during a hold, the next aged one
# waits this many times that iteration's duration.
AGED_REST = 4.0

# How often a worker whose every running ticket is paused looks again (the hold may end at any time; a
# cancelled or expired ticket leaves within this).
HOLD_POLL_S = 0.01


class QueueFull(Exception):
    """The stage's queue is full: the caller should retry after ``retry_after_s`` (possibly elsewhere)."""

    def __init__(self, stage: str, waiting: int, retry_after_s: float):
        super().__init__(
            f"{stage} is at capacity ({waiting} requests waiting); retry in {retry_after_s:.1f} s"
        )
        self.stage = stage
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """The request left the batch because its caller cancelled it or its deadline passed."""

    def __init__(self, message: str, *, deadline: bool = False, steps_done: int = 0):
        super().__init__(message)
        self.deadline = (
            deadline  # True: the deadline passed (DEADLINE_EXCEEDED), else cancelled by the caller
        )
        self.steps_done = steps_done  # the stage's step counter when the request left the batch


class Ticket:
    """One request inside a batcher: wait on ``result()``, stop it with ``cancel()``."""

    def __init__(self, task: Task, deterministic: bool, deadline: float | None, is_cancelled, on_step):
        self.task = task
        self.deterministic = deterministic
        self.deadline = deadline  # time.monotonic() value, or None
        self.is_cancelled = is_cancelled  # Callable[[], bool] | None: polled between steps
        self.on_step = on_step  # Callable[[int, int], None] | None: after every step; may raise to stop
        self.queue_position = 0  # requests ahead of it when it was accepted (0: joins at the next step)
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None  # when it joined the running batch
        self.finished_at: float | None = None
        self.cancelled_at_step: int | None = None  # the task's step counter when cancel() was called
        # Usage: its preparation (start), its share of the steps it joined (each step's time split by rows),
        # and its finish; the same intervals the stage's busy time adds up (on_busy).
        self.compute_seconds = 0.0
        self.batch = False  # priority class batch: admitted after interactive work, paused while it runs
        self.held_seconds = 0.0  # paused for interactive work so far (ended pauses)
        self.held_since: float | None = None  # when the current pause began
        self.age_at = float("inf")  # time.monotonic() after which it is not paused any more (ageing)
        self._cancel = threading.Event()
        self._started = threading.Event()  # joined the running batch (or finished without joining)
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self.cancelled_at_step = getattr(self.task, "steps_done", 0)
        self._cancel.set()

    def _stop_reason(self, now: float) -> Cancelled | None:
        # The message keeps the engines' step_callback wording ("... at step i/N"): logs and tests read it.
        steps, total = getattr(self.task, "steps_done", 0), getattr(self.task, "total", 0)
        if self._cancel.is_set() or (self.is_cancelled is not None and self.is_cancelled()):
            arrived = steps if self.cancelled_at_step is None else self.cancelled_at_step
            message = f"cancelled by the caller at step {steps}/{total} (cancel arrived at step {arrived})"
            return Cancelled(message, steps_done=steps)
        if self.deadline is not None and now >= self.deadline:
            return Cancelled(f"deadline exceeded at step {steps}/{total}", deadline=True, steps_done=steps)
        return None

    def _settle(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self.finished_at = time.monotonic()
        self._started.set()
        self._done.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Blocks until the request joined the running batch (or left the queue otherwise)."""
        return self._started.wait(timeout)

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The stage's output; raises what stopped it (Cancelled, or the stage's own error)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the batcher did not answer in time")
        if self._error is not None:
            raise self._error
        return self._result

    @property
    def queue_seconds(self) -> float:
        end = self.started_at if self.started_at is not None else (self.finished_at or time.monotonic())
        return end - self.enqueued_at


class StepBatcher:
    """Runs a stage's tasks step by step on one worker thread (see the module docstring).

    ``stage`` is a ``DenoisingStage`` (``unclip.batching.stages``: its docstring has the rules): ``key(task)``
    (tasks with equal keys can share a forward pass), ``step(tasks)`` (one step of each, in one forward pass)
    and ``finish(task)`` (the output once ``task.done``); tasks have ``rows``, ``steps_done`` and ``total``.
    """

    def __init__(
        self,
        stage: DenoisingStage,
        config: BatcherConfig | None = None,
        on_batch: Callable | None = None,
        *,
        hold: Callable[[], bool] | None = None,
        on_busy: Callable[[float], None] | None = None,
    ):
        self.stage = stage
        self.config = config or BatcherConfig()
        self.on_batch = on_batch  # Callable[[int], None] | None: images in each forward pass (metrics)
        self.hold = hold  # True while interactive work is in flight elsewhere in the stack (pause batch)
        self.on_busy = on_busy  # seconds of engine work (each start, step and finish), for the busy counter
        self._cond = threading.Condition()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._running: list[Ticket] = []
        self._closed = False
        self._step_seconds = 0.05  # running average of one iteration, for retry hints
        self._aged_after = 0.0  # time.monotonic() before which no aged batch ticket steps (duty cycle)
        self._aged_stepped = False  # the current iteration steps an aged batch ticket
        delay = self.config.first_step_delay_s
        self._first_step_delay = self.config.max_queue_delay_s if delay is None else delay
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{stage.name}", daemon=True)
        self._thread.start()

    # ---- the caller's side ---------------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raises QueueFull now if a request would be refused (call before costly preparation)."""
        with self._cond:
            self._raise_if_full()

    def _raise_if_full(self) -> None:
        waiting = len(self._queue)
        if self._closed:
            raise QueueFull(self.stage.name, waiting, 1.0)
        if waiting >= self.config.max_queue_size:
            # By then about one batch leaves per request length; hint the time the queue needs to move.
            retry = max(0.1, min(30.0, self._step_seconds * max(1, waiting // self.config.max_batch_size)))
            raise QueueFull(self.stage.name, waiting, retry)

    def submit(
        self,
        task: Task,
        *,
        deterministic: bool = False,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        batch: bool = False,
        start_seconds: float = 0.0,
        age_at: float | None = None,
    ) -> Ticket:
        """Queues a task; raises QueueFull when the queue is full. deadline: a time.monotonic() value.
        batch: the batch priority class (see _admit and _groups). start_seconds: what preparing the task
        (the stage's start(), in the caller's thread) took; counted in its compute and in the busy time.
        age_at: a batch request's ageing deadline (time.monotonic()); None: max_hold_s from now."""
        ticket = Ticket(task, deterministic or self.config.deterministic, deadline, is_cancelled, on_step)
        ticket.batch = batch
        ticket.age_at = ticket.enqueued_at + self.config.max_hold_s if age_at is None else age_at
        if start_seconds > 0:
            ticket.compute_seconds += start_seconds
            if self.on_busy is not None:
                self.on_busy(start_seconds)
        with self._cond:
            self._raise_if_full()
            ticket.queue_position = len(self._queue)
            self._queue.append(ticket)
            self._cond.notify_all()
        return ticket

    def run(self, task: Task, **kwargs: Any) -> Any:
        """submit() and wait for the output (cancellation is polled by the worker through is_cancelled)."""
        return self.submit(task, **kwargs).result()

    def call(self, start: Callable[[], Task], **kwargs: Any) -> Any:
        """Refuses at once when full, else prepares the task (``start()``: checks, conditioning, initial
        noise) in the caller's thread, then runs it: the queue never holds work it would refuse."""
        self.check_capacity()
        return self.run(start(), **kwargs)

    def stats(self) -> tuple[int, int]:
        """(requests waiting, requests running)."""
        with self._cond:
            return len(self._queue), len(self._running)

    def close(self) -> None:
        """Stops the worker; queued and running requests fail with Cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    # ---- the worker ----------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Moves queued tickets into the running batch while they fit (called with the lock held):
        interactive ones first (FIFO within a class); an interactive one that does not fit pauses running
        batch tickets (back to the queue's front, their state kept) to make room."""
        rows = sum(t.task.rows for t in self._running)
        while self._queue:
            ticket = next((t for t in self._queue if not t.batch), self._queue[0])
            if self._running and rows + ticket.task.rows > self.config.max_batch_size and not ticket.batch:
                rows -= self._pause_batch(rows + ticket.task.rows - self.config.max_batch_size)
            if self._running and rows + ticket.task.rows > self.config.max_batch_size:
                break  # FIFO: a big request is not overtaken by small ones behind it
            self._queue.remove(ticket)
            ticket.started_at = time.monotonic()
            ticket._started.set()
            self._running.append(ticket)
            rows += ticket.task.rows

    def _pause_batch(self, rows_needed: int) -> int:
        """Moves running batch tickets, newest first, back to the queue's front until `rows_needed` rows are
        free; returns the rows freed."""
        freed = 0
        for ticket in reversed([t for t in self._running if t.batch]):
            if freed >= rows_needed:
                break
            self._running.remove(ticket)
            self._queue.appendleft(ticket)
            freed += ticket.task.rows
        return freed

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._running and not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            if not self._running and self._first_step_delay > 0:
                # idle: give concurrent arrivals the delay to share the first step
                until = time.monotonic() + self._first_step_delay
                while (
                    sum(t.task.rows for t in self._queue) < self.config.max_batch_size
                    and (left := until - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
            self._drop_stopped_queued()
            self._admit()
            return True

    def _drop_stopped_queued(self) -> None:
        now = time.monotonic()
        for ticket in list(self._queue):
            reason = ticket._stop_reason(now)
            if reason is not None:
                self._queue.remove(ticket)
                ticket._settle(error=reason)

    def _holding(self) -> bool:
        """Whether batch tickets pause now: interactive work runs or waits here, or elsewhere (``hold``)."""
        with self._cond:
            here = any(not t.batch for t in self._running) or any(not t.batch for t in self._queue)
        return here or (self.hold is not None and self.hold())

    def _paused(self, ticket: Ticket, holding: bool, now: float) -> bool:
        """Whether a running ticket sits this iteration out (batch, holding, and not yet aged: before its
        age_at); keeps its pause time."""
        if ticket.batch and holding and now < ticket.age_at:
            if ticket.held_since is None:
                ticket.held_since = now
            return True
        if ticket.held_since is not None:
            ticket.held_seconds += now - ticket.held_since
            ticket.held_since = None
        return False

    def _groups(self) -> list[list[Ticket]]:
        """Running tickets by shared forward pass: deterministic ones alone, the rest by the stage's key.
        Batch tickets pause while interactive work runs (see the module docstring: they slow down under
        interactive load, never starve)."""
        groups: dict[Any, list[Ticket]] = {}
        alone: list[list[Ticket]] = []
        holding = any(t.batch for t in self._running) and self._holding()
        now = time.monotonic()
        self._aged_stepped = False  # at most one aged ticket per iteration, and only after the rest
        for ticket in sorted(self._running, key=lambda t: t.enqueued_at):
            if self._paused(ticket, holding, now):
                continue
            if holding and ticket.batch:
                if self._aged_stepped or now < self._aged_after:
                    continue
                self._aged_stepped = True
            if ticket.deterministic:
                alone.append([ticket])
            else:
                groups.setdefault(self.stage.key(ticket.task), []).append(ticket)
        return list(groups.values()) + alone

    def _loop(self) -> None:
        while self._wait_for_work():
            began = time.monotonic()
            # Leave the batch before the step: cancelled and expired requests free their rows at once.
            for ticket in list(self._running):
                reason = ticket._stop_reason(began)
                if reason is not None:
                    self._remove(ticket, error=reason)
            groups = self._groups()
            if not groups:  # every running ticket is paused: wait for the hold to end (or a new arrival)
                with self._cond:
                    self._cond.wait(HOLD_POLL_S)
                continue
            for group in groups:
                self._step(group)
            with self._cond:
                elapsed = time.monotonic() - began
                self._step_seconds = 0.8 * self._step_seconds + 0.2 * elapsed
                if self._aged_stepped:
                    self._aged_after = time.monotonic() + AGED_REST * elapsed
        with self._cond:  # closed: nobody will step what is left
            for ticket in [*self._queue, *self._running]:
                ticket._settle(error=Cancelled("the stage is shutting down"))
            self._queue.clear()
            self._running.clear()

    def _step(self, group: list[Ticket]) -> None:
        tasks = [ticket.task for ticket in group]
        began = time.perf_counter()
        try:
            # The rows the forward pass held: edits that only re-noised this iteration stay out of it.
            rows = self.stage.step(tasks)
        except Exception as error:  # a failing forward pass fails its group, not the stage
            log.exception("%s step failed for %d requests", self.stage.name, len(group))
            for ticket in group:
                self._remove(ticket, error=error)
            return
        if rows is None:  # a stage that does not say: every task's rows went through
            rows = sum(task.rows for task in tasks)
        self._busy(group, time.perf_counter() - began)
        if self.on_batch is not None and rows:
            self.on_batch(rows)
        for ticket in group:
            task = ticket.task
            try:
                if ticket.on_step is not None:
                    ticket.on_step(task.steps_done, task.total)
                if task.done:
                    began = time.perf_counter()
                    try:
                        output = self.stage.finish(task)
                    finally:
                        self._busy([ticket], time.perf_counter() - began)
                    self._remove(ticket, result=output)
            except Exception as error:  # on_step raised to stop it, or finish failed
                self._remove(ticket, error=error)

    def _remove(self, ticket: Ticket, result: Any = None, error: BaseException | None = None) -> None:
        with self._cond:
            if ticket in self._running:
                self._running.remove(ticket)
        ticket._settle(result=result, error=error)

    def _busy(self, group: list[Ticket], seconds: float) -> None:
        """Engine work of `seconds` for `group`: split over its requests, added to the busy time."""
        _share(group, seconds)
        if self.on_busy is not None:
            self.on_busy(seconds)


def _share(group: list[Ticket], seconds: float) -> None:
    """Usage accounting: a step's time split over the requests in it, by their rows."""
    total = sum(getattr(ticket.task, "rows", 1) for ticket in group) or 1
    for ticket in group:
        ticket.compute_seconds += seconds * getattr(ticket.task, "rows", 1) / total
