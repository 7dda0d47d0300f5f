"""Error mapping shared by every servicer.

Engines raise `ValueError` whose message starts with the offending field's name; the servicer turns it into
INVALID_ARGUMENT (never INTERNAL: bad input is the caller's to fix, and the service stays SERVING). A step
callback raises `RequestCancelled` when the caller has gone or its deadline passed, which stops the denoising
loop.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class StatusError(Exception):
    """An error with the gRPC status it should reach the caller as."""

    def __init__(self, code: grpc.StatusCode, message: str, status: grpc.Status | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status  # a rich status (with details, e.g. a content-policy refusal) to abort with


class RequestCancelled(Exception):
    """Raised inside a step callback to stop work nobody waits for any more."""

    def __init__(
        self, message: str = "the caller cancelled", code: grpc.StatusCode = grpc.StatusCode.CANCELLED
    ):
        super().__init__(message)
        self.code = code


def step_callback_for(context: grpc.ServicerContext) -> Callable[[int, int], None]:
    """A step_callback (engines call it after every denoising step) that stops the work when the call is
    over."""

    def step_callback(step: int, total: int) -> None:
        if not context.is_active():
            raise RequestCancelled(f"cancelled by the caller at step {step}/{total}")
        remaining = context.time_remaining()  # far in the future when the caller set no deadline
        if remaining is not None and remaining <= 0:
            raise RequestCancelled(
                f"deadline exceeded at step {step}/{total}", grpc.StatusCode.DEADLINE_EXCEEDED
            )

    return step_callback


def _status_of(error: BaseException, name: str, context: grpc.ServicerContext) -> tuple[Any, str]:
    """(code, message) of an exception as grpc_errors maps it; aborts at once for rich statuses."""
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, StatusError):
        if error.status is not None:
            context.abort_with_status(error.status)
        return error.code, error.message
    if isinstance(error, RequestCancelled):
        log.info("%s stopped: %s", name, error)
        return error.code, str(error)
    if isinstance(error, grpc.RpcError):  # a downstream call failed: pass its status on
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        return code, error.details() if hasattr(error, "details") else str(error)
    log.error("%s failed", name, exc_info=error)  # a bug, not bad input: say so and keep serving
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def grpc_stream_errors(method: F) -> F:
    """grpc_errors for server-streaming methods (the errors surface while the answer is iterated)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except Exception as error:
            code, message = _status_of(error, method.__name__, context)
            context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def grpc_errors(method: F) -> F:
    """Decorates a servicer method: maps ValueError, StatusError and RequestCancelled to their status
    codes."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as error:
            code, message = _status_of(error, method.__name__, context)
        context.abort(code, message)

    return wrapper  # type: ignore[return-value]


# ---- backpressure: RESOURCE_EXHAUSTED with a retry hint ---------------------------------------------------

# Trailing metadata key with the retry hint in milliseconds, for clients that do not read rich statuses.
RETRY_AFTER_KEY = "retry-after-ms"
# Trailing metadata key naming the limit that refused ("capacity" for plain backpressure; "images_per_minute",
# "max_concurrent", "tenant_images_per_minute", ... for quotas): the HTTP gateway answers 429 to a quota.
LIMIT_KEY = "unclip-limit"


def resource_exhausted(message: str, retry_after_s: float, limit: str = "capacity") -> StatusError:
    """RESOURCE_EXHAUSTED carrying a google.rpc.RetryInfo (how long to wait before retrying) and the name of
    the limit (`unclip-limit` trailing metadata)."""
    from google.protobuf import duration_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    retry_after_s = max(0.0, float(retry_after_s))
    delay = duration_pb2.Duration(seconds=int(retry_after_s), nanos=int((retry_after_s % 1) * 1e9))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    rich = rpc_status.to_status(status)
    rich = _with_metadata(rich, ((RETRY_AFTER_KEY, str(int(retry_after_s * 1000))), (LIMIT_KEY, limit)))
    return StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, rich)


def _with_metadata(status: grpc.Status, extra: tuple[tuple[str, str], ...]) -> grpc.Status:
    class _Status(grpc.Status):
        def __init__(self) -> None:
            self.code, self.details = status.code, status.details
            self.trailing_metadata = tuple(status.trailing_metadata or ()) + extra

    return _Status()


def limit_of(error: grpc.RpcError) -> str | None:
    """The `unclip-limit` of a RESOURCE_EXHAUSTED error, or None when it names none."""
    if not isinstance(error, grpc.Call):
        return None
    return next((value for key, value in error.trailing_metadata() or () if key == LIMIT_KEY), None)


def retry_after(error: grpc.RpcError) -> float | None:
    """The retry hint (seconds) of a RESOURCE_EXHAUSTED error, or None when it carries none."""
    if not isinstance(error, grpc.Call):
        return None
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None
