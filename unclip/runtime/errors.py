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


def grpc_errors(method: F) -> F:
    """Decorates a servicer method: maps ValueError, StatusError and RequestCancelled to their status
    codes."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except ValueError as error:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except StatusError as error:
            if error.status is not None:
                context.abort_with_status(error.status)
            code, message = error.code, error.message
        except RequestCancelled as error:
            log.info("%s stopped: %s", method.__name__, error)
            code, message = error.code, str(error)
        except grpc.RpcError as error:  # a downstream call failed: pass its status on
            code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
            message = error.details() if hasattr(error, "details") else str(error)
        except Exception as error:  # a bug, not bad input: say so and keep serving
            log.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"
        context.abort(code, message)

    return wrapper  # type: ignore[return-value]
