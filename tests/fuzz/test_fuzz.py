"""The shipped fuzzer's short run against the shared stack (the long run: `python -m benchmarks.fuzz`).

Every method of every service gets mutated requests (unclip.fuzz) for FUZZ_SECONDS from three threads: every
answer must be OK or a documented code (never INTERNAL or UNKNOWN), no process may die, and each process's
RSS after the run must be within 1.2 x its RSS after warm-up.
"""

from __future__ import annotations

import json

import grpc

from unclip.fuzz import Fuzzer
from unclip.runtime.server import health_status

FUZZ_SECONDS = 30.0  # the long run: python -m benchmarks.fuzz
RSS_FACTOR = 1.2


def channel_for(stack, name: str) -> grpc.Channel:
    """The one place the fuzzer gets a channel to a process of the shared stack (credentials attach here)."""
    return stack.channel(name)


def test_short_fuzz_run(stack):
    fuzzer = Fuzzer(lambda name: channel_for(stack, name), stack.pids, seed=13, concurrency=3, timeout_s=8)
    fuzzer.warm_up()
    report = fuzzer.run(seconds=FUZZ_SECONDS)
    fuzzer.settle(RSS_FACTOR)
    summary = report.summary()
    print(json.dumps(summary))
    assert report.requests >= 100, summary
    assert report.failure_count == 0, "\n".join(report.failures)
    assert report.deaths == [], summary
    for name, ratio in report.rss_ratio().items():
        assert ratio <= RSS_FACTOR, (name, summary)
    for name in stack.addresses:
        assert health_status(stack.health_address(name)) == "SERVING", name
