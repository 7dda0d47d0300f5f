"""Prometheus metrics of every service: what the autoscaler reads and what an operator graphs.

Every metric carries `service` (encoder, prior, decoder, super_res, super_res_2, safety, orchestrator), so one
PromQL selector picks a stage wherever Prometheus scraped it (docs/operations.md has the table and the queries
KEDA / the HPA use). A process makes one `ServiceMetrics(service)` and uses it in three places:

    metrics = ServiceMetrics("prior")
    serve(..., interceptors=[metrics.server_interceptor(), *telemetry.server_interceptors()])
    with metrics.queued("Sample"):                  # waiting for the engine (lock / batcher)
        lock.acquire()
    with metrics.compute("Sample", batch_size=n):   # running on the engine
        engine.sample(...)

`queued` and `compute` also open the `<service>.queue` / `<service>.compute` trace spans, so the trace and the
histograms tell the same story. The orchestrator times each stage call with `metrics.stage("prior")`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Outcomes of one RPC, as `unclip_requests_total{outcome}`.
OUTCOMES = ("ok", "invalid", "refused", "cancelled", "failed")
# Seconds: stage calls range from ~10 ms (encoder) to minutes (1024 px upsampling of n=10 on CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 10, 16, 20, 32)  # images (n, or 2n rows with guidance) per engine call

REQUESTS = Counter(
    "unclip_requests",
    "RPCs answered, by method and outcome (ok, invalid, refused, cancelled, failed).",
    ["service", "method", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "unclip_request_seconds",
    "Server-side latency of one RPC, arrival to answer (queue + compute + conversion).",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "unclip_queue_seconds",
    "Time a request waited before the engine started on it.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "unclip_compute_seconds",
    "Time the engine spent on one request (all denoising steps).",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS_WAITING = Gauge(
    "unclip_requests_waiting", "Requests received and waiting for the engine (the queue).", ["service"]
)
REQUESTS_RUNNING = Gauge("unclip_requests_running", "Requests the engine is working on now.", ["service"])
BATCH_SIZE = Histogram(
    "unclip_batch_size", "Images per engine call.", ["service", "method"], buckets=BATCH_BUCKETS
)
FORWARD_PASS_IMAGES = Histogram(
    "unclip_forward_pass_images",
    "Step-level batching: images (before guidance doubles them) in each denoising forward pass.",
    ["service"],
    buckets=BATCH_BUCKETS,
)
BUSY_SECONDS = Counter(
    "unclip_busy_seconds",
    "Seconds the engine worked on requests (denoising steps, each request's preparation and finish; the "
    "encoder's and safety's engine calls); requests' usage compute_seconds add up to it.",
    ["service"],
)
MODEL_LOAD_SECONDS = Gauge(
    "unclip_model_load_seconds", "Seconds the weights took to load (and warm up) at start.", ["service"]
)
STAGE_LATENCY = Histogram(
    "unclip_stage_latency_seconds",
    "Orchestrator: end-to-end latency of each stage call as the orchestrator sees it (network included).",
    ["service", "stage", "outcome"],
    buckets=LATENCY_BUCKETS,
)


def outcome_of(code: grpc.StatusCode | None, details: str | bytes | None = None, active: bool = True) -> str:
    """The `outcome` label of a finished RPC from its status code (None: the handler returned normally)."""
    if isinstance(details, bytes):  # the server context keeps details as the bytes it will send
        details = details.decode("utf-8", "replace")
    if code is None or code == grpc.StatusCode.OK:
        return "ok" if active else "cancelled"
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "cancelled"
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        # A content-policy refusal is INVALID_ARGUMENT with a CONTENT_POLICY_VIOLATION detail whose message
        # starts so (services/safety/refusal.py); count it apart from malformed input.
        if details and details.startswith("content_policy_violation"):
            return "refused"
        return "invalid"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "refused"
    return "failed"


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every unary-unary RPC by method and outcome and times it; health and reflection are left out."""

    def __init__(self, service: str):
        self.service = service

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        full = handler_call_details.method  # "/unclip.v1.Prior/Sample"
        if (
            handler is None
            or handler.unary_unary is None
            or full.startswith(("/grpc.health.", "/grpc.reflection."))
        ):
            return handler
        method, inner, service = full.rsplit("/", 1)[-1], handler.unary_unary, self.service

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            raised = False
            try:
                return inner(request, context)
            except BaseException:
                raised = True
                raise
            finally:
                code = context.code()
                if raised and code is None:
                    code = grpc.StatusCode.UNKNOWN  # an exception the servicer did not map
                outcome = outcome_of(code, context.details(), context.is_active())
                REQUESTS.labels(service, method, outcome).inc()
                REQUEST_SECONDS.labels(service, method).observe(time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _StageLatencyInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Client side (orchestrator -> one stage): observes STAGE_LATENCY when each call completes."""

    def __init__(self, service: str, stage: str):
        self.service, self.stage = service, stage

    def intercept_unary_unary(self, continuation, client_call_details, request):
        if client_call_details.method.startswith("/grpc.health."):
            return continuation(client_call_details, request)
        started = time.perf_counter()
        call = continuation(client_call_details, request)

        def done(finished: grpc.Future) -> None:
            try:
                code, details = finished.code(), finished.details()
            except Exception:  # a cancelled future may not carry a status
                code, details = grpc.StatusCode.CANCELLED, None
            outcome = outcome_of(code, details)
            STAGE_LATENCY.labels(self.service, self.stage, outcome).observe(time.perf_counter() - started)

        # Works for blocking calls and for `.future()` ones: both return a call that is also a future.
        call.add_done_callback(done)
        return call


class ServiceMetrics:
    """The metrics of one process, bound to its `service` label."""

    def __init__(self, service: str):
        self.service = service
        self._tracer = trace.get_tracer("unclip.runtime.metrics")
        # Create every series now, so a scrape shows 0 (not "no data") before the first request: KEDA's
        # Prometheus scaler treats an empty result as an error.
        REQUESTS_WAITING.labels(service).set(0)
        REQUESTS_RUNNING.labels(service).set(0)
        BUSY_SECONDS.labels(service)

    def server_interceptor(self) -> grpc.ServerInterceptor:
        """Put it first in `interceptors=` so it sees the final status of every call."""
        return _MetricsInterceptor(self.service)

    def client_interceptor(self, stage: str) -> grpc.UnaryUnaryClientInterceptor:
        """Orchestrator: put on the channel to `stage` to time every call to it (STAGE_LATENCY):
        `telemetry.instrument_channel(channel, metrics.client_interceptor("prior"))`."""
        return _StageLatencyInterceptor(self.service, stage)

    @contextlib.contextmanager
    def queued(self, method: str) -> Iterator[None]:
        """Wraps the wait for the engine: counts the request as waiting and times the wait."""
        gauge = REQUESTS_WAITING.labels(self.service)
        gauge.inc()
        started = time.perf_counter()
        try:
            with self._tracer.start_as_current_span(f"{self.service}.queue"):
                yield
        finally:
            gauge.dec()
            QUEUE_SECONDS.labels(self.service, method).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def compute(self, method: str, batch_size: int) -> Iterator[trace.Span]:
        """Wraps the engine's work on one request of `batch_size` images."""
        gauge = REQUESTS_RUNNING.labels(self.service)
        gauge.inc()
        BATCH_SIZE.labels(self.service, method).observe(batch_size)
        started = time.perf_counter()
        try:
            with self._tracer.start_as_current_span(
                f"{self.service}.compute", attributes={"unclip.batch_size": batch_size}
            ) as span:
                yield span
        finally:
            gauge.dec()
            COMPUTE_SECONDS.labels(self.service, method).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def engine_call(
        self, method: str, batch_size: int, lock: threading.Lock | None = None
    ) -> Iterator[trace.Span]:
        """`queued` while taking `lock` (one request on the engine at a time), then `compute` holding it.

        with self.metrics.engine_call("Sample", n, self.engine_lock):
            output = self.engine.sample(...)
        """
        with self.queued(method):
            if lock is not None:
                lock.acquire()
        try:
            with self.compute(method, batch_size) as span:
                yield span
        finally:
            if lock is not None:
                lock.release()

    def forward_pass(self, images: int) -> None:
        """Step-level batching: one denoising forward pass over `images` images of one or more requests."""
        FORWARD_PASS_IMAGES.labels(self.service).observe(images)

    def busy(self, seconds: float) -> None:
        """Engine work of `seconds` (a step, a request's preparation or finish, an engine call)."""
        BUSY_SECONDS.labels(self.service).inc(seconds)

    @contextlib.contextmanager
    def model_load(self) -> Iterator[None]:
        """Wraps loading the weights (and the warm-up) at start."""
        started = time.perf_counter()
        with self._tracer.start_as_current_span(f"{self.service}.load"):
            yield
        MODEL_LOAD_SECONDS.labels(self.service).set(time.perf_counter() - started)

    @contextlib.contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Orchestrator: times one call to `stage` ("encoder", "prior", "decoder", "super_res", ...)."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = error.details() if isinstance(error, grpc.Call) else None
            outcome = outcome_of(code, details)
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            STAGE_LATENCY.labels(self.service, stage, outcome).observe(time.perf_counter() - started)


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> int | None:
    """Serves /metrics over HTTP on `port` (0: disabled, returns None); returns the port."""
    if not port:
        return None
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as error:  # fail loudly: a stage without metrics would be invisible to its autoscaler
        raise OSError(
            f"cannot serve metrics on {addr}:{port}: {error.strerror or error} "
            "(set --metrics-port / UNCLIP_METRICS_PORT to a free port, or 0 to disable)"
        ) from error
    return server.server_port
