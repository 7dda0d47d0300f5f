"""ImageService servicer: the public API. Validation and the chain live in pipeline.py; this maps errors,
admits requests (backpressure) and streams progress.

Admission: at most `max_inflight` requests in progress, and `max_inflight_per_caller` per caller (the
request's `user`, else the client's address), so one caller cannot starve the rest. A request beyond either is
refused at once with RESOURCE_EXHAUSTED and a retry hint (google.rpc.RetryInfo and `retry-after-ms` trailing
metadata) instead of queueing: accepted requests keep their latency and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from services.orchestrator.clients import Calls
from services.orchestrator.pipeline import Pipeline
from unclip.runtime.errors import StatusError, grpc_errors, grpc_stream_errors, resource_exhausted
from unclip.runtime.slots import DETERMINISTIC_KEY
from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc


class Admission:
    """Counts requests in progress, overall and per caller; refuses beyond the limits."""

    def __init__(self, max_inflight: int, max_per_caller: int):
        self.max_inflight = max_inflight
        self.max_per_caller = max_per_caller
        self._lock = threading.Lock()
        self._inflight = 0
        self._per_caller: dict[str, int] = {}
        self._seconds = 1.0  # running average of a request's duration, for retry hints

    @contextlib.contextmanager
    def admit(self, caller: str) -> Iterator[int]:
        """Yields the number of requests in progress ahead of this one; raises RESOURCE_EXHAUSTED if full."""
        with self._lock:
            hint = max(0.1, self._seconds / max(1, self.max_inflight))
            if self._inflight >= self.max_inflight:
                raise resource_exhausted(
                    f"the service is at capacity ({self._inflight} requests in progress); retry in "
                    f"{hint:.1f} s",
                    hint,
                )
            mine = self._per_caller.get(caller, 0)
            if mine >= self.max_per_caller:
                hint = max(0.1, self._seconds)
                raise resource_exhausted(
                    f"caller {caller!r} has {mine} requests in progress (limit {self.max_per_caller}); "
                    f"retry in {hint:.1f} s",
                    hint,
                )
            ahead = self._inflight
            self._inflight += 1
            self._per_caller[caller] = mine + 1
        started = time.monotonic()
        try:
            yield ahead
        finally:
            with self._lock:
                self._inflight -= 1
                left = self._per_caller[caller] - 1
                if left:
                    self._per_caller[caller] = left
                else:
                    del self._per_caller[caller]
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - started)


def caller_of(request, context: grpc.ServicerContext) -> str:
    """The request's `user`, else the client's address without its port."""
    if request.user:
        return f"user:{request.user}"
    peer = context.peer() or ""
    return "peer:" + peer.rsplit(":", 1)[0]


class ImageServicer(orchestrator_pb2_grpc.ImageServiceServicer):
    def __init__(self, stage_timeout_seconds: float, max_inflight: int = 16, max_per_caller: int = 4) -> None:
        self.pipeline: Pipeline | None = None  # set by __main__ once every stage is SERVING
        self.stage_timeout_seconds = stage_timeout_seconds
        self.admission = Admission(max_inflight, max_per_caller)

    def _run(self, context: grpc.ServicerContext, request=None) -> tuple[Pipeline, Calls]:
        if self.pipeline is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the orchestrator is waiting for its stages")
        calls = Calls(context, self.stage_timeout_seconds)
        if request is not None and request.deterministic:
            calls.metadata = ((DETERMINISTIC_KEY, "1"),)
        return self.pipeline, calls

    @grpc_errors
    def Generate(self, request: orchestrator_pb2.GenerateRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context, request)
        with self.admission.admit(caller_of(request, context)):
            return pipeline.generate(request, calls)

    @grpc_errors
    def CreateVariation(self, request: orchestrator_pb2.VariationRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context, request)
        with self.admission.admit(caller_of(request, context)):
            return pipeline.create_variation(request, calls)

    @grpc_errors
    def Edit(self, request: orchestrator_pb2.EditRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context, request)
        with self.admission.admit(caller_of(request, context)):
            return pipeline.edit(request, calls)

    @grpc_errors
    def GetCapabilities(self, request: orchestrator_pb2.CapabilitiesRequest, context: grpc.ServicerContext):
        pipeline, _ = self._run(context)
        return pipeline.capabilities()

    @grpc_stream_errors
    def GenerateStream(self, request: orchestrator_pb2.GenerateRequest, context: grpc.ServicerContext):
        """Generate, reporting progress: accepted, stage started/finished, denoising steps, the images."""
        pipeline, calls = self._run(context, request)
        validated = pipeline.validate_generate(request)  # an invalid request is refused before "accepted"
        events: queue.Queue = queue.Queue()  # bounded by the steps of one request
        calls.on_event = events.put
        with self.admission.admit(caller_of(request, context)) as ahead:
            accepted = orchestrator_pb2.Accepted(queue_position=ahead)
            yield orchestrator_pb2.GenerateEvent(accepted=accepted)

            def work() -> None:
                try:
                    events.put(
                        orchestrator_pb2.GenerateEvent(result=pipeline.generate(request, calls, validated))
                    )
                except BaseException as error:  # raised again below, on the handler's thread
                    events.put(error)

            threading.Thread(target=work, name="generate-stream", daemon=True).start()
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.HasField("result"):
                    return
