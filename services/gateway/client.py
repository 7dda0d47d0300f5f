"""The gateway's side of the orchestrator: one grpc.aio channel, the caller's credentials passed through.

The gateway reads no key: a request's `Authorization` header travels as gRPC metadata `authorization`, and the
orchestrator authenticates it, so audit, quotas, priority and usage are the same at both doors. Failures come
back as `core.RpcFailure` (code, message, trailing metadata, whether it is a content-policy refusal).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.core import RpcFailure, Served
from services.safety.refusal import REASON as REFUSAL_REASON
from unclip.runtime.server import message_options
from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

READINESS_SERVICE = "unclip.v1.ImageService"  # the orchestrator's readiness (every stage SERVING)
MAX_CACHED_CALLERS = 1024  # credentials whose capabilities answer is reused


class OrchestratorError(Exception):
    def __init__(self, failure: RpcFailure):
        super().__init__(f"{failure.code}: {failure.message}")
        self.failure = failure


def failure_of(error: grpc.aio.AioRpcError) -> RpcFailure:
    trailing = list(error.trailing_metadata() or ())
    return RpcFailure(
        code=error.code().name,
        message=error.details() or "",
        metadata={key: value for key, value in trailing if isinstance(value, str)},
        refused=_is_refusal(trailing),
    )


def _is_refusal(trailing: list[tuple[str, str | bytes]]) -> bool:
    """Whether the rich status (grpc-status-details-bin) holds the content policy's ErrorInfo."""
    for key, value in trailing:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.reason == REFUSAL_REASON:
                    return True
    return False


@dataclass
class OrchestratorConfig:
    address: str  # host:port (or dns:///name:port) of the orchestrator
    timeout_seconds: float = 600.0  # deadline of one call
    model_name: str = ""  # the served model's name when the orchestrator reports none
    max_message_bytes: int = 256 * 1024 * 1024  # as the rest of the stack
    capabilities_ttl_seconds: float = 30.0  # how long the cascade's sizes are reused


