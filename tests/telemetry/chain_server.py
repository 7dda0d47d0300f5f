"""A test process: serves unclip.v1.Prior/Sample through the real runtime server with the metrics and tracing
interceptors, and (with --next) calls the next process in a chain, as the orchestrator calls its stages.

    python chain_server.py --name front --port 0 --metrics-port P [--next 127.0.0.1:N] [--work-seconds S]

It prints "<name> listening on <port>" and serves until SIGTERM. num_inference_steps < 2 -> INVALID_ARGUMENT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from unclip.runtime import metrics, telemetry
from unclip.runtime.server import create_channel, create_server
from unclip.v1 import prior_pb2, prior_pb2_grpc


class ChainServicer(prior_pb2_grpc.PriorServicer):
    def __init__(self, service_metrics: metrics.ServiceMetrics, next_stub, work_seconds: float):
        self.metrics = service_metrics
        self.next_stub = next_stub
        self.work_seconds = work_seconds
        self.engine_lock = threading.Lock()  # one request on the "engine" at a time, as a model stage

    def Sample(self, request, context):
        if request.num_inference_steps < 2:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "num_inference_steps must be in 2..1000")
        with self.metrics.engine_call("Sample", max(1, len(request.generators)), self.engine_lock):
            time.sleep(self.work_seconds)
            if self.next_stub is not None:
                with self.metrics.stage("next"):
                    return self.next_stub.Sample(request, timeout=30)
        return prior_pb2.PriorResponse()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--next", default=None)
    parser.add_argument("--work-seconds", type=float, default=0.0)
    args = parser.parse_args()

    service_metrics, interceptors = telemetry.instrument_process(args.name, args.metrics_port)
    next_stub = None
    if args.next:
        next_stub = prior_pb2_grpc.PriorStub(telemetry.instrument_channel(create_channel(args.next)))
    server, port = create_server(
        "127.0.0.1:" + str(args.port),
        interceptors=interceptors,
    )
    prior_pb2_grpc.add_PriorServicer_to_server(
        ChainServicer(service_metrics, next_stub, args.work_seconds), server
    )
    health_servicer = health.HealthServicer()  # probed as kubelet would; must not produce spans
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.start()
    print(f"{args.name} listening on {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.2):
        pass
    server.stop(5).wait()
    return 0  # a normal exit: atexit flushes the span processor


if __name__ == "__main__":
    sys.exit(main())
