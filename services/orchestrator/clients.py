"""The orchestrator's view of the stages: one stub per stage, and calls that carry the caller's deadline.

Every stage call gets the time the client has left (or `stage_timeout_seconds` when the client set no
deadline), and is cancelled when the client cancels, so no stage keeps computing for a request nobody waits
for.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import propagate

from services.orchestrator.replicas import Replicas, ReplicatedMethod, parse_targets, retryable
from unclip.runtime.errors import StatusError, resource_exhausted, retry_after
from unclip.runtime.server import stage_channel, stage_health_status
from unclip.runtime.telemetry import instrument_channel
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2_grpc,
    hold_pb2_grpc,
    orchestrator_pb2,
    prior_pb2_grpc,
    safety_pb2_grpc,
)

log = logging.getLogger(__name__)

# The denoising stages' methods and their streaming twins (progress events, then the same output).
STREAMING = {"Sample": "SampleStream", "Decode": "DecodeStream", "Upsample": "UpsampleStream"}

# Methods that take milliseconds and have no steps to stop between: called blocking (Calls._call_blocking).
SHORT = {"EncodeText", "EncodeImage", "CheckPrompt", "CheckImages"}

# The upsampler stages' names in cascade order (their metrics label before GetStageInfo has answered).
UPSAMPLER_STAGES = ["super_res", "super_res_2", "super_res_3", "super_res_4"]


@dataclass
class StageInfo:
    stage: str  # "decoder", "super_res", "super_res_2"
    input_size: int  # pixels (0 for the decoder)
    output_size: int  # pixels
    default_num_inference_steps: int


@dataclass
class Stages:
    """Stubs for every stage the orchestrator chains, and their addresses (for messages)."""

    encoder: Replicas  # each: stub-like, `stages.encoder.EncodeText` works on any replica
    prior: Replicas
    decoder: Replicas
    upsamplers: list[Replicas]  # cascade order
    safety: Replicas
    addresses: dict[str, str]  # stage name (or "decoder[1]" for a second replica) -> target
    # (target, BatchHold stub) of every denoising stage replica (services.orchestrator.priority)
    holds: list[tuple[str, Any]] = field(default_factory=list)

    @classmethod
    def connect(
        cls,
        *,
        encoder: str,
        prior: str,
        decoder: str,
        upsamplers: list[str],
        safety: str,
        max_message_bytes: int,
        metrics: Any = None,
    ) -> Stages:
        """Channels to every replica of every stage (each argument: one target, or replicas separated by
        `|` or `,`; `upsamplers`: one such entry per cascade stage); with `metrics` (ServiceMetrics) every
        call is traced and timed."""

        def replicas(value: str, stage: str, stub_class: type) -> Replicas:
            def channel(target: str) -> grpc.Channel:
                plain = stage_channel(target, max_message_bytes=max_message_bytes)
                if metrics is None:
                    return plain
                return instrument_channel(plain, metrics.client_interceptor(stage))

            def plain(target: str) -> grpc.Channel:
                return stage_channel(target, max_message_bytes=max_message_bytes)

            return Replicas(stage, parse_targets(value), stub_class, channel, plain)

        addresses: dict[str, str] = {}
        for name, value in [("encoder", encoder), ("prior", prior), ("decoder", decoder), ("safety", safety)]:
            for i, target in enumerate(parse_targets(value)):
                addresses[name if i == 0 else f"{name}[{i}]"] = target
        for i, value in enumerate(upsamplers):
            for j, target in enumerate(parse_targets(value)):
                addresses[f"upsampler[{i}]" if j == 0 else f"upsampler[{i}][{j}]"] = target
        holds = [
            (target, hold_pb2_grpc.BatchHoldStub(stage_channel(target, max_message_bytes=max_message_bytes)))
            for value in [prior, decoder, *upsamplers]
            for target in parse_targets(value)
        ]
        return cls(
            encoder=replicas(encoder, "encoder", encoder_pb2_grpc.EncoderStub),
            prior=replicas(prior, "prior", prior_pb2_grpc.PriorStub),
            decoder=replicas(decoder, "decoder", decoder_pb2_grpc.DecoderStub),
            upsamplers=[
                replicas(a, UPSAMPLER_STAGES[i], decoder_pb2_grpc.UpsamplerStub)
                for i, a in enumerate(upsamplers)
            ],
            safety=replicas(safety, "safety", safety_pb2_grpc.SafetyStub),
            addresses=addresses,
            holds=holds,
        )

    def wait_until_serving(self, timeout: float) -> None:
        """Blocks until every stage's health says SERVING; RuntimeError naming the ones that do not."""
        deadline = time.monotonic() + timeout
        waiting = dict(self.addresses)
        while waiting and time.monotonic() < deadline:
            waiting = {n: a for n, a in waiting.items() if stage_health_status(a, timeout=1.0) != "SERVING"}
            if waiting:
                time.sleep(0.2)
        if waiting:
            raise RuntimeError("stages not SERVING: " + ", ".join(f"{n} at {a}" for n, a in waiting.items()))

    def cascade(self, timeout: float = 10.0) -> list[StageInfo]:
        """The decoder's and each upsampler's StageInfo, in cascade order; checks that the sizes chain."""
        infos = []
        for stub in [self.decoder, *self.upsamplers]:
            reply = stub.GetStageInfo(decoder_pb2.StageInfoRequest(), timeout=timeout)
            infos.append(
                StageInfo(reply.stage, reply.input_size, reply.output_size, reply.default_num_inference_steps)
            )
        for previous, stage in zip(infos, infos[1:], strict=False):
            if stage.input_size != previous.output_size:
                raise RuntimeError(
                    f"cascade does not chain: {stage.stage} takes {stage.input_size} px, "
                    f"{previous.stage} makes {previous.output_size} px"
                )
        return infos


