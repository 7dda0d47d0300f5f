"""The fuzzer's long run: a stack of its own on the tiny model, every method of every service, mutated
requests (unclip.fuzz), until --requests are answered. The short run of the same fuzzer is tests/fuzz/.

    python -m benchmarks.fuzz [--requests 100000] [--concurrency 3] [--seed 0] [--out runs/fuzz.json]
        [--max-minutes M]   # end early (with the summary) after M minutes

Prints a JSON line per --report-every requests (requests, codes, RSS per process in MB) and at the end the
summary: requests, codes, failures (any answer outside unclip.fuzz.ALLOWED: INTERNAL, UNKNOWN, UNAVAILABLE,
...), process deaths, and each process's RSS after warm-up, at its peak and after the run (the invariant:
after <= 1.2 x warm-up). Exit status 0 when all three hold, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.common import environment, model_dir, start_stack

RSS_FACTOR = 1.2


def channel_for(stack, name: str):
    """The one place the long run makes a channel to a process of its stack (with the stack's credentials:
    its key for the orchestrator, the orchestrator's client certificate for a stage)."""
    return stack.channel(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: a fresh tiny model)")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-seconds", type=float, default=15.0)
    parser.add_argument("--report-every", type=int, default=2000)
    parser.add_argument("--out", default=None, help="also write the summary JSON here")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop earlier, after this long")
    args = parser.parse_args()

    from unclip.fuzz import Fuzzer, rss_mb
    from unclip.tiny import make_tiny_model

    if args.model:
        model = model_dir(args.model)
    else:
        import tempfile

        model = make_tiny_model(
            Path(tempfile.mkdtemp(prefix="unclip-fuzz-")) / "model", super_res_stages=2, variation=True
        )
    stack = start_stack(model)
    try:
        pids = {p.name: p.popen.pid for p in stack.processes if p.popen is not None}
        fuzzer = Fuzzer(
            lambda name: channel_for(stack, name),
            pids,
            seed=args.seed,
            concurrency=args.concurrency,
            timeout_s=args.timeout_seconds,
        )
        fuzzer.warm_up()
        print(
            json.dumps({"environment": environment(), "rss_warm_mb": fuzzer.report.rss_warm_mb}), flush=True
        )
        started, done = time.monotonic(), 0
        while done < args.requests:
            batch = min(args.report_every, args.requests - done)
            report = fuzzer.run(requests=batch)
            done = report.requests
            line = {
                "requests": done,
                "minutes": round((time.monotonic() - started) / 60, 1),
                "failures": report.failure_count,
                "deaths": report.deaths,
                "rss_mb": {name: round(rss_mb(pid)) for name, pid in pids.items()},
            }
            print(json.dumps(line), flush=True)
            if report.deaths:
                break
            if args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes:
                break
        fuzzer.settle(RSS_FACTOR)
        report = fuzzer.report
        report.seconds = time.monotonic() - started
        summary = {"requests_asked": args.requests, **report.summary()}
        summary["ok"] = (
            report.failure_count == 0
            and not report.deaths
            and all(ratio <= RSS_FACTOR for ratio in report.rss_ratio().values())
        )
        print(json.dumps(summary), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summary, indent=1))
        return 0 if summary["ok"] else 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
