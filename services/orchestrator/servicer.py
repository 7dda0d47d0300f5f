"""ImageService servicer: the public API. Validation and the chain live in pipeline.py; this maps errors,
admits requests (backpressure) and streams progress.

Admission: at most `max_inflight` requests in progress, and `max_inflight_per_caller` per caller (the
authenticated identity: key name or certificate subject; with authentication off, the client's address — never
the client-chosen `user`), so one caller cannot starve the rest. A request beyond either is
refused at once with RESOURCE_EXHAUSTED and a retry hint (google.rpc.RetryInfo and `retry-after-ms` trailing
metadata) instead of queueing: accepted requests keep their latency and memory stays bounded.

Priority classes: batch requests may fill all but a quarter of the slots (interactive work finds room), and
while any interactive request is in flight, batch requests wait before their next stage call and the
denoising stages pause their batch rows between steps, each for at most UNCLIP_BATCH_MAX_HOLD_S (ageing;
services/orchestrator/priority.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from services.orchestrator.clients import Calls
from services.orchestrator.interpolate import Interpolation
from services.orchestrator.params import Params
from services.orchestrator.pipeline import Pipeline
from services.orchestrator.priority import PriorityGate
from services.orchestrator.textdiff import TextDiff
from unclip.access.interceptor import current_identity
from unclip.access.keys import Identity
from unclip.access.quotas import Quotas, check_compute, compute_units
from unclip.access.usage import Accounting
from unclip.provenance.verify import ALTERED, INTACT, Verifier, VerifyResult, verify_png
from unclip.runtime.errors import StatusError, grpc_errors, grpc_stream_errors, resource_exhausted
from unclip.runtime.slots import AGE_AT_KEY, DETERMINISTIC_KEY, PRIORITY_KEY
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
    def admit(self, caller: str, batch: bool = False) -> Iterator[int]:
        """Yields the number of requests in progress ahead of this one; raises RESOURCE_EXHAUSTED if full.
        Batch-priority requests may fill all but a quarter of the slots: interactive work finds room."""
        with self._lock:
            hint = max(0.1, self._seconds / max(1, self.max_inflight))
            limit = self.max_inflight - (max(1, self.max_inflight // 4) if batch else 0)
            if self._inflight >= max(1, limit):
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
                    limit="max_inflight_per_caller",
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
    """The authenticated identity; with authentication off, the client's address without its port (the
    request's `user` is the client's to choose, so it cannot key a limit)."""
    identity = current_identity()
    if identity.kind != "anonymous":
        return identity.principal
    peer = context.peer() or ""
    return "peer:" + peer.rsplit(":", 1)[0]


def priority_of(request, identity: Identity) -> str:
    """The request's priority class: the key's, or lower when the request asks (never higher)."""
    asked = getattr(request, "priority", orchestrator_pb2.PRIORITY_UNSPECIFIED)  # not every request has one
    if asked == orchestrator_pb2.PRIORITY_INTERACTIVE and identity.priority == "batch":
        raise StatusError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"priority: {identity.principal} is in the batch class; a request may only lower its priority",
        )
    return (
        "batch" if asked == orchestrator_pb2.PRIORITY_BATCH or identity.priority == "batch" else "interactive"
    )


class ImageServicer(orchestrator_pb2_grpc.ImageServiceServicer):
    def __init__(
        self,
        stage_timeout_seconds: float,
        max_inflight: int = 16,
        max_per_caller: int = 4,
        quotas: Quotas | None = None,
        max_request_compute: float = 0.0,
        accounting: Accounting | None = None,
    ) -> None:
        self.pipeline: Pipeline | None = None  # set by __main__ once every stage is SERVING
        self.stage_timeout_seconds = stage_timeout_seconds
        self.admission = Admission(max_inflight, max_per_caller)
        self.verifier: Verifier | None = None  # set by __main__ (needs no stage)
        self.quotas = quotas  # per key / tenant (None: authentication off)
        self.max_request_compute = max_request_compute  # compute units one request may ask for (0: any)
        self.accounting = accounting or Accounting(None, 0.0)  # usage: responses, counters, ledger
        # Interactive requests in flight hold batch work back, here and in the stages (priority.py).
        self.gate = PriorityGate(lambda: self.pipeline.stages.holds if self.pipeline is not None else [])

    def _settle(self, response, calls: Calls, method: str):
        """The response with its usage filled in and recorded (counters, ledger)."""
        identity = current_identity()
        self.accounting.settle(response, dict(calls.stage_seconds), identity, method, response.request_id)
        return response

    @contextlib.contextmanager
    def _admit(
        self,
        request,
        context: grpc.ServicerContext,
        prior: bool = True,
        batch: bool = False,
        images: int = 0,
    ) -> Iterator[int]:
        """The compute ceiling (INVALID_ARGUMENT), the service's capacity and per-caller cap, then the
        caller's quotas (RESOURCE_EXHAUSTED); yields the number of requests ahead. `images`: what the request
        draws when it has no `n` (an interpolation's frames). An admitted interactive request holds batch
        work back stack-wide until it ends (PriorityGate)."""
        assert self.pipeline is not None
        n = images or request.n or 1
        sizes = [stage.output_size for stage in self.pipeline.cascade]
        params = Params.from_proto(request.params, upsamplers=len(sizes) - 1, prior=prior)
        units = compute_units(
            n,
            params.prior_num_inference_steps if prior else 0,
            params.prior_num_candidates,
            params.decoder_num_inference_steps,
            params.super_res_num_inference_steps,
            sizes,
        )
        check_compute(units, self.max_request_compute)
        with self.admission.admit(caller_of(request, context), batch=batch) as ahead:
            if self.quotas is None:
                with self.gate.interactive(not batch):
                    yield ahead
                return
            with self.quotas.admit(current_identity(), n), self.gate.interactive(not batch):
                yield ahead

    def _run(self, context: grpc.ServicerContext, request=None) -> tuple[Pipeline, Calls]:
        if self.pipeline is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the orchestrator is waiting for its stages")
        calls = Calls(context, self.stage_timeout_seconds)
        identity = current_identity()
        calls.identity, calls.tenant = identity.principal, identity.tenant
        if request is not None and getattr(request, "deterministic", False):
            calls.metadata = ((DETERMINISTIC_KEY, "1"),)
        if request is not None and priority_of(request, identity) == "batch":
            calls.metadata += ((PRIORITY_KEY, "batch"),)  # the stages' batchers hold its rows back
            calls.batch = True
            calls.gate = self.gate  # and it waits before each stage call while interactive work runs,
            calls.age_at = time.monotonic() + self.gate.max_hold_s  # at most this long in all (ageing)
            calls.metadata += ((AGE_AT_KEY, f"{time.time() + self.gate.max_hold_s:.3f}"),)
        return self.pipeline, calls

    @grpc_errors
    def Generate(self, request: orchestrator_pb2.GenerateRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context, request)
        with self._admit(request, context, batch=calls.batch):
            return self._settle(pipeline.generate(request, calls), calls, "Generate")

    @grpc_errors
    def CreateVariation(self, request: orchestrator_pb2.VariationRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context, request)
        with self._admit(request, context, prior=False, batch=calls.batch):
            return self._settle(pipeline.create_variation(request, calls), calls, "CreateVariation")

    @grpc_errors
    def Edit(self, request: orchestrator_pb2.EditRequest, context: grpc.ServicerContext):
        pipeline, calls = self._run(context, request)
        with self._admit(request, context, batch=calls.batch):
            return self._settle(pipeline.edit(request, calls), calls, "Edit")

    @grpc_errors
    def GetCapabilities(self, request: orchestrator_pb2.CapabilitiesRequest, context: grpc.ServicerContext):
        pipeline, _ = self._run(context)
        return pipeline.capabilities()

    @grpc_stream_errors
    def GenerateStream(self, request: orchestrator_pb2.GenerateRequest, context: grpc.ServicerContext):
        """Generate, reporting progress: accepted, stage started/finished, denoising steps, the images."""
        pipeline, calls = self._run(context, request)
        validated = pipeline.validate_generate(request)  # an invalid request is refused before "accepted"

        def run() -> orchestrator_pb2.ImagesResponse:
            return self._settle(pipeline.generate(request, calls, validated), calls, "Generate")

        yield from self._stream(self._admit(request, context, batch=calls.batch), calls, run, "result")

    @grpc_stream_errors
    def EditStream(self, request: orchestrator_pb2.EditRequest, context: grpc.ServicerContext):
        """Edit, reporting progress as GenerateStream does, with a preview after each stage but the last.
        Bad input is refused before admission; the prompt and image checks run once admitted, before
        "accepted", so a refusal ends the call with no event."""
        pipeline, calls = self._run(context, request)
        validated = pipeline.validate_edit(request)

        def run() -> orchestrator_pb2.ImagesResponse:
            return self._settle(pipeline.edit(request, calls, validated), calls, "Edit")

        def check() -> None:
            pipeline.check_edit(validated, calls)

        yield from self._stream(self._admit(request, context, batch=calls.batch), calls, run, "result", check)

    @grpc_errors
    def Verify(self, request: orchestrator_pb2.VerifyRequest, context: grpc.ServicerContext):
        """Provenance check of one image file (unclip/provenance/verify.py); no stage is called."""
        if self.verifier is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, "the orchestrator is starting")
        with self.admission.admit(caller_of(request, context)):
            return verify_response(verify_png(request.image, self.verifier))

    def _frames(self, context: grpc.ServicerContext, request, job_class: type, method: str):
        """Interpolate / TextDiff: the request validated (before admission and any work) by `job_class`;
        returns its admission and the work, which settles the frames' usage."""
        pipeline, calls = self._run(context, request)
        job = job_class(pipeline, request, calls)
        prior = getattr(job, "has_prompt", False)  # a prompt end runs the prior; a text diff never does
        admission = self._admit(request, context, prior=prior, batch=calls.batch, images=job.frames)

        def run() -> orchestrator_pb2.InterpolateResponse:
            response = job.run()
            self._settle(response.frames, calls, method)
            return response

        return admission, calls, run

    @grpc_errors
    def Interpolate(self, request: orchestrator_pb2.InterpolateRequest, context: grpc.ServicerContext):
        admission, _, run = self._frames(context, request, Interpolation, "Interpolate")
        with admission:
            return run()

    @grpc_errors
    def TextDiff(self, request: orchestrator_pb2.TextDiffRequest, context: grpc.ServicerContext):
        admission, _, run = self._frames(context, request, TextDiff, "TextDiff")
        with admission:
            return run()

    @grpc_stream_errors
    def InterpolateStream(self, request: orchestrator_pb2.InterpolateRequest, context: grpc.ServicerContext):
        """Interpolate, reporting progress as GenerateStream does; the last event carries the frames."""
        admission, calls, run = self._frames(context, request, Interpolation, "Interpolate")
        yield from self._stream(admission, calls, run, "interpolation")

    def _stream(self, admission, calls: Calls, run, field: str, check=None):
        """A request's progress as GenerateEvents: accepted (with the requests ahead, once `admission`
        admits it and `check()`, if given, passed on this thread), the stages' events, then `field` set to
        what `run()` returned (its error is raised on the handler's thread)."""
        events: queue.Queue = queue.Queue()  # bounded by the steps of one request
        calls.on_event = events.put
        with admission as ahead:
            if check is not None:
                check()  # its stage events wait in the queue and follow "accepted"
            yield orchestrator_pb2.GenerateEvent(accepted=orchestrator_pb2.Accepted(queue_position=ahead))

            def work() -> None:
                try:
                    events.put(orchestrator_pb2.GenerateEvent(**{field: run()}))
                except BaseException as error:  # raised again below, on the handler's thread
                    events.put(error)

            # The request's context (its authenticated identity, its trace) goes with the work.
            worker = contextvars.copy_context().run
            threading.Thread(target=worker, args=(work,), name=f"{field}-stream", daemon=True).start()
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.HasField(field):
                    return


VERDICTS = {
    INTACT: orchestrator_pb2.VERIFY_VERDICT_INTACT,
    ALTERED: orchestrator_pb2.VERIFY_VERDICT_ALTERED,
}


def verify_response(result: VerifyResult) -> orchestrator_pb2.VerifyResponse:
    response = orchestrator_pb2.VerifyResponse(
        verdict=VERDICTS.get(result.verdict, orchestrator_pb2.VERIFY_VERDICT_NOT_OURS),
        summary=result.summary,
        validation_state=result.validation_state,
        manifest_present=result.manifest.present,
        manifest_ours=result.manifest.ours,
        manifest_failures=list(result.manifest.failures),
        watermark_checked=result.watermark is not None,
        watermark_found=bool(result.watermark and result.watermark.found),
        watermark_score=result.watermark.score if result.watermark else 0.0,
        metadata=result.metadata,
    )
    if result.watermark_payload_matches is not None:
        response.watermark_payload_matches = result.watermark_payload_matches
    return response
