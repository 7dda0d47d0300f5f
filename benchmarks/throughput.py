"""Throughput sweep: C concurrent clients (1, 2, 4, 8, 16) against the stack, each sending requests back to
back for a fixed time; images/s, p50 and p99 latency, and per stage the split between queue time (accepted by
the stage -> its first denoising step) and compute time (first step -> stage finished), from GenerateStream's
events; stages without denoising steps (safety, encoder) report their total time. The baselines, in the same
run: the in-process pipeline called sequentially (one image per call), and at each batch size of
`--baseline-batches` (n images per call) with its best; every sweep point gives the stack's images/s divided
by both (target: >= 1.2x the best batch at 16 clients on the toy model). The stack's images/s are counted in
a steady window (every client busy: after --warmup-seconds, before the clients stop), as the baselines'
back-to-back calls are; the whole run's rate, drain included, is reported beside it. The machine's speed can
drift over minutes: the best batch is measured again after the stack (A-B-A) and the last line gives every
point against the mean of the two. With `--rounds R` each point is measured R times, each time followed by the
best batch again while the stack stays up and idle (A-B-A-B-...): every round against the baselines on either
side of it, and the median and minimum over the rounds: the estimate to trust on a drifting machine.

    python -m benchmarks.throughput [--model DIR | --tiny-width 4] [--clients 1,2,4,8,16] [--seconds 20]
        [--steps 25,25,7] [--baseline-batches 1,2,4,8] [--replicas decoder=2] [--rounds 3]

Which model: `--model DIR` (e.g. models/shapes-toy, compute-bound), else a generated tiny random model —
by default diffusers' test sizes (compute-bound on one CPU thread: decoder ~1.4 s per image), with
`--tiny-width 4` (unclip.tiny.OVERHEAD_BOUND_WIDTH) the overhead-bound variant the issue's tiny-model
target is about (~2.4 images/s in process sequentially, step time nearly flat in the batch size).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc

from benchmarks.common import (
    add_dtype_argument,
    emit,
    environment,
    generate_request,
    median,
    model_dir,
    own_session,
    percentile,
    reference_pipeline,
    run_reference,
    start_stack,
    stub,
)
from unclip.models import DTYPES, parse_dtype
from unclip.runtime.errors import retry_after
from unclip.stack_process import compute_env

PROMPT = "a red circle above a blue square"


def process_cpu(stack) -> dict[str, float]:
    """CPU seconds (user + system) each process of the stack has used so far, by process name."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for process in stack.processes:
        try:
            fields = Path(f"/proc/{process.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[process.name] = (int(fields[11]) + int(fields[12])) / ticks
    return used


def one_streamed(client, request) -> tuple[float, dict[str, list[float]], dict[str, float]]:
    """(latency, {stage: [queue_s, compute_s]}, {stage without steps: total_s}) of one streamed request."""
    began = time.perf_counter()
    accepted_at: dict[str, float] = {}
    first_step: dict[str, float] = {}
    split: dict[str, list[float]] = {}
    totals: dict[str, float] = {}
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
            elif stage in accepted_at:
                totals[stage] = now - accepted_at[stage]
    return time.perf_counter() - began, split, totals


def sweep_point(client, clients: int, seconds: float, steps, warmup: float = 0.0) -> dict:
    """`clients` closed-loop clients for `seconds`. images_per_s counts the images finished inside the
    steady window [warmup, seconds) over its length: every client is busy there (the first `warmup`
    seconds fill the stages' queues; the requests in flight at the end drain with fewer and fewer clients).
    all_images_per_s is every image over the whole time, drain included."""
    latencies: list[float] = []
    finished: list[float] = []  # time.perf_counter() of each image's end
    splits: dict[str, list[list[float]]] = defaultdict(list)
    stage_totals: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    refused = [0]

    def worker(index: int) -> None:
        seed = 1000 * index
        while time.perf_counter() < stop_at:
            request = generate_request(PROMPT, 1, seed, steps)
            request.user = f"client{index}"  # one caller each: the per-caller limit must not throttle them
            try:
                latency, split, totals = one_streamed(client, request)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                with lock:
                    refused[0] += 1
                time.sleep(retry_after(error) or 0.5)
                continue
            seed += 1
            with lock:
                finished.append(time.perf_counter())
                latencies.append(latency)
                for stage, pair in split.items():
                    splits[stage].append(pair)
                for stage, total in totals.items():
                    stage_totals[stage].append(total)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    window = (began + warmup, stop_at)
    in_window = sum(1 for t in finished if window[0] <= t < window[1])
    return {
        "clients": clients,
        "images_per_s": round(in_window / (window[1] - window[0]), 3),
        "window_s": [round(warmup, 1), round(seconds, 1)],
        "all_images_per_s": round(len(latencies) / elapsed, 3),
        "p50_s": round(percentile(latencies, 50), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "requests": len(latencies),
        "refused": refused[0],
        "queue_compute_s": {
            stage: [round(median([p[0] for p in pairs]), 4), round(median([p[1] for p in pairs]), 4)]
            for stage, pairs in splits.items()
        },
        "stage_total_s": {stage: round(median(values), 4) for stage, values in stage_totals.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: a generated tiny model)")
    parser.add_argument(
        "--tiny-width",
        type=int,
        default=None,
        help="first-block width of the generated tiny model's UNets (4: the overhead-bound variant; "
        "default: the tests' tiny model, width 32)",
    )
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="seconds at the start of each point not counted in images_per_s (default: a quarter of "
        "--seconds): the stages' queues fill first",
    )
    parser.add_argument("--steps", default="25,25,7")
    parser.add_argument("--replicas", default="", help="as unclip up --replicas")
    parser.add_argument("--baseline-batches", default="1,2,4,8", help="images per in-process call")
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=None,
        help="time per in-process batch size (default: --seconds). On the toy model 16 clients need "
        "--seconds 150 or more to reach a steady state (one request takes ~60 s there), the baseline not",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the stack's decoder/upsamplers with channels-last UNets or not (as unclip up "
        "--[no-]channels-last; default: the environment's, else on); the in-process baseline stays "
        "diffusers' plain pipeline",
    )
    parser.add_argument("--max-batch-size", type=int, default=None, help="the stages' UNCLIP_MAX_BATCH_SIZE")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each point this many times, the best batch again after each round (stack up, idle)",
    )
    parser.add_argument(
        "--device", default="cpu", help="both sides' torch device (the stages' UNCLIP_DEVICE)"
    )
    add_dtype_argument(parser)
    parser.add_argument(
        "--baseline-dtype",
        default="float32",
        choices=DTYPES,
        help="the in-process pipeline's (diffusers' default: float32, on the CPU the only one it runs in)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.device == "cpu" and args.baseline_dtype != "float32":
        parser.error("--baseline-dtype: on the CPU UnCLIPPipeline runs in float32 only (its antialiased "
                     "bicubic resize has no bfloat16 / float16 CPU kernel in torch 2.13)")  # fmt: skip
    os.environ["UNCLIP_DEVICE"], os.environ["UNCLIP_DTYPE"] = args.device, args.dtype  # the stages
    os.environ.update(compute_env(channels_last=args.channels_last))  # the stages only (None: as it is)
    if args.max_batch_size is not None:
        os.environ["UNCLIP_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    own_session()  # the in-process side competes for the CPU on the stack's terms (benchmarks.common)
    steps = tuple(int(s) for s in args.steps.split(","))
    model = model_dir(args.model, args.tiny_width)
    emit(
        {
            "benchmark": "throughput",
            **environment(),
            "model": str(model),
            "tiny_width": None if args.model else (args.tiny_width or 32),
            "steps": steps,
            "device": args.device,
            "dtype": str(parse_dtype(args.dtype, args.device)).removeprefix("torch."),
            "baseline_dtype": args.baseline_dtype,
        }
    )

    # Baselines: the in-process pipeline, one call after another for the same time, n images per call.
    pipe = reference_pipeline(model, args.device, args.baseline_dtype)
    run_reference(pipe, PROMPT, 1, 0, steps)
    baseline_seconds = args.baseline_seconds or args.seconds
    baseline: dict[int, float] = {}
    for n in sorted({1, *(int(b) for b in args.baseline_batches.split(","))}):
        baseline[n] = in_process_rate(pipe, n, baseline_seconds, steps)
    sequential = baseline[1]
    best_batch = max(baseline, key=baseline.get)
    emit({"in_process_sequential_images_per_s": sequential, "in_process_best_batch": best_batch,
          "in_process_best_images_per_s": baseline[best_batch]})  # fmt: skip
    rates: dict[int, float] = {}

    from unclip.stack import parse_replicas

    # One key sends every client's requests: the per-caller cap is the service's in-flight limit.
    stack = start_stack(
        model, replicas=parse_replicas(args.replicas), extra_env={"UNCLIP_MAX_INFLIGHT_PER_CALLER": "16"}
    )
    try:
        client = stub(stack.address, stack.api_key)
        one_streamed(client, generate_request(PROMPT, 1, 0, steps))  # warm
        warmup = args.seconds / 4 if args.warmup_seconds is None else args.warmup_seconds
        last_baseline = baseline[best_batch]
        for clients in (int(c) for c in args.clients.split(",")):
            round_ratios = []
            for round_ in range(args.rounds):
                point = measure_point(stack, client, clients, args.seconds, steps, warmup)
                point["vs_in_process_sequential"] = round(point["images_per_s"] / sequential, 3)
                point["vs_in_process_best_batch"] = round(point["images_per_s"] / baseline[best_batch], 3)
                rates[clients] = point["images_per_s"]
                if args.rounds > 1:  # the best batch again, the stack idle: this round between two baselines
                    run_reference(pipe, PROMPT, best_batch, 0, steps)  # warm again (not counted)
                    now = in_process_rate(pipe, best_batch, baseline_seconds, steps)
                    point["round"] = round_ + 1
                    point["vs_best_batch_either_side"] = round(
                        point["images_per_s"] / ((last_baseline + now) / 2), 3
                    )
                    round_ratios.append(point["vs_best_batch_either_side"])
                    last_baseline = now
                emit(point)
            if round_ratios:
                emit({"clients": clients, "rounds_vs_best_batch_either_side": round_ratios,
                      "median": median(round_ratios), "min": min(round_ratios)})  # fmt: skip
    finally:
        stack.stop()
    # The machine's speed drifts over minutes: the best batch again after the stack (A-B-A), and every point
    # against the mean of the two.
    after = in_process_rate(pipe, best_batch, baseline_seconds, steps)
    mean = (baseline[best_batch] + after) / 2
    ratios = {clients: round(rate / mean, 3) for clients, rate in rates.items()}
    emit({"in_process_best_batch_before_after": [baseline[best_batch], after],
          "vs_in_process_best_batch_mean": ratios})  # fmt: skip


def measure_point(stack, client, clients: int, seconds: float, steps, warmup: float) -> dict:
    """One sweep point with the CPU each process of the stack spent per image (ms): under load steadier than
    images/s; "clients" is this script's gRPC clients (not part of the stack's cost)."""
    before, mine = process_cpu(stack), time.process_time()
    point = sweep_point(client, clients, seconds, steps, warmup)
    after, mine = process_cpu(stack), time.process_time() - mine
    done = max(1, point["requests"])
    per = {name: round(1000 * (after[name] - before.get(name, 0.0)) / done, 1) for name in after}
    point["cpu_ms_per_image"] = {**per, "stack": round(sum(per.values()), 1),
                                 "clients": round(1000 * mine / done, 1)}  # fmt: skip
    return point


def in_process_rate(pipe, n: int, seconds: float, steps) -> float:
    """Images/s of the in-process pipeline called back to back with n images per call for `seconds`."""
    count, began, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - began < seconds or count == 0:
        run_reference(pipe, PROMPT, n, count * n, steps)
        count += 1
    rate = round(count * n / (time.perf_counter() - began), 3)
    cpu_ms = round(1000 * (time.process_time() - cpu) / (count * n), 1)
    emit({"in_process_batch": n, "images_per_s": rate, "cpu_ms_per_image": cpu_ms})
    return rate


if __name__ == "__main__":
    main()
