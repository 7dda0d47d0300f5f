"""The metrics interceptor and ServiceMetrics through a real gRPC server, scraped over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.safety.refusal import refusal_status
from unclip.runtime import metrics
from unclip.runtime.server import create_channel, create_server
from unclip.v1 import prior_pb2, prior_pb2_grpc

SERVICE = "metrics-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Behaviours(prior_pb2_grpc.PriorServicer):
    """num_inference_steps picks what the call does, so one servicer shows every outcome."""

    def __init__(self, service_metrics: metrics.ServiceMetrics):
        self.metrics = service_metrics
        self.lock = threading.Lock()
        self.release = threading.Event()

    def Sample(self, request, context):
        steps = request.num_inference_steps
        if steps == 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_inference_steps must be in 2..1000, got 1")
        if steps == 3:
            context.abort_with_status(refusal_status("prompt", ["violence"]))
        if steps == 4:
            raise RuntimeError("a bug")
        with self.metrics.queued("Sample"):
            self.lock.acquire()
        try:
            with self.metrics.compute("Sample", batch_size=len(request.generators) or 1):
                if steps == 5:
                    time.sleep(0.6)  # longer than the client's deadline
                if steps == 6:
                    self.release.wait(30)
        finally:
            self.lock.release()
        return prior_pb2.PriorResponse()


@pytest.fixture(scope="module")
def served():
    service_metrics = metrics.ServiceMetrics(SERVICE)
    servicer = Behaviours(service_metrics)
    server, port = create_server("127.0.0.1:0", interceptors=[service_metrics.server_interceptor()])
    prior_pb2_grpc.add_PriorServicer_to_server(servicer, server)
    server.start()
    metrics_port = metrics.start_metrics_server(_free_port(), addr="127.0.0.1")
    channel = create_channel(f"127.0.0.1:{port}")
    yield prior_pb2_grpc.PriorStub(channel), servicer, metrics_port
    servicer.release.set()
    channel.close()
    server.stop(1).wait()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of this test's service, read over HTTP as Prometheus would."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("service") == SERVICE:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "service"))
                samples[(sample.name, labels)] = sample.value
    return samples


def requests_total(samples, outcome: str) -> float:
    key = ("unclip_requests_total", (("method", "Sample"), ("outcome", outcome)))
    return samples.get(key, 0.0)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_every_outcome_is_counted(served):
    stub, _, port = served
    before = scrape(port)
    stub.Sample(prior_pb2.PriorRequest(num_inference_steps=2), timeout=10)
    calls = {
        1: grpc.StatusCode.INVALID_ARGUMENT,
        3: grpc.StatusCode.INVALID_ARGUMENT,
        4: grpc.StatusCode.UNKNOWN,
    }
    for steps, code in calls.items():
        with pytest.raises(grpc.RpcError) as error:
            stub.Sample(prior_pb2.PriorRequest(num_inference_steps=steps), timeout=10)
        assert error.value.code() == code
    with pytest.raises(grpc.RpcError) as error:
        stub.Sample(prior_pb2.PriorRequest(num_inference_steps=5), timeout=0.2)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    expected = {"ok": 1, "invalid": 1, "refused": 1, "failed": 1, "cancelled": 1}
    # The deadline call is counted when its handler ends, a little after the client gave up.
    wait_for(lambda: requests_total(scrape(port), "cancelled") - requests_total(before, "cancelled") == 1)
    after = scrape(port)
    for outcome, count in expected.items():
        assert requests_total(after, outcome) - requests_total(before, outcome) == count, outcome
    latency_count = ("unclip_request_seconds_count", (("method", "Sample"),))
    assert after[latency_count] - before.get(latency_count, 0) == 5


def test_queue_and_running_gauges_move_under_load(served):
    stub, servicer, port = served
    servicer.release.clear()
    assert scrape(port)[("unclip_requests_running", ())] == 0
    pool = futures.ThreadPoolExecutor(3)
    calls = [
        pool.submit(
            stub.Sample, prior_pb2.PriorRequest(num_inference_steps=6, generators=[{}] * 4), timeout=30
        )
        for _ in range(3)
    ]
    # One request on the engine, two queued behind its lock.
    wait_for(lambda: scrape(port)[("unclip_requests_waiting", ())] == 2)
    samples = scrape(port)
    assert samples[("unclip_requests_running", ())] == 1
    servicer.release.set()
    for call in calls:
        call.result(timeout=30)
    pool.shutdown()
    samples = scrape(port)
    assert samples[("unclip_requests_waiting", ())] == 0
    assert samples[("unclip_requests_running", ())] == 0
    assert samples[("unclip_batch_size_count", (("method", "Sample"),))] >= 3
    assert samples[("unclip_batch_size_sum", (("method", "Sample"),))] >= 12  # 4 images each
    assert samples[("unclip_queue_seconds_count", (("method", "Sample"),))] >= 3
    assert samples[("unclip_compute_seconds_sum", (("method", "Sample"),))] > 0


def test_model_load_and_stage_latency():
    service_metrics = metrics.ServiceMetrics(SERVICE + "-load")
    with service_metrics.model_load():
        time.sleep(0.05)
    assert metrics.MODEL_LOAD_SECONDS.labels(SERVICE + "-load")._value.get() >= 0.05
    with service_metrics.stage("prior"):
        pass
    with pytest.raises(RuntimeError), service_metrics.stage("decoder"):
        raise RuntimeError("down")
    ok = metrics.STAGE_LATENCY.labels(SERVICE + "-load", "prior", "ok")
    failed = metrics.STAGE_LATENCY.labels(SERVICE + "-load", "decoder", "failed")
    assert ok._sum.get() >= 0 and failed._sum.get() >= 0
    assert [s.value for s in metrics.STAGE_LATENCY.collect()[0].samples if s.name.endswith("_count")
            and s.labels["service"] == SERVICE + "-load"] == [1.0, 1.0]  # fmt: skip


def test_metrics_port_zero_disables():
    assert metrics.start_metrics_server(0) is None


@pytest.mark.parametrize(
    ("code", "details", "active", "outcome"),
    [
        (None, None, True, "ok"),
        (None, None, False, "cancelled"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", True, "cancelled"),
        (grpc.StatusCode.INVALID_ARGUMENT, "n must be in 1..10, got 0", True, "invalid"),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "content_policy_violation: the prompt was refused",
            True,
            "refused",
        ),
        (grpc.StatusCode.UNAVAILABLE, "stage down", True, "failed"),
        (grpc.StatusCode.INTERNAL, "bug", True, "failed"),
    ],
)
def test_outcome_mapping(code, details, active, outcome):
    assert metrics.outcome_of(code, details, active) == outcome


def test_stage_latency_from_the_client_interceptor():
    """The orchestrator's view: every call to a stage, blocking or `.future()`, observed with its outcome."""
    from unclip.runtime.telemetry import instrument_channel

    service_metrics = metrics.ServiceMetrics(SERVICE + "-orch")
    server_metrics = metrics.ServiceMetrics(SERVICE + "-stage")
    servicer = Behaviours(server_metrics)
    server, port = create_server("127.0.0.1:0", interceptors=[server_metrics.server_interceptor()])
    prior_pb2_grpc.add_PriorServicer_to_server(servicer, server)
    server.start()
    try:
        channel = instrument_channel(
            create_channel(f"127.0.0.1:{port}"), service_metrics.client_interceptor("prior")
        )
        stub = prior_pb2_grpc.PriorStub(channel)
        stub.Sample(prior_pb2.PriorRequest(num_inference_steps=2), timeout=10)
        stub.Sample.future(prior_pb2.PriorRequest(num_inference_steps=2), timeout=10).result()
        with pytest.raises(grpc.RpcError):
            stub.Sample(prior_pb2.PriorRequest(num_inference_steps=1), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Sample.future(prior_pb2.PriorRequest(num_inference_steps=5), timeout=0.2).result()
        channel.close()
    finally:
        server.stop(1).wait()

    def count(outcome: str) -> float:
        return sum(
            s.value
            for s in metrics.STAGE_LATENCY.collect()[0].samples
            if s.name.endswith("_count")
            and s.labels == {"service": SERVICE + "-orch", "stage": "prior", "outcome": outcome}
        )

    wait_for(lambda: count("cancelled") == 1)
    assert (count("ok"), count("invalid"), count("cancelled")) == (2, 1, 1)


@pytest.mark.parametrize(
    ("env", "exporter"),
    [
        ({}, None),  # nothing configured (a laptop): no exporter retrying localhost
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "OTLPSpanExporter"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, "OTLPSpanExporter"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "OTLPSpanExporter"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "ConsoleSpanExporter"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, None),
    ],
)
def test_exporter_follows_the_standard_environment(monkeypatch, env, exporter):
    from unclip.runtime import telemetry

    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    made = telemetry._exporter_from_env()
    assert (type(made).__name__ if made is not None else None) == exporter
    if made is not None:
        made.shutdown()


def test_unknown_exporter_is_refused(monkeypatch):
    from unclip.runtime import telemetry

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER must be otlp, console or none"):
        telemetry._exporter_from_env()


def test_metrics_port_in_use_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}.*UNCLIP_METRICS_PORT"):
            metrics.start_metrics_server(port, addr="127.0.0.1")
