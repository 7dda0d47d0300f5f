"""The orchestrator's view of the stages: one stub per stage, and calls that carry the caller's deadline.

Every stage call gets the time the client has left (or `stage_timeout_seconds` when the client set no
deadline), and is cancelled when the client cancels, so no stage keeps computing for a request nobody waits
for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from unclip.runtime.errors import StatusError
from unclip.runtime.server import create_channel, health_status
from unclip.runtime.telemetry import instrument_channel
from unclip.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2_grpc, prior_pb2_grpc, safety_pb2_grpc

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

    encoder: encoder_pb2_grpc.EncoderStub
    prior: prior_pb2_grpc.PriorStub
    decoder: decoder_pb2_grpc.DecoderStub
    upsamplers: list[decoder_pb2_grpc.UpsamplerStub]  # cascade order
    safety: safety_pb2_grpc.SafetyStub
    addresses: dict[str, str]  # stage name -> target

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
        """Channels to every stage; with `metrics` (ServiceMetrics) every call is traced and timed."""

        def channel(target: str, stage: str) -> grpc.Channel:
            plain = create_channel(target, max_message_bytes=max_message_bytes)
            if metrics is None:
                return plain
            return instrument_channel(plain, metrics.client_interceptor(stage))

        addresses = {"encoder": encoder, "prior": prior, "decoder": decoder, "safety": safety}
        addresses.update({f"upsampler[{i}]": a for i, a in enumerate(upsamplers)})
        return cls(
            encoder=encoder_pb2_grpc.EncoderStub(channel(encoder, "encoder")),
            prior=prior_pb2_grpc.PriorStub(channel(prior, "prior")),
            decoder=decoder_pb2_grpc.DecoderStub(channel(decoder, "decoder")),
            upsamplers=[
                decoder_pb2_grpc.UpsamplerStub(channel(a, UPSAMPLER_STAGES[i]))
                for i, a in enumerate(upsamplers)
            ],
            safety=safety_pb2_grpc.SafetyStub(channel(safety, "safety")),
            addresses=addresses,
        )

    def wait_until_serving(self, timeout: float) -> None:
        """Blocks until every stage's health says SERVING; RuntimeError naming the ones that do not."""
        deadline = time.monotonic() + timeout
        waiting = dict(self.addresses)
        while waiting and time.monotonic() < deadline:
            waiting = {name: a for name, a in waiting.items() if health_status(a, timeout=1.0) != "SERVING"}
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


class Calls:
    """The stage calls of one client request: each gets the remaining deadline; all are cancelled with it."""

    def __init__(self, context: grpc.ServicerContext | None, default_timeout: float):
        self._context = context
        self._default_timeout = default_timeout
        self._lock = threading.Lock()
        self._in_flight: set[grpc.Future] = set()
        self._cancelled = False
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

    def __call__(self, method: Callable[..., Any], request: Any, stage: str) -> Any:
        """Calls one stage method (a stub's multi-callable) with the request's deadline."""
        with self._lock:
            if self._cancelled:
                raise StatusError(grpc.StatusCode.CANCELLED, "the caller cancelled")
            future = method.future(request, timeout=self.timeout())
            self._in_flight.add(future)
        try:
            return future.result()
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:  # the orchestrator validates first: name the stage
                raise ValueError(f"{error.details()} (rejected by the {stage} stage)") from error
            if code == grpc.StatusCode.CANCELLED and self._cancelled:
                raise StatusError(code, "the caller cancelled") from error
            raise StatusError(code, f"{stage} stage: {code.name}: {error.details()}") from error
        except grpc.FutureCancelledError as error:
            raise StatusError(grpc.StatusCode.CANCELLED, "the caller cancelled") from error
        finally:
            with self._lock:
                self._in_flight.discard(future)
