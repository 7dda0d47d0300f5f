"""Priority classes under load: a batch key saturating the stack with 16 clients, and an interactive key's
latency against its latency on the idle stack (the goal: p50 at most 1.5x idle, and the batch clients still
complete requests).

    python -m benchmarks.priority [--model DIR] [--clients 16] [--samples 8] [--steps 10,10,4] [--same-class]

`--same-class` gives the "batch" key the interactive class too: the same load without priority classes, to
see what they change. Prints one JSON line with idle and loaded p50/p90, the ratio, and the batch requests
completed and refused during the loaded phase.
"""

from __future__ import annotations

import argparse
import threading
import time

import grpc

from benchmarks.common import (
    emit,
    environment,
    generate_request,
    model_dir,
    own_session,
    percentile,
    start_stack,
    stub,
)

PROMPT = "a red circle above a blue square"


def measure(
    client, samples: int, steps: tuple[int, int, int], refusals: list[int] | None = None
) -> list[float]:
    """Latency of `samples` sequential requests; a RESOURCE_EXHAUSTED is retried after its hint (as a client
    would) and counted in `refusals`, its wait included in the latency."""
    from unclip.runtime.errors import retry_after

    seconds = []
    for i in range(samples):
        began = time.perf_counter()
        while True:
            try:
                client.Generate(generate_request(PROMPT, 1, 1000 + i, steps), timeout=600)
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                if refusals is not None:
                    refusals.append(1)
                time.sleep(retry_after(error) or 0.2)
        seconds.append(time.perf_counter() - began)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", default="10,10,4", help="prior,decoder,super-res steps")
    parser.add_argument("--same-class", action="store_true", help="the load in the interactive class too")
    args = parser.parse_args()
    own_session()
    steps = tuple(int(s) for s in args.steps.split(","))
    from unclip.access import keys

    stack = start_stack(
        model_dir(args.model), extra_env={"UNCLIP_MAX_INFLIGHT_PER_CALLER": str(args.clients)}
    )
    try:
        interactive_key = keys.create(stack.keys_file, "bench-interactive", tenant="product")
        batch_key = keys.create(
            stack.keys_file, "bench-batch", tenant="batch-jobs",
            priority="interactive" if args.same_class else "batch",
        )  # fmt: skip
        interactive = stub(stack.address, interactive_key)
        measure(interactive, 2, steps)  # warm
        idle = measure(interactive, args.samples, steps)

        stop = threading.Event()
        counts = {"ok": 0, "refused": 0, "failed": 0}
        lock = threading.Lock()

        def load(index: int) -> None:
            client = stub(stack.address, batch_key)
            seed = 10_000 * (index + 1)
            while not stop.is_set():
                seed += 1
                try:
                    client.Generate(generate_request(PROMPT, 1, seed, steps), timeout=600)
                    outcome = "ok"
                except grpc.RpcError as error:
                    outcome = "refused" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"
                    time.sleep(0.2)
                with lock:
                    counts[outcome] += 1

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(5)  # the load settles
        with lock:
            before = dict(counts)
        began = time.monotonic()
        refusals: list[int] = []
        loaded = measure(interactive, args.samples, steps, refusals)
        loaded_seconds = time.monotonic() - began
        with lock:
            during = {k: counts[k] - before[k] for k in counts}
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        stack.stop()
    record = {
        "benchmark": "priority",
        "same_class": args.same_class,
        "clients": args.clients,
        "steps": steps,
        "idle_p50_s": round(percentile(idle, 50), 3),
        "idle_p90_s": round(percentile(idle, 90), 3),
        "loaded_p50_s": round(percentile(loaded, 50), 3),
        "loaded_p90_s": round(percentile(loaded, 90), 3),
        "p50_ratio": round(percentile(loaded, 50) / percentile(idle, 50), 2),
        "batch_during_measurement": during,
        "interactive_refusals_retried": len(refusals),
        "measurement_seconds": round(loaded_seconds, 1),
        **environment(),
    }
    emit(record)


if __name__ == "__main__":
    main()
