"""The two checks at a service's door, as gRPC server interceptors.

`FrontDoor` (the orchestrator): `authorization: Bearer <key>` metadata, else a verified client certificate
listed in the keys file, becomes an `Identity`; the method's scope must be among the identity's. Failures:
UNAUTHENTICATED (no, unknown or revoked credentials) or PERMISSION_DENIED (the scope is missing), each naming
what is missing and never echoing the key. grpc.health.v1 answers without credentials (probes, load
balancers); reflection needs a valid key of any scope.

`StageGuard` (every stage): the caller's verified certificate (the server requires one of the stack's CA) must
name a service allowed to call this one (ALLOWED_CALLERS); health answers anyone (it is also served on the
plaintext health-only port).

Both run the check in the handler's thread (wrapping the method handler), where the servicer context, and so
the peer's TLS auth context, exists; the identity is handed to the servicer through `current_identity()`.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from prometheus_client import Counter

from unclip.access.keys import ANONYMOUS, Identity, KeyStore
from unclip.access.tls import peer_common_name, peer_names

_IDENTITY: contextvars.ContextVar[Identity] = contextvars.ContextVar("unclip_identity", default=ANONYMOUS)

# Which scope each public method needs; methods not listed need a valid identity of any scope.
METHOD_SCOPES = {
    "Generate": "generate",
    "GenerateStream": "generate",
    "CreateVariation": "vary",
    "Edit": "edit",
    "EditStream": "edit",
}

# Who may call each service (the caller's certificate CN). The safety service's CLIP filter calls the encoder.
ALLOWED_CALLERS = {
    "encoder": ("orchestrator", "safety"),
    "prior": ("orchestrator",),
    "decoder": ("orchestrator",),
    "safety": ("orchestrator",),
}
DEFAULT_CALLERS = ("orchestrator",)  # the upsamplers and anything else

OPEN_PREFIXES = ("/grpc.health.v1.",)

# Requests by tenant at the front door. The label is bounded: the keys file's tenants (at most
# MAX_TENANT_LABELS of them), "anonymous" with authentication off, "other" beyond that.
MAX_TENANT_LABELS = 100
TENANT_REQUESTS = Counter(
    "unclip_tenant_requests",
    "Authenticated requests at the front door by tenant, method and outcome.",
    ["tenant", "method", "outcome"],
)


def tenant_label(tenant: str, known: set[str]) -> str:
    """`tenant` when it is one of the first MAX_TENANT_LABELS known tenants (or "anonymous"), else "other"."""
    if tenant == "anonymous" or (tenant in known and sorted(known).index(tenant) < MAX_TENANT_LABELS):
        return tenant
    return "other"


def current_identity() -> Identity:
    """The identity of the call being handled on this thread (ANONYMOUS when authentication is off)."""
    return _IDENTITY.get()


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _wrap(
    handler: Any,
    check: Callable[[grpc.ServicerContext], Identity],
    done: Callable[[Identity, grpc.ServicerContext], None] | None = None,
) -> Any:
    """The same handler with `check(context)` run first: its identity is set for the servicer and put on the
    current span (tenant and principal); `done(identity, context)` runs once a unary call has returned."""

    def guarded(inner: Callable[..., Any], unary: bool = False) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                identity = check(context)
            except Refused as refused:
                context.abort(refused.code, refused.message)
            _IDENTITY.set(identity)
            span = trace.get_current_span()
            span.set_attribute("unclip.tenant", identity.tenant)
            span.set_attribute("unclip.principal", identity.principal)
            if done is None or not unary:  # (a stream's outcome is known only once it is consumed)
                return inner(request, context)
            try:
                return inner(request, context)
            finally:
                done(identity, context)

        return behavior

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            guarded(handler.unary_unary, True), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            guarded(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            guarded(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        guarded(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


class FrontDoor(grpc.ServerInterceptor):
    """API keys / client certificates -> Identity, and the scope check (see the module docstring)."""

    def __init__(self, store: KeyStore):
        self.store = store

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        scope = METHOD_SCOPES.get(method) if details.method.startswith("/unclip.") else None
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        return _wrap(handler, lambda context: self.authorize(header, context, scope), self._count(method))

    def _count(self, method: str) -> Callable[[Identity, grpc.ServicerContext], None]:
        def count(identity: Identity, context: grpc.ServicerContext) -> None:
            from unclip.runtime.metrics import outcome_of

            tenant = tenant_label(identity.tenant, self.store.tenant_names())
            TENANT_REQUESTS.labels(tenant, method, outcome_of(context.code(), context.details())).inc()

        return count

    def authenticate(self, header: str | None, context: grpc.ServicerContext) -> Identity:
        if header is not None:
            scheme, _, token = str(header).strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <API key>'"
                )
            record = self.store.by_key(token.strip())
            if record is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown API key: it is not in the keys file")
            if record.revoked:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"API key {record.name!r} was revoked")
            return record.identity("key")
        names = peer_names(context)
        if names:
            record = self.store.by_subject(names)
            if record is None:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client certificate {names[0]!r} is not listed in the keys file",
                )
            if record.revoked:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"client {record.name!r} was revoked")
            return record.identity("cert")
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing credentials: send the metadata 'authorization: Bearer <API key>' "
            "(unclip: --api-key or UNCLIP_API_KEY) or a client certificate",
        )

    def authorize(self, header: str | None, context: grpc.ServicerContext, scope: str | None) -> Identity:
        identity = self.authenticate(header, context)
        if scope is not None and not identity.allows(scope):
            has = ", ".join(sorted(identity.scopes))
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.principal} lacks the scope {scope!r} (it has: {has})",
            )
        return identity


class StageGuard(grpc.ServerInterceptor):
    """Only services in `allowed` (certificate CN) may call; health answers anyone."""

    def __init__(self, service: str, allowed: tuple[str, ...]):
        self.service = service
        self.allowed = allowed

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        return _wrap(handler, self.check)

    def check(self, context: grpc.ServicerContext) -> Identity:
        caller = peer_common_name(context)
        if not caller:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{self.service} requires a client certificate of the stack's CA",
            )
        if caller not in self.allowed:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller!r} may not call {self.service} (allowed: {', '.join(self.allowed)})",
            )
        return Identity(name=caller, tenant="", kind="service")


def allowed_callers(service: str, configured: str = "") -> tuple[str, ...]:
    """The callers a service admits: `configured` (comma-separated) or its default."""
    if configured.strip():
        return tuple(part.strip() for part in configured.split(",") if part.strip())
    return ALLOWED_CALLERS.get(service.split("#")[0], DEFAULT_CALLERS)
