"""The HTTP gateway's cost over calling the orchestrator directly, both doors in one run on one stack:

1. p50 added per request: one client, the same generation alternately through gRPC (ImageService.Generate,
   PNG bytes) and through HTTP (POST /v1/images/generations, response_format=b64_json), `--repeats` pairs;
   interleaved so load drift on the machine hits both sides alike. Target: <= 5 ms.
2. Throughput at `--clients` concurrent clients (default 16), each sending requests back to back for
   `--seconds`, first through gRPC then through HTTP (each client its own `user`, its own connection).
   Target: HTTP >= 95 % of gRPC's requests/s.

    python -m benchmarks.gateway [--model DIR | --tiny-width 4] [--repeats 50] [--seconds 20] [--clients 16]
        [--steps 2,2,2] [--size 32]

The clients run in this process (threads); the HTTP side's numbers include the HTTP client's own cost, as a
Python SDK user would see it. One JSON line per measurement, then a summary line.
"""

from __future__ import annotations

import argparse
import base64
import os
import threading
import time

import grpc

from benchmarks.common import emit, environment, median, model_dir, own_session, percentile, start_stack, stub

PROMPT = "a red circle above a blue square"


def grpc_call(client, steps: tuple[int, int, int], size: int, user: str):
    from unclip.v1 import orchestrator_pb2 as pb

    params = pb.SamplingParams(
        prior_num_inference_steps=steps[0],
        decoder_num_inference_steps=steps[1],
        super_res_num_inference_steps=[steps[2]],
    )
    request = pb.GenerateRequest(prompt=PROMPT, n=1, size=size, seed=1, params=params, user=user)

    def call() -> bytes:
        return client.Generate(request, timeout=120).images[0].png

    return call


def http_call(http, steps: tuple[int, int, int], size: int, user: str):
    body = {
        "prompt": PROMPT,
        "n": 1,
        "size": f"{size}x{size}",
        "response_format": "b64_json",
        "seed": 1,
        "user": user,
        "prior_num_inference_steps": steps[0],
        "decoder_num_inference_steps": steps[1],
        "super_res_num_inference_steps": [steps[2]],
    }

    def call() -> bytes:
        response = http.post("/v1/images/generations", json=body)
        response.raise_for_status()
        return base64.b64decode(response.json()["data"][0]["b64_json"])

    return call


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat: utime, stime in clock ticks)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(grpc_fn, http_fn, repeats: int, gateway_pid: int) -> dict:
    grpc_fn(), http_fn()  # warm both paths (connections, first-call setup)
    times: dict[str, list[float]] = {"grpc": [], "http": []}
    cpu_before = cpu_seconds(gateway_pid)
    for i in range(repeats):
        order = (
            (("grpc", grpc_fn), ("http", http_fn)) if i % 2 == 0 else (("http", http_fn), ("grpc", grpc_fn))
        )
        for side, fn in order:
            began = time.perf_counter()
            png = fn()
            times[side].append(time.perf_counter() - began)
            assert png.startswith(b"\x89PNG")
    # The gateway's own CPU per request: what it adds on an idle machine, whatever the load on this one.
    gateway_cpu_ms = 1000 * (cpu_seconds(gateway_pid) - cpu_before) / repeats
    p50 = {side: median(values) for side, values in times.items()}
    return {
        "gateway_cpu_ms_per_request": gateway_cpu_ms,
        "measure": "latency",
        "repeats": repeats,
        "grpc_p50_ms": 1000 * p50["grpc"],
        "http_p50_ms": 1000 * p50["http"],
        "added_p50_ms": 1000 * (p50["http"] - p50["grpc"]),
        "grpc_p90_ms": 1000 * percentile(times["grpc"], 90),
        "http_p90_ms": 1000 * percentile(times["http"], 90),
    }


