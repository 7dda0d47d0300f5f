"""OpenTelemetry tracing of every service: one request is one trace across all processes.

The orchestrator's server span is the root; each stage call is a client span whose context travels in gRPC
metadata as a W3C `traceparent` header (the default OTEL_PROPAGATORS, tracecontext,baggage); the stage's
server span continues it, and the stage's `<service>.queue` / `<service>.compute` spans
(unclip.runtime.metrics) nest under that. Configuration is the standard OpenTelemetry environment,
read by the SDK itself:

    OTEL_SERVICE_NAME                 overrides the service name a process passes to setup_tracing
    OTEL_TRACES_EXPORTER              otlp | console | none (unset: otlp when an endpoint is set, else none)
    OTEL_EXPORTER_OTLP_ENDPOINT       collector address, e.g. http://otel-collector:4317 (OTLP over gRPC)
    OTEL_EXPORTER_OTLP_*              headers, timeout, certificate, compression ...
    OTEL_TRACES_SAMPLER(_ARG)         parentbased_always_on (default): stages follow the orchestrator
    OTEL_RESOURCE_ATTRIBUTES          e.g. k8s.pod.name=...,k8s.namespace.name=...
    OTEL_BSP_*                        batch span processor (queue size, schedule delay)
    OTEL_SDK_DISABLED=true            no tracing at all (contexts still propagate as no-ops)

    provider = setup_tracing("prior")
    serve(..., interceptors=[metrics.server_interceptor(), *server_interceptors()])
    channel = instrument_channel(create_channel(target))     # orchestrator -> stage
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import client_interceptor, filters, grpcext, server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

if TYPE_CHECKING:
    from unclip.runtime.metrics import ServiceMetrics

log = logging.getLogger(__name__)

_lock = threading.Lock()
_provider: TracerProvider | None = None

# Kubelet probes call grpc.health.v1 every few seconds; a span per probe would drown the real traces.
_NOT_HEALTH = filters.negate(
    filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
)


def _exporter_from_env() -> SpanExporter | None:
    """The exporter OTEL_TRACES_EXPORTER names; None for `none`.

    Unset, it is `otlp` as soon as an OTLP endpoint is configured (as every manifest in k8s/ does), and no
    exporter otherwise: a laptop running `unclip up` has no collector, and an exporter retrying
    localhost:4317 would fill every log with warnings. Contexts still propagate, so traces stay whole.
    """
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not name:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        name = "otlp" if any(os.environ.get(e) for e in endpoints) else "none"
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER must be otlp, console or none, got {name!r}")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol != "grpc":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc (the installed exporter), got {protocol!r}"
        )
    # Imported here: the exporter pulls in its own gRPC client, needed only when exporting.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, TLS and timeout come from OTEL_EXPORTER_OTLP_*


def setup_tracing(service_name: str, exporter: SpanExporter | None = None) -> TracerProvider | None:
    """Installs the process's tracer provider once (later calls return the same one); None when disabled.

    `exporter` replaces the one the environment names (tests pass an in-memory exporter).
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
        provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
        exporter = exporter if exporter is not None else _exporter_from_env()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        # Flush what is buffered when the process exits (SIGTERM drain ends with a normal exit).
        atexit.register(provider.shutdown)
        _provider = provider
        log.info("tracing %s with %s", resource.attributes[SERVICE_NAME], type(exporter).__name__)
        return provider


def server_interceptors() -> list[grpc.ServerInterceptor]:
    """Interceptors that continue the caller's trace (from `traceparent`) with a server span per RPC."""
    return [server_interceptor(tracer_provider=trace.get_tracer_provider(), filter_=_NOT_HEALTH)]


def instrument_channel(
    channel: grpc.Channel, *interceptors: grpc.UnaryUnaryClientInterceptor
) -> grpc.Channel:
    """`channel` with a client span per call whose context is sent as `traceparent` metadata.

    Stubs made on the returned channel propagate the current trace. `interceptors` (e.g. the orchestrator's
    `ServiceMetrics.client_interceptor(stage)`) wrap outside the tracing one. OpenTelemetry's client
    interceptor is of its own grpcext kind, not a grpc.*ClientInterceptor, so it is applied here.
    """
    interceptor = client_interceptor(tracer_provider=trace.get_tracer_provider(), filter_=_NOT_HEALTH)
    traced = grpcext.intercept_channel(channel, interceptor)
    return grpc.intercept_channel(traced, *interceptors) if interceptors else traced


def instrument_process(
    service: str, metrics_port: int, metrics_host: str = "0.0.0.0"
) -> tuple[ServiceMetrics, list[grpc.ServerInterceptor]]:
    """Tracing, the metrics endpoint and both server interceptors for one service process, in one call:

        service_metrics, interceptors = instrument_process("prior", args.metrics_port)
        serve(..., interceptors=interceptors)

    The metrics interceptor comes first, so it sees the final status of every call. The metrics endpoint
    listens on `metrics_host` (the services pass their own --host unless --metrics-host says otherwise).
    """
    from unclip.runtime.metrics import ServiceMetrics, start_metrics_server

    setup_tracing(service)
    service_metrics = ServiceMetrics(service)
    start_metrics_server(metrics_port, addr=metrics_host)
    return service_metrics, [service_metrics.server_interceptor(), *server_interceptors()]


def tracer() -> trace.Tracer:
    """The tracer for hand-made spans (`with tracer().start_as_current_span("safety.prompt"): ...`)."""
    return trace.get_tracer("unclip")
