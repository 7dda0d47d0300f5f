"""Latency: the stack (every stage its own process, gRPC over loopback, every safety check on) ÷ diffusers'
in-process UnCLIPPipeline with the same weights and steps, at n=1 and n=4; and the milliseconds the services
add per request.

    python -m benchmarks.latency [--model DIR] [--repeats 5] [--steps 25,25,7] [--breakdown 5]

Without --model a tiny random model is made (compute is small there, so the difference is the overhead).
On a shared machine the difference of two multi-second medians is mostly noise in the compute: the script
also reports the median of the paired differences (each stack run minus the in-process run just before it),
CPU seconds per request on both sides (the stack's summed over its processes, from /proc) and their ratio,
and `--breakdown K` traces K more requests through a stack whose processes print their OpenTelemetry spans:
each request's wall time minus the stages' own compute spans is what the services add, measured inside one
request (per hop: the stage call's time outside the stage's compute; safety calls count whole).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    add_dtype_argument,
    breakdown,
    emit,
    environment,
    generate_request,
    median,
    model_dir,
    own_session,
    read_spans,
    reference_pipeline,
    run_reference,
    start_stack,
    stub,
    timed,
)
from unclip.models import parse_dtype

PROMPT = "a red circle above a blue square"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", default="25,25,7", help="prior,decoder,super-res steps")
    parser.add_argument("--sizes", default="1,4", help="values of n")
    parser.add_argument("--breakdown", type=int, default=0, help="trace this many n=1 requests (0: none)")
    add_dtype_argument(parser)
    args = parser.parse_args()
    os.environ["UNCLIP_DTYPE"] = args.dtype  # the stages
    own_session()  # the in-process side competes for the CPU on the stack's terms
    steps = tuple(int(s) for s in args.steps.split(","))
    model = model_dir(args.model)
    dtype = str(parse_dtype(args.dtype)).removeprefix("torch.")
    # The in-process side in float32: diffusers' default, and on the CPU the only precision UnCLIPPipeline
    # runs in (its antialiased bicubic resize has no bfloat16 CPU kernel in torch 2.13).
    emit({"benchmark": "latency", **environment(), "model": str(model), "steps": steps, "dtype": dtype,
          "baseline_dtype": "float32"})  # fmt: skip

    pipe = reference_pipeline(model)
    stack = start_stack(model)
    try:
        client = stub(stack.address, stack.api_key)
        for n in (int(v) for v in args.sizes.split(",")):
            request = generate_request(PROMPT, n, 0, steps)
            run_reference(pipe, PROMPT, n, 0, steps)  # warm both sides
            client.Generate(request, timeout=600)
            # Interleave the two sides so machine load drifts hit both alike.
            local, served, local_cpu, served_cpu = [], [], [], []
            for _ in range(args.repeats):
                cpu = time.process_time()
                local += timed(lambda n=n: run_reference(pipe, PROMPT, n, 0, steps), 1)
                local_cpu.append(time.process_time() - cpu)
                cpu = stack_cpu(stack)
                served += timed(lambda r=request: client.Generate(r, timeout=600), 1)
                served_cpu.append(stack_cpu(stack) - cpu)
            ratio = median(served) / median(local)
            emit(
                {
                    "n": n,
                    "in_process_s": round(median(local), 4),
                    "stack_s": round(median(served), 4),
                    "ratio": round(ratio, 3),
                    "overhead_ms": round(1000 * (median(served) - median(local)), 1),
                    "paired_overhead_ms": round(
                        1000 * median([b - a for a, b in zip(local, served, strict=True)]), 1
                    ),
                    # CPU seconds per request: the in-process side's own; the stack's every process
                    # together (10 ms ticks). Load stretches wall times unevenly, CPU far less.
                    "in_process_cpu_s": round(median(local_cpu), 3),
                    "stack_cpu_s": round(median(served_cpu), 3),
                    "cpu_ratio": round(median(served_cpu) / median(local_cpu), 3),
                }
            )
    finally:
        stack.stop()
    if args.breakdown:
        emit({"breakdown": trace_breakdown(model, steps, args.breakdown)})


def stack_cpu(stack) -> float:
    """CPU seconds (user + system) every process of the stack has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for process in stack.processes:
        try:
            fields = Path(f"/proc/{process.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def trace_breakdown(model: Path, steps: tuple[int, int, int], repeats: int) -> dict:
    """Medians over `repeats` traced n=1 requests (after one warm-up) of where each request's time went."""
    logs = Path(tempfile.mkdtemp(prefix="unclip-trace-"))
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    stack = start_stack(model, log_dir=logs, extra_env=env)
    try:
        client = stub(stack.address, stack.api_key)
        request = generate_request(PROMPT, 1, 0, steps)
        client.Generate(request, timeout=600)
        time.sleep(1.0)  # the warm-up's spans leave first: it is dropped below
        for _ in range(repeats):
            client.Generate(request, timeout=600)
        time.sleep(1.0)
    finally:
        stack.stop()  # flushes every process's spans
    spans = read_spans(logs)
    rows = breakdown(spans)[1:]  # without the warm-up
    outside = outside_every_call(spans)
    for row in rows:
        row["orchestrator_outside_calls_ms"] = outside[row["start"]]
    keys = sorted({k for r in rows for k in r} - {"start"})
    return {k: round(median([r[k] for r in rows if k in r]), 1) for k in keys} | {"requests": len(rows)}


def outside_every_call(spans: list[dict]) -> dict[float, float]:
    """Per traced Generate (by its start): the orchestrator's own time outside every stage call, in ms. Calls
    that overlap (the prompt check beside the encoder) count once, unlike `orchestrator_own_ms`, which
    subtracts each call's whole time and goes negative by the overlap."""
    by_trace: dict[str, list[dict]] = {}
    for span in spans:
        by_trace.setdefault(span["trace"], []).append(span)
    out = {}
    for trace in by_trace.values():
        roots = [s for s in trace if s["process"] == "orchestrator" and s["name"].endswith("/Generate")]
        if not roots:
            continue
        root = roots[0]
        calls = sorted(
            (s["start"], s["end"]) for s in trace if s["process"] == "orchestrator" and s is not root
        )
        covered, end = 0.0, root["start"]
        for begin, finish in calls:  # the union of the call intervals
            covered += max(0.0, finish - max(begin, end))
            end = max(end, finish)
        out[root["start"]] = 1000 * (root["end"] - root["start"] - covered)
    return out


if __name__ == "__main__":
    main()