OWN_EVENTS = object()  # Calls.__call__'s on_event default: the request's own on_event


class Calls:
    """The stage calls of one client request: each gets the remaining deadline; all are cancelled with it."""

    def __init__(self, context: grpc.ServicerContext | None, default_timeout: float):
        self._context = context
        self._default_timeout = default_timeout
        self._lock = threading.Lock()
        self._in_flight: set[grpc.Future] = set()
        self._cancelled = False
        self.metadata: tuple[tuple[str, str], ...] = ()  # sent with every stage call (e.g. deterministic)
        self.stage_seconds: dict[str, float] = {}  # usage: each stage's reported compute for this request
        self.batch = False  # the batch priority class (admission and the stages' batchers serve it last)
        # With `batch`: waits before each stage call while interactive work is in flight (PriorityGate),
        # until its ageing deadline (time.monotonic(); the stages get it in metadata, AGE_AT_KEY).
        self.gate: Any = None
        self.age_at = 0.0
        self.identity = ""  # the authenticated caller ("key:NAME" / "cert:SUBJECT"), for the safety audit
        self.tenant = ""  # its tenant
        # GenerateStream: receives each GenerateEvent (stage started/finished, denoising steps) as it happens.
        self.on_event: Callable[[orchestrator_pb2.GenerateEvent], None] | None = None
        if context is not None:
            context.add_callback(self._cancel_all)  # runs when the client's call ends, however it ends

    def _cancel_all(self) -> None:
        with self._lock:
            self._cancelled = True
            for future in self._in_flight:
                future.cancel()

    def timeout(self) -> float:
        remaining = self._context.time_remaining() if self._context is not None else None
        if remaining is None or remaining > self._default_timeout:
            # No client deadline reads as a far-future one: passing it on would overflow gRPC's timer.
            return self._default_timeout
        if remaining <= 0:
            raise StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        return remaining

    def __call__(
        self,
        method: Callable[..., Any],
        request: Any,
        stage: str,
        on_event: Callable[[orchestrator_pb2.GenerateEvent], None] | None | object = OWN_EVENTS,
    ) -> Any:
        """Calls one stage method with the request's deadline; on UNAVAILABLE, RESOURCE_EXHAUSTED or a
        CANCELLED this side did not ask for (a draining replica) retries on the stage's other replicas
        (stage calls are idempotent: the request carries the generators).
        on_event: where this call's events go, if not to `self.on_event` (a call run concurrently holds
        them back until the caller releases them in order)."""
        if on_event is OWN_EVENTS:
            on_event = self.on_event
        if self.batch and self.gate is not None:  # interactive work first (services/orchestrator/priority.py)
            self.gate.wait_clear(self.age_at - time.monotonic(), lambda: self._cancelled)
        streaming = on_event is not None and isinstance(method, ReplicatedMethod) and method.name in STREAMING
        if streaming:
            method = ReplicatedMethod(method.stage, STREAMING[method.name])
        replicated = method.stage if isinstance(method, ReplicatedMethod) else None
        attempts = method.attempts() if isinstance(method, ReplicatedMethod) else [("", method)]
        hints: list[float] = []
        started = time.monotonic()
        if on_event is not None and not streaming:
            on_event(orchestrator_pb2.GenerateEvent(stage_started=orchestrator_pb2.StageEvent(stage=stage)))
        for attempt, (target, multicallable) in enumerate(attempts):
            try:
                with replicated.outstanding(target) if replicated is not None else contextlib.nullcontext():
                    if streaming:
                        output = self._stream_once(multicallable, request, stage, on_event)
                    elif getattr(method, "name", "") in SHORT:
                        output = self._call_blocking(multicallable, request)
                    else:
                        output = self._call_once(multicallable, request)
                if on_event is not None:
                    finished = orchestrator_pb2.StageEvent(stage=stage, seconds=time.monotonic() - started)
                    on_event(orchestrator_pb2.GenerateEvent(stage_finished=finished))
                self._account(stage, output)
                return output
            except grpc.RpcError as error:
                code = error.code()
                last = attempt + 1 == len(attempts)
                if retryable(code, self._cancelled) and not self._cancelled:
                    if replicated is not None:
                        replicated.failed(target)
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        hints.append(retry_after(error) or 1.0)
                    if not last:
                        log.warning(
                            "%s stage: %s from %s, retrying on another replica", stage, code.name, target
                        )
                        continue
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise resource_exhausted(
                            f"the {stage} stage is at capacity; retry later", min(hints)
                        ) from error
                self._raise(error, stage)
        raise AssertionError("unreachable")

    def _account(self, stage: str, output: Any) -> None:
        """Adds a stage's reported compute seconds (its `compute_seconds` field) to this request's usage."""
        seconds = getattr(output, "compute_seconds", 0.0)
        if seconds:
            with self._lock:
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds

    def _call_blocking(self, method: Callable[..., Any], request: Any) -> Any:
        """A short call (no denoising steps to stop between) on this thread: gRPC polls its completion on the
        caller's thread, one thread hand-off fewer than a future's. A cancel arriving meanwhile stops the
        request at its next call."""
        if self._cancelled:
            raise StatusError(grpc.StatusCode.CANCELLED, "the caller cancelled")
        return method(request, timeout=self.timeout(), metadata=self.metadata or None)

    def _call_once(self, method: Callable[..., Any], request: Any) -> Any:
        with self._lock:
            if self._cancelled:
                raise StatusError(grpc.StatusCode.CANCELLED, "the caller cancelled")
            future = method.future(request, timeout=self.timeout(), metadata=self.metadata or None)
            self._in_flight.add(future)
        try:
            return future.result()
        except grpc.FutureCancelledError as error:
            raise StatusError(grpc.StatusCode.CANCELLED, "the caller cancelled") from error
        finally:
            with self._lock:
                self._in_flight.discard(future)

    def _stream_once(
        self,
        method: Callable[..., Any],
        request: Any,
        stage: str,
        on_event: Callable[[orchestrator_pb2.GenerateEvent], None],
    ) -> Any:
        """A stage's streaming twin: progress events go to on_event; returns the final output."""
        with self._lock:
            if self._cancelled:
                raise StatusError(grpc.StatusCode.CANCELLED, "the caller cancelled")
            # The plain channel carries no tracing interceptor: send the trace context ourselves.
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata = tuple(self.metadata) + tuple(carrier.items())
            call = method(request, timeout=self.timeout(), metadata=metadata or None)
            self._in_flight.add(call)
        try:
            for event in call:
                if event.HasField("output"):
                    return event.output
                progress = event.progress
                if progress.step == 0:  # accepted by the stage: it starts (or queues) now
                    started = orchestrator_pb2.StageEvent(stage=stage, queue_position=progress.queue_position)
                    on_event(orchestrator_pb2.GenerateEvent(stage_started=started))
                else:
                    step = orchestrator_pb2.StepEvent(stage=stage, step=progress.step, total=progress.total)
                    on_event(orchestrator_pb2.GenerateEvent(step=step))
            raise StatusError(grpc.StatusCode.INTERNAL, f"{stage} stage: the stream ended without an output")
        finally:
            with self._lock:
                self._in_flight.discard(call)

    def _raise(self, error: grpc.RpcError, stage: str) -> None:
        code = error.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:  # the orchestrator validates first: name the stage
            raise ValueError(f"{error.details()} (rejected by the {stage} stage)") from error
        if code == grpc.StatusCode.CANCELLED and self._cancelled:
            raise StatusError(code, "the caller cancelled") from error
        if code == grpc.StatusCode.CANCELLED:  # no replica left that was not shutting down
            raise StatusError(
                grpc.StatusCode.UNAVAILABLE, f"{stage} stage: every replica was shutting down; retry"
            ) from error
        raise StatusError(code, f"{stage} stage: {code.name}: {error.details()}") from error
