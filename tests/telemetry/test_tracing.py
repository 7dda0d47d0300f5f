"""One request through a chain of real processes is one connected trace, exported over real OTLP/gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2
from otlp_receiver import OTLPReceiver

from unclip.runtime.server import create_channel, health_status
from unclip.v1 import prior_pb2, prior_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
CHAIN = Path(__file__).with_name("chain_server.py")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def _start(name: str, receiver_port: int, next_addr: str | None = None) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        # The standard OpenTelemetry environment, nothing project-specific: OTLP is the default exporter.
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("OTEL_TRACES_EXPORTER", None)
    env.pop("OTEL_SDK_DISABLED", None)
    args = [sys.executable, str(CHAIN), "--name", name, "--work-seconds", "0.02"]
    if next_addr:
        args += ["--next", next_addr]
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert f"{name} listening on" in line, line
    return proc, f"127.0.0.1:{line.split()[-1]}"


@pytest.fixture(scope="module")
def traced_chain():
    """front -> middle -> back, each a process exporting to one receiver; yields the spans after a stop."""
    with OTLPReceiver() as receiver:
        procs = []
        try:
            back, back_addr = _start("back", receiver.port)
            procs.append(back)
            middle, middle_addr = _start("middle", receiver.port, back_addr)
            procs.append(middle)
            front, front_addr = _start("front", receiver.port, middle_addr)
            procs.append(front)
            with create_channel(front_addr) as channel:
                stub = prior_pb2_grpc.PriorStub(channel)
                for _ in range(3):
                    assert health_status(front_addr) == "SERVING"
                stub.Sample(prior_pb2.PriorRequest(num_inference_steps=2), timeout=30)
                # A client that already has a trace: its W3C traceparent is continued, not replaced.
                traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
                stub.Sample(prior_pb2.PriorRequest(num_inference_steps=2), timeout=30,
                            metadata=[("traceparent", traceparent)])  # fmt: skip
                with pytest.raises(grpc.RpcError):
                    stub.Sample(prior_pb2.PriorRequest(num_inference_steps=1), timeout=30)
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)  # a normal exit flushes the batch span processor
            for proc in procs:
                assert proc.wait(timeout=30) == 0
                proc.stdout.close()
        yield receiver.spans


def _traces(spans):
    traces: dict[str, list] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    return traces


def test_one_connected_trace_per_request_across_processes(traced_chain):
    traces = _traces(traced_chain)
    assert len(traces) == 3  # three requests, three traces
    full = [t for t in traces.values() if {s.service for s in t} == {"front", "middle", "back"}]
    assert len(full) == 2  # the two good requests reached every process
    for spans in full:
        by_id = {s.span_id: s for s in spans}
        roots = [s for s in spans if s.parent_span_id not in by_id]
        assert len(roots) == 1, [(s.service, s.name) for s in roots]  # connected: one root, no orphan
        # Each hop: the caller's client span is the parent of the callee's server span.
        servers = {s.service: s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER}
        assert set(servers) == {"front", "middle", "back"}
        for caller, callee in [("front", "middle"), ("middle", "back")]:
            parent = by_id[servers[callee].parent_span_id]
            assert parent.kind == trace_pb2.Span.SPAN_KIND_CLIENT and parent.service == caller
        # Queue wait and compute of every stage, under that stage's server span.
        for service, server_span in servers.items():
            queue = [s for s in spans if s.name == f"{service}.queue"]
            compute = [s for s in spans if s.name == f"{service}.compute"]
            assert len(queue) == 1 and len(compute) == 1
            assert queue[0].parent_span_id == server_span.span_id
            assert compute[0].parent_span_id == server_span.span_id
            assert compute[0].attributes["unclip.batch_size"] == 1


def test_incoming_traceparent_is_continued(traced_chain):
    traces = _traces(traced_chain)
    assert TRACE_ID in traces
    assert {s.service for s in traces[TRACE_ID]} == {"front", "middle", "back"}
    front_server = [
        s for s in traces[TRACE_ID] if s.service == "front" and s.kind == trace_pb2.Span.SPAN_KIND_SERVER
    ]
    assert front_server[0].parent_span_id == "00f067aa0ba902b7"


def test_refused_input_is_one_short_trace_and_probes_are_not_traced(traced_chain):
    traces = _traces(traced_chain)
    short = [t for t in traces.values() if {s.service for s in t} == {"front"}]
    assert len(short) == 1 and [s.name for s in short[0]] == ["/unclip.v1.Prior/Sample"]
    assert not [s for s in traced_chain if "grpc.health" in s.name]
