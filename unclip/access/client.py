"""The client side of access control: attaching an API key to a channel, and finding the local stack's key.

gRPC call credentials need a TLS channel, and the front door is plaintext by default (keys in metadata, as the
issue's threat model allows on loopback and inside a cluster's network), so the key travels through a client
interceptor that adds `authorization: Bearer <key>` to every call.

The CLI finds its address and key like kubectl finds a kubeconfig: a flag, else the environment
(UNCLIP_ADDR / UNCLIP_API_KEY), else the running `unclip up` stack's state file (unclip.stack_state), whose
`extra["api_key_file"]` names the key it minted (read only when the address is that stack's).
"""

from __future__ import annotations

import collections
from pathlib import Path

import grpc

from unclip.runtime import settings

DEFAULT_ADDR = "127.0.0.1:50051"


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class KeyInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <key>` to every call (reflection is a bidirectional stream)."""

    def __init__(self, key: str):
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _Details(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def with_key(channel: grpc.Channel, key: str | None) -> grpc.Channel:
    """`channel` sending `key` with every call (unchanged without a key)."""
    return grpc.intercept_channel(channel, KeyInterceptor(key)) if key else channel


def resolve_address(flag: str | None) -> str:
    """--addr, else UNCLIP_ADDR, else the running local stack's orchestrator, else 127.0.0.1:50051."""
    if flag:
        return flag
    if settings.env_is_set("addr"):
        return settings.env_default("addr")
    from unclip import stack_state

    state = stack_state.current()
    return state.address if state is not None else DEFAULT_ADDR


def resolve_key(flag: str | None, address: str) -> str | None:
    """--api-key, else UNCLIP_API_KEY, else the key `unclip up` minted when `address` is its stack."""
    if flag:
        return flag
    configured = settings.env_default("api_key")
    if configured:
        return configured
    from unclip import stack_state

    state = stack_state.current()
    key_file = state.extra.get("api_key_file") if state is not None else None
    if state is None or state.address != address or not key_file:
        return None
    try:
        return Path(str(key_file)).read_text().strip() or None
    except OSError:
        return None
