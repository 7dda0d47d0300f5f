"""Throughput sweep: C concurrent clients (1, 2, 4, 8, 16) against the stack, each sending requests back to
back for a fixed time; images/s, p50 and p99 latency, and per stage the split between queue time (accepted by
the stage -> its first denoising step) and compute time (first step -> stage finished), from GenerateStream's
events. The in-process pipeline called sequentially is the baseline.

    python -m benchmarks.throughput [--model DIR] [--clients 1,2,4,8,16] [--seconds 20] [--steps 25,25,7]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import defaultdict

import grpc

from benchmarks.common import (
    emit,
    environment,
    generate_request,
    median,
    model_dir,
    percentile,
    reference_pipeline,
    run_reference,
    start_stack,
    stub,
)
from unclip.runtime.errors import retry_after

PROMPT = "a red circle above a blue square"


def one_streamed(client, request) -> tuple[float, dict[str, list[float]]]:
    """(latency, {stage: [queue_s, compute_s]}) of one streamed request."""
    began = time.perf_counter()
    accepted_at: dict[str, float] = {}
    first_step: dict[str, float] = {}
    split: dict[str, list[float]] = {}
    for event in client.GenerateStream(request, timeout=600):
        now = time.perf_counter()
        kind = event.WhichOneof("event")
        if kind == "stage_started":
            accepted_at[event.stage_started.stage] = now
        elif kind == "step" and event.step.stage not in first_step:
            first_step[event.step.stage] = now
        elif kind == "stage_finished":
            stage = event.stage_finished.stage
            if stage in first_step:
                split[stage] = [first_step[stage] - accepted_at[stage], now - first_step[stage]]
    return time.perf_counter() - began, split


def sweep_point(client, clients: int, seconds: float, steps) -> dict:
    latencies: list[float] = []
    splits: dict[str, list[list[float]]] = defaultdict(list)
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    refused = [0]

    def worker(index: int) -> None:
        seed = 1000 * index
        while time.perf_counter() < stop_at:
            request = generate_request(PROMPT, 1, seed, steps)
            request.user = f"client{index}"  # one caller each: the per-caller limit must not throttle them
            try:
                latency, split = one_streamed(client, request)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                with lock:
                    refused[0] += 1
                time.sleep(retry_after(error) or 0.5)
                continue
            seed += 1
            with lock:
                latencies.append(latency)
                for stage, pair in split.items():
                    splits[stage].append(pair)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return {
        "clients": clients,
        "images_per_s": round(len(latencies) / elapsed, 3),
        "p50_s": round(percentile(latencies, 50), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "requests": len(latencies),
        "refused": refused[0],
        "queue_compute_s": {
            stage: [round(median([p[0] for p in pairs]), 4), round(median([p[1] for p in pairs]), 4)]
            for stage, pairs in splits.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--steps", default="25,25,7")
    parser.add_argument("--replicas", default="", help="as unclip up --replicas")
    args = parser.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    model = model_dir(args.model)
    emit({"benchmark": "throughput", **environment(), "model": str(model), "steps": steps})

    # Baseline: the in-process pipeline, one request after another, for the same time.
    pipe = reference_pipeline(model)
    run_reference(pipe, PROMPT, 1, 0, steps)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        run_reference(pipe, PROMPT, 1, count, steps)
        count += 1
    emit({"in_process_sequential_images_per_s": round(count / (time.perf_counter() - began), 3)})
    del pipe

    from unclip.stack import parse_replicas

    stack = start_stack(model, replicas=parse_replicas(args.replicas))
    try:
        client = stub(stack.address)
        one_streamed(client, generate_request(PROMPT, 1, 0, steps))  # warm
        for clients in (int(c) for c in args.clients.split(",")):
            emit(sweep_point(client, clients, args.seconds, steps))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
