"""The request guard every server runs: a request that cannot be parsed, or is larger than its method's limit,
is answered INVALID_ARGUMENT with one log line, before any handler code runs.

grpcio answers a request whose bytes do not parse (bad wire types, invalid UTF-8 in a string field, random
bytes) with INTERNAL "Exception deserializing request!" and logs a traceback per request; it also applies one
receive limit to the whole server. `RequestGuard` is a server interceptor that wraps the request deserializer
of every method handler (health and reflection included: they are registered on the same server):

- the serialized request's length is checked against its method's limit first, so an oversized request is
  refused before it is parsed (its bytes are already bounded by the server's receive limit, which
  `receive_limit` sizes to the largest legitimate request of that server's methods);
- a parse error becomes a marker that the wrapped handler turns into INVALID_ARGUMENT, naming the method.

The per-method limits are sized from `unclip.limits` (uploads, images per request, image sides): see
`method_limits`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from unclip.escape import printable
from unclip.limits import LIMITS

log = logging.getLogger(__name__)

KIB, MIB = 1024, 1024 * 1024

# A request that carries only text and numbers (a prompt request, a health check, a reflection query):
# 1000 characters of prompt are at most 4000 bytes of UTF-8, ten of them 40 KB.
TEXT_REQUEST_BYTES = 64 * KIB
# The text condition a prior or decoder receives at n=10 with guidance: 20 rows of hidden states of
# 77 tokens x 1280 channels (the widest CLIP text encoder) in float32 = 7.9 MB, plus embeddings, masks and
# the generators' states.
CONDITION_BYTES = 16 * MIB


def _float_images(side: int, channels: int = 3) -> int:
    """Bytes of MAX_IMAGES float32 images of `side` x `side` (how stages exchange images)."""
    return int(LIMITS["n"].high) * channels * side * side * 4


def method_limits() -> dict[str, int]:
    """Largest legitimate serialized request of each method, "/package.Service/Method" -> bytes.

    Methods not listed (health, reflection, GetStageInfo, GetCapabilities) take TEXT_REQUEST_BYTES.
    """
    upload = int(LIMITS["upload_bytes"].high)
    images = int(LIMITS["n"].high)
    side = int(LIMITS["image_side"].high)
    inpaint = _float_images(side) + _float_images(side, channels=1)  # image + mask at the largest size
    limits = {
        "/unclip.v1.ImageService/Generate": TEXT_REQUEST_BYTES,
        "/unclip.v1.ImageService/GenerateStream": TEXT_REQUEST_BYTES,
        "/unclip.v1.ImageService/CreateVariation": upload + TEXT_REQUEST_BYTES,
        "/unclip.v1.ImageService/Edit": 2 * upload + TEXT_REQUEST_BYTES,
        "/unclip.v1.ImageService/EditStream": 2 * upload + TEXT_REQUEST_BYTES,
        "/unclip.v1.ImageService/Interpolate": 2 * upload + TEXT_REQUEST_BYTES,  # two image ends
        "/unclip.v1.ImageService/InterpolateStream": 2 * upload + TEXT_REQUEST_BYTES,
        "/unclip.v1.ImageService/TextDiff": upload + TEXT_REQUEST_BYTES,
        "/unclip.v1.ImageService/Verify": upload + TEXT_REQUEST_BYTES,
        "/unclip.v1.Encoder/EncodeText": TEXT_REQUEST_BYTES,
        "/unclip.v1.Encoder/EncodeImage": images * upload + TEXT_REQUEST_BYTES,
        "/unclip.v1.Prior/Sample": CONDITION_BYTES,
        "/unclip.v1.Prior/SampleStream": CONDITION_BYTES,
        # Decode: an edit's inpaint input, or (interpolations, text diffs) starting latents at the decoder's
        # size, at most a quarter of the cascade's largest side.
        "/unclip.v1.Decoder/Decode": CONDITION_BYTES + inpaint,
        "/unclip.v1.Decoder/DecodeStream": CONDITION_BYTES + inpaint,
        "/unclip.v1.Decoder/Invert": CONDITION_BYTES + _float_images(side // 4),
        # The upsampler's input is at most a quarter of the largest side (a x4 stage).
        "/unclip.v1.Upsampler/Upsample": _float_images(side // 4) + inpaint + TEXT_REQUEST_BYTES,
        "/unclip.v1.Upsampler/UpsampleStream": _float_images(side // 4) + inpaint + TEXT_REQUEST_BYTES,
        "/unclip.v1.Safety/CheckPrompt": TEXT_REQUEST_BYTES,
        "/unclip.v1.BatchHold/Hold": TEXT_REQUEST_BYTES,
        "/unclip.v1.Safety/CheckImages": _float_images(side) + CONDITION_BYTES,
    }
    return limits


def receive_limit(service_names: Iterable[str], limits: dict[str, int] | None = None) -> int:
    """The server-wide receive limit for a server of these services: its largest method's limit."""
    limits = method_limits() if limits is None else limits
    pool = descriptor_pool.Default()
    largest = TEXT_REQUEST_BYTES
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        for method in service.methods:
            largest = max(largest, limits.get(f"/{name}/{method.name}", TEXT_REQUEST_BYTES))
    return largest


class _Refused:
    """What the wrapped deserializer returns instead of a request it refuses."""

    def __init__(self, message: str):
        self.message = message


class RequestGuard(grpc.ServerInterceptor):
    """Wraps every handler's request deserializer: size check, then parse; either failing is INVALID_ARGUMENT
    with one log line (no traceback), and the servicer never sees the request."""

    def __init__(self, service: str, limits: dict[str, int] | None = None):
        self.service = service  # the process's name, for the log line
        self.limits = method_limits() if limits is None else limits

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        deserialize = self._deserializer(method, handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary), deserialize, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(method, handler.unary_stream), deserialize, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream(method, handler.stream_unary), deserialize, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream_stream(method, handler.stream_stream), deserialize, handler.response_serializer
        )

    def _deserializer(self, method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        limit = self.limits.get(method, TEXT_REQUEST_BYTES)

        def deserialize(data: bytes) -> Any:
            if len(data) > limit:
                return _Refused(f"request: {len(data)} bytes, over the {limit}-byte limit of {method}")
            try:
                return parse(data)
            except Exception as error:  # DecodeError, UnicodeDecodeError, ...: the caller's bytes
                reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                return _Refused(f"request: not a valid message for {method} ({reason})")

        return deserialize

    def _refuse(self, refused: _Refused, context: grpc.ServicerContext) -> None:
        log.warning("%s: refused %s from %s", self.service, printable(refused.message), context.peer())
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused.message)

    def _unary(self, method: str, behavior: Callable) -> Callable:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Refused):
                self._refuse(request, context)
            return behavior(request, context)

        return guarded

    def _unary_stream(self, method: str, behavior: Callable) -> Callable:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if isinstance(request, _Refused):
                self._refuse(request, context)
            yield from behavior(request, context)

        return guarded

    def _checked(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, _Refused):
                self._refuse(request, context)
            yield request

    def _stream(self, method: str, behavior: Callable) -> Callable:
        def guarded(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behavior(self._checked(requests, context), context)

        return guarded

    def _stream_stream(self, method: str, behavior: Callable) -> Callable:
        def guarded(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            yield from behavior(self._checked(requests, context), context)

        return guarded