class Orchestrator:
    """Calls of the orchestrator's ImageService on behalf of one HTTP request each."""

    def __init__(self, config: OrchestratorConfig):
        self.config = config
        options = [*message_options(config.max_message_bytes), ("grpc.lb_policy_name", "round_robin")]
        self.channel = grpc.aio.insecure_channel(config.address, options=options)
        self.stub = orchestrator_pb2_grpc.ImageServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        # Per caller's Authorization (the capabilities call is also its authentication): (time, Served).
        self._served: OrderedDict[str, tuple[float, Served]] = OrderedDict()
        # Whether the orchestrator stores URL images in a bucket (learned from the first url request).
        self.has_bucket: bool | None = None

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, authorization: str | None):
        metadata = (("authorization", authorization),) if authorization else ()
        try:
            return await method(request, metadata=metadata, timeout=self.config.timeout_seconds)
        except grpc.aio.AioRpcError as error:
            raise OrchestratorError(failure_of(error)) from None

    async def served(self, authorization: str | None) -> Served:
        """The served model's name and sizes (GetCapabilities with the caller's credentials, reused for a
        while per credential: a wrong key is refused before its request's fields are judged)."""
        now = time.monotonic()
        key = authorization or ""
        cached = self._served.get(key)
        if cached is None or now - cached[0] > self.config.capabilities_ttl_seconds:
            caps = await self._call(
                self.stub.GetCapabilities, orchestrator_pb2.CapabilitiesRequest(), authorization
            )
            name = caps.model_name or self.config.model_name or "unclip"
            cached = (now, Served(model_name=name, sizes=tuple(caps.sizes)))
            self._served[key] = cached
            while len(self._served) > MAX_CACHED_CALLERS:
                self._served.popitem(last=False)
        self._served.move_to_end(key)
        return cached[1]

    async def frames(
        self,
        method_name: str,
        request: orchestrator_pb2.InterpolateRequest | orchestrator_pb2.TextDiffRequest,
        authorization: str | None,
    ) -> orchestrator_pb2.InterpolateResponse:
        """Interpolate / TextDiff: the frames as PNG bytes (these requests have no output format)."""
        return await self._call(getattr(self.stub, method_name), request, authorization)

    async def images(self, method_name: str, request, authorization: str | None):
        """Generate / CreateVariation / Edit. A URL request to an orchestrator without a bucket is retried
        once as PNG (and remembered): the gateway then serves the PNGs from its own signed links."""
        method = getattr(self.stub, method_name)
        url = request.output_format == orchestrator_pb2.OUTPUT_FORMAT_URL
        if url and self.has_bucket is False:
            request.output_format = orchestrator_pb2.OUTPUT_FORMAT_PNG
        try:
            response = await self._call(method, request, authorization)
        except OrchestratorError as error:
            no_bucket = error.failure.code == "INVALID_ARGUMENT" and error.failure.message.startswith(
                "output_format"
            )
            if not (url and no_bucket):
                raise
            self.has_bucket = False
            request.output_format = orchestrator_pb2.OUTPUT_FORMAT_PNG
            response = await self._call(method, request, authorization)
        else:
            if url and request.output_format == orchestrator_pb2.OUTPUT_FORMAT_URL:
                self.has_bucket = True
        return response

    async def generate_stream(
        self, request: orchestrator_pb2.GenerateRequest, authorization: str | None
    ) -> tuple[list[orchestrator_pb2.GenerateEvent], AsyncIterator[orchestrator_pb2.GenerateEvent]]:
        """Starts GenerateStream and reads it until the request is past validation, authentication and the
        prompt check (the first event after them: the encoder's, held back by the orchestrator until the
        check passed), so those failures are raised here, before any HTTP answer. Returns the events read
        and an iterator over the rest."""
        return await self._open_stream(self.stub.GenerateStream, request, authorization)

    async def edit_stream(
        self, request: orchestrator_pb2.EditRequest, authorization: str | None
    ) -> tuple[list[orchestrator_pb2.GenerateEvent], AsyncIterator[orchestrator_pb2.GenerateEvent]]:
        """EditStream, opened as `generate_stream` opens GenerateStream (the prompt and image checks are
        behind the events read first)."""
        return await self._open_stream(self.stub.EditStream, request, authorization)

    async def verify(self, image: bytes, authorization: str | None) -> orchestrator_pb2.VerifyResponse:
        """Verify: is this file ours, and unaltered."""
        return await self._call(self.stub.Verify, orchestrator_pb2.VerifyRequest(image=image), authorization)

    async def _open_stream(
        self, method, request, authorization: str | None
    ) -> tuple[list[orchestrator_pb2.GenerateEvent], AsyncIterator[orchestrator_pb2.GenerateEvent]]:
        metadata = (("authorization", authorization),) if authorization else ()
        call = method(request, metadata=metadata, timeout=self.config.timeout_seconds)
        head: list[orchestrator_pb2.GenerateEvent] = []
        try:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    break
                head.append(event)
                if _past_prompt_check(event):
                    break
        except grpc.aio.AioRpcError as error:
            raise OrchestratorError(failure_of(error)) from None
        except BaseException:
            call.cancel()
            raise

        async def rest() -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
            try:
                while True:
                    event = await call.read()
                    if event is grpc.aio.EOF:
                        return
                    yield event
            except grpc.aio.AioRpcError as error:
                raise OrchestratorError(failure_of(error)) from None
            finally:
                call.cancel()  # the HTTP client left: stop the work (no-op once the call ended)

        return head, rest()

    async def ready(self) -> bool:
        """The orchestrator's readiness: SERVING while every stage has a SERVING replica."""
        try:
            reply = await asyncio.wait_for(
                self.health.Check(health_pb2.HealthCheckRequest(service=READINESS_SERVICE)), 2.0
            )
        except (grpc.aio.AioRpcError, TimeoutError):
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _past_prompt_check(event: orchestrator_pb2.GenerateEvent) -> bool:
    kind = event.WhichOneof("event")
    if kind in ("stage_started", "stage_finished"):
        stage = getattr(event, kind).stage
        return stage != "safety"
    return kind in ("step", "preview", "result")
