"""A denoising stage's unary gRPC method and its server-streaming twin, made from one body.

Prior.Sample, Decoder.Decode and Upsampler.Upsample each have a streaming twin (SampleStream, DecodeStream,
UpsampleStream) that does the same work and reports it: an accepted event (queue position), one event per
denoising step, then the unary method's output (``unclip.runtime.progress.stream_progress``). Both run one
body, ``work(self, request, context, on_accepted=None, on_step=None) -> output``, so a stage's servicer writes
its request handling once and names the pair:

    Sample, SampleStream = unary_and_stream(_sample, prior_pb2.PriorEvent, "Sample")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from unclip.runtime.errors import grpc_errors, grpc_stream_errors
from unclip.runtime.progress import stream_progress

Work = Callable[..., Any]  # work(self, request, context, on_accepted=None, on_step=None) -> output message


def unary_and_stream(work: Work, event: Callable[..., Any], name: str) -> tuple[Callable, Callable]:
    """(``name``, ``name + "Stream"``) servicer methods around ``work``.

    event: the stream's message type, with a ``progress`` (StageProgress) and an ``output`` field. Errors map
    to statuses as every servicer method's do (``grpc_errors`` / ``grpc_stream_errors``).
    """
    stream_name = f"{name}Stream"

    def unary(self: Any, request: Any, context: Any) -> Any:
        return work(self, request, context)

    def stream(self: Any, request: Any, context: Any) -> Iterator[Any]:
        self.slot.get()  # UNAVAILABLE while loading, before any event is sent
        yield from stream_progress(
            lambda on_accepted, on_step: work(self, request, context, on_accepted, on_step),
            lambda progress: event(progress=progress),
            lambda output: event(output=output),
            name=stream_name,
        )

    # The status mapping logs and reports the method's name.
    unary.__name__ = unary.__qualname__ = name
    stream.__name__ = stream.__qualname__ = stream_name
    return grpc_errors(unary), grpc_stream_errors(stream)
