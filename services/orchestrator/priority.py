"""Stack-wide priority: while interactive requests are in flight, batch work waits — at the orchestrator
before each of its stage calls, and inside the denoising stages between steps.

On a small machine every stage shares the same cores, so holding batch rows back only in the stage an
interactive request is in does not help it while it is in another stage. The orchestrator is the one place
that knows when interactive requests are in flight:

- ``PriorityGate.interactive()`` wraps each admitted interactive request. While one or more are in flight,
  a batch request does not start its next stage call (``Calls`` asks ``wait_clear``), and every denoising
  stage is told to pause its batch rows between steps (``BatchHold.Hold``, a lease renewed every third of
  its length; ``unclip.batching.hold``). The hold outlasts the last interactive request by ``LINGER_S``:
  released between two back-to-back interactive requests, every stage would step a full batch of batch
  rows (and every waiting batch request start a stage call) just as the next interactive request arrives.
- Ageing: a batch request is held at most ``UNCLIP_BATCH_MAX_HOLD_S`` seconds in all, counted from its
  admission: its stage calls carry that deadline (``x-unclip-batch-age-at``, wall clock, as stages run in
  other processes or hosts) and neither the gate nor a stage's batcher holds it past it; then it steps
  beside the interactive work, one aged request per stage iteration (``StepBatcher``). Batch work
  therefore slows down under interactive load and never starves.

The hold is sent to every replica listed for the prior, the decoder and the upsamplers; behind one
``dns:///`` name only the replica gRPC picks for the call gets it. A stage that does not serve
``BatchHold`` (an older one) is logged once and left alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from unclip.runtime.settings import env_default
from unclip.v1 import hold_pb2

log = logging.getLogger(__name__)

LEASE_SECONDS = 3.0  # a stage stops pausing batch rows this long after the orchestrator last spoke
LINGER_S = 0.5  # the hold stays this long after the last interactive request ended
HOLD_CALL_TIMEOUT_S = 1.0


class PriorityGate:
    """Counts interactive requests in flight; holds batch work while there are any."""

    def __init__(self, stubs: Callable[[], list[Any]], max_hold_s: float | None = None):
        self._stubs = stubs  # the BatchHold stubs of every denoising stage replica (empty until connected)
        self.max_hold_s = float(env_default("batch_max_hold_s")) if max_hold_s is None else max_hold_s
        self.holder = f"orchestrator:{socket.gethostname()}:{os.getpid()}"
        self._cond = threading.Condition()
        self._interactive = 0
        self._sequence = itertools.count(1)
        self._refresher: threading.Thread | None = None
        self._held = False  # the stages were told to hold (and not yet to release)
        self._clear_at = 0.0  # time.monotonic() the linger after the last interactive request ends
        self._generation = 0  # counts idle -> busy transitions: a linger timer of an older one does nothing
        self._warned: set[str] = set()

    @property
    def interactive_in_flight(self) -> int:
        with self._cond:
            return self._interactive

    @contextlib.contextmanager
    def interactive(self, active: bool = True) -> Iterator[None]:
        """Wraps one admitted request; counts it when `active` (the interactive class)."""
        if not active or self.max_hold_s <= 0:
            yield
            return
        with self._cond:
            self._interactive += 1
            if self._interactive == 1:
                self._generation += 1
                if not self._held:
                    self._send(LEASE_SECONDS)
                    self._held = True
                if self._refresher is None:
                    self._refresher = threading.Thread(target=self._renew, name="batch-hold", daemon=True)
                    self._refresher.start()
        try:
            yield
        finally:
            with self._cond:
                self._interactive -= 1
                if self._interactive == 0:
                    self._clear_at = time.monotonic() + LINGER_S
                    timer = threading.Timer(LINGER_S, self._release, args=(self._generation,))
                    timer.daemon = True
                    timer.start()

    def _release(self, generation: int) -> None:
        with self._cond:
            if self._interactive == 0 and generation == self._generation and self._held:
                self._send(0.0)
                self._held = False
            self._cond.notify_all()

    def wait_clear(self, max_seconds: float, cancelled: Callable[[], bool] = lambda: False) -> float:
        """Blocks a batch request's next stage call while interactive work is in flight, at most
        `max_seconds` (or until `cancelled()`); returns the seconds waited."""
        if max_seconds <= 0:
            return 0.0
        began = time.monotonic()
        with self._cond:
            while (self._interactive or time.monotonic() < self._clear_at) and not cancelled():
                left = max_seconds - (time.monotonic() - began)
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))  # polls `cancelled` too
        return time.monotonic() - began

    def _renew(self) -> None:
        while True:
            time.sleep(LEASE_SECONDS / 3)
            with self._cond:
                if self._interactive:
                    self._send(LEASE_SECONDS)

    def _send(self, seconds: float) -> None:
        """Sets (or releases) the hold on every stage replica without waiting for the answers (called with
        the lock held: sequence numbers go out in order)."""
        request = hold_pb2.HoldRequest(holder=self.holder, sequence=next(self._sequence), seconds=seconds)
        for target, stub in self._stubs():
            try:
                future = stub.Hold.future(request, timeout=HOLD_CALL_TIMEOUT_S)
            except Exception:  # a closed channel while shutting down
                continue
            future.add_done_callback(lambda call, target=target: self._answered(target, call))

    def _answered(self, target: str, call: grpc.Future) -> None:
        try:
            error = call.exception()
        except grpc.FutureCancelledError:
            return
        if error is None or target in self._warned:
            return
        self._warned.add(target)
        code = error.code() if isinstance(error, grpc.Call) else None
        log.warning("batch hold not applied at %s (%s): its batch rows keep stepping", target, code)
