"""Soak: steady load on the stack for a long time, sampling every service's resident memory; it should stay
flat (bounded queues, nothing kept per request). Issue 6's reliability item 5 (a benchmark, not in CI).

    python -m benchmarks.soak [--model DIR] [--minutes 30] [--clients 4] [--steps 25,25,7] [--pause-seconds 0]

Prints one JSON line per sample: minute, requests done, failures, RSS (MB) per process; and at the end, per
process, the first and last sample, the growth between the first and the last third of the run and the
slope of a least-squares line through all samples (MB per 10 minutes). `--pause-seconds` throttles the load
(each client waits that long between requests) so a soak can run beside other work on a shared machine.
"""

from __future__ import annotations

import argparse
import threading
import time

import grpc

from benchmarks.common import emit, environment, generate_request, model_dir, start_stack, stub


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", default="25,25,7")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--pause-seconds", type=float, default=0.0, help="each client's wait between calls")
    args = parser.parse_args()
    steps = tuple(int(s) for s in args.steps.split(","))
    model = model_dir(args.model)
    emit(
        {"benchmark": "soak", **environment(), "model": str(model), "clients": args.clients, "steps": steps,
         "pause_seconds": args.pause_seconds}
    )  # fmt: skip
    stack = start_stack(model)
    done, failed, lock = [0], [0], threading.Lock()
    stop_at = time.monotonic() + 60 * args.minutes
    try:
        client = stub(stack.address, stack.api_key)

        def worker(index: int) -> None:
            seed = 10_000 * index
            while time.monotonic() < stop_at:
                try:
                    client.Generate(generate_request("a red circle", 1, seed, steps), timeout=600)
                    with lock:
                        done[0] += 1
                except grpc.RpcError:
                    with lock:
                        failed[0] += 1
                seed += 1
                time.sleep(args.pause_seconds)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        samples: list[dict[str, float]] = []
        minutes: list[float] = []
        began = time.monotonic()
        while time.monotonic() < stop_at:
            time.sleep(args.sample_seconds)
            sample = {p.name: round(rss_mb(p.popen.pid), 1) for p in stack.processes if p.alive()}
            samples.append(sample)
            minutes.append((time.monotonic() - began) / 60)
            emit({"minute": round((time.monotonic() - began) / 60, 2), "done": done[0], "failed": failed[0],
                  "rss_mb": sample})  # fmt: skip
        for thread in threads:
            thread.join()
        third = max(1, len(samples) // 3)
        first, last = samples[:third], samples[-third:]
        growth = {
            name: round(sum(s[name] for s in last) / len(last) - sum(s[name] for s in first) / len(first), 1)
            for name in samples[0]
        }
        slopes = {name: 10 * slope(minutes, [s.get(name, 0.0) for s in samples]) for name in samples[0]}
        emit(
            {"rss_growth_mb_first_to_last_third": growth,
             "rss_slope_mb_per_10_min": {name: round(value, 2) for name, value in slopes.items()},
             "rss_first_last_mb": {name: (samples[0][name], samples[-1].get(name)) for name in samples[0]},
             "done": done[0], "failed": failed[0]}
        )  # fmt: skip
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