def throughput(side: str, calls: list, seconds: float, errors: tuple[type[BaseException], ...]) -> dict:
    done = [0] * len(calls)
    refused = [0] * len(calls)
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < stop:
            try:
                calls[i]()
                done[i] += 1
            except errors as error:
                refused[i] += 1  # RESOURCE_EXHAUSTED / 429
                if refused[i] > 1000:
                    raise RuntimeError(f"{side} client {i} keeps failing: {error}") from error
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(calls))]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return {
        "measure": "throughput",
        "side": side,
        "clients": len(calls),
        "seconds": elapsed,
        "requests": sum(done),
        "refused_or_failed": sum(refused),
        "requests_per_s": sum(done) / elapsed,
    }


def combined(runs: list[dict]) -> dict:
    """Two throughput runs of one side as one."""
    seconds, requests = sum(r["seconds"] for r in runs), sum(r["requests"] for r in runs)
    failed = sum(r["refused_or_failed"] for r in runs)
    return {
        **runs[0],
        "seconds": seconds,
        "requests": requests,
        "refused_or_failed": failed,
        "requests_per_s": requests / seconds,
        "measure": "throughput (both halves)",
    }


def main() -> None:
    import httpx2 as httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tiny-width", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steps", default="2,2,2", help="prior,decoder,super-res steps")
    parser.add_argument("--size", type=int, default=32, help="image side (the tiny decoder's: no upsampler)")
    args = parser.parse_args()
    own_session()
    steps = tuple(int(s) for s in args.steps.split(","))
    model = model_dir(args.model, args.tiny_width)
    emit({"benchmark": "gateway", **environment(), "model": str(model), "steps": steps, "size": args.size})
    # Every client is its own caller; the per-caller cap must not refuse the 16 clients of one machine.
    stack = start_stack(model, http_port=0, extra_env={"UNCLIP_MAX_INFLIGHT_PER_CALLER": str(args.clients)})
    clients = []
    auth = {"Authorization": f"Bearer {stack.api_key}"}  # the key the stack minted, as on the gRPC side
    try:
        direct = stub(stack.address, stack.api_key)
        gateway = next(p for p in stack.processes if p.name == "gateway")
        with httpx.Client(base_url=stack.http_url, timeout=120, headers=auth) as http:
            lat = latency(
                grpc_call(direct, steps, args.size, "bench"),
                http_call(http, steps, args.size, "bench"),
                args.repeats,
                gateway.popen.pid,
            )
        emit(lat)
        grpc_calls = [
            grpc_call(stub(stack.address, stack.api_key), steps, args.size, f"c{i}")
            for i in range(args.clients)
        ]
        clients = [
            httpx.Client(base_url=stack.http_url, timeout=120, headers=auth) for _ in range(args.clients)
        ]
        http_calls = [http_call(c, steps, args.size, f"c{i}") for i, c in enumerate(clients)]
        # ABBA: each side runs twice, half the time each, so drift in the machine's load hits both alike.
        halves = {"grpc": [], "http": []}
        for side in ("grpc", "http", "http", "grpc"):
            calls, errors = (
                (grpc_calls, (grpc.RpcError,)) if side == "grpc" else (http_calls, (httpx.HTTPError,))
            )
            halves[side].append(throughput(side, calls, args.seconds / 2, errors))
            emit(halves[side][-1])
        by_grpc, by_http = (combined(halves[side]) for side in ("grpc", "http"))
        emit(by_grpc)
        emit(by_http)
        emit(
            {
                "summary": "gateway",
                "added_p50_ms": round(lat["added_p50_ms"], 2),
                "gateway_cpu_ms_per_request": round(lat["gateway_cpu_ms_per_request"], 2),
                "target_added_p50_ms": 5.0,
                "http_over_grpc_throughput": round(by_http["requests_per_s"] / by_grpc["requests_per_s"], 3),
                "target_throughput_ratio": 0.95,
            }
        )
    finally:
        for c in clients:
            c.close()
        stack.stop()


if __name__ == "__main__":
    main()
