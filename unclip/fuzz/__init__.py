"""A structure-aware fuzzer for a running stack, written from the contracts (the protos).

Every method of every service a process serves (found in the descriptors, so a new RPC is fuzzed the day it
is added) gets requests made from a valid seed: the seeds are captured from the real chain at warm-up
(encoder -> prior -> decoder -> upsamplers, safety), then mutated:

- fields: every kind of protobuf field set out of range (integer extremes, NaN/Inf, unknown enum values,
  strings over their limit or full of control characters, repeated fields emptied or multiplied, messages
  cleared), tensors with overflowing or mismatched shapes, generator states of the wrong size;
- hostile images in upload fields: a decompression bomb, CMYK/LAB/float modes, truncated, non-square,
  random bytes;
- the wire: truncated, bit-flipped, a known field sent with the wrong wire type, random bytes;
- calls: deadlines of a few milliseconds, cancellation mid-call and mid-stream.

The invariant (`ALLOWED`): every answer is OK or a documented code, never INTERNAL or UNKNOWN; no process
dies; each process's RSS after the run is at most `rss_factor` x its RSS after warm-up. `channel_for(name)`
is the one way the fuzzer reaches a process ("orchestrator", "encoder", "super_res", ...): tests pass the
shared stack's `stack.channel`, so credentials attach there.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from unclip.fuzz.contracts import ALLOWED, SERVICES, Method, Report, alive, discover, rss_mb
from unclip.fuzz.mutations import Mutator, hostile_images, png_bomb
from unclip.fuzz.seeds import capture_seeds

__all__ = ["ALLOWED", "Fuzzer", "Mutator", "Report", "hostile_images", "png_bomb", "rss_mb"]


class Fuzzer:
    """Sends mutated requests to every method from `concurrency` threads; see the module docstring."""

    def __init__(
        self,
        channel_for: Callable[[str], grpc.Channel],
        pids: dict[str, int],
        *,
        seed: int = 0,
        concurrency: int = 3,
        timeout_s: float = 20.0,
    ):
        self.channel_for = channel_for
        self.pids = pids  # process name -> pid, for liveness and RSS
        self.methods = discover([name for name in pids if name.split("#")[0] in SERVICES])
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.timeout_s = timeout_s  # deadline of every call that is not a short-deadline case
        self.report = Report()
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def _channel(self, process: str) -> grpc.Channel:
        with self._lock:
            if process not in self._channels:
                self._channels[process] = self.channel_for(process)
            return self._channels[process]

    def warm_up(self) -> None:
        """Captures seeds and sends each seed once; then records every process's RSS."""
        started = time.monotonic()
        capture_seeds(self.methods, self._channel)
        captured = {"/unclip.v1.Encoder/EncodeText", "/unclip.v1.Prior/Sample", "/unclip.v1.Decoder/Decode"}
        for method in list(self.methods):
            if method.path in captured or method.path.endswith("Stream") or "Upsample" in method.path:
                continue  # capture_seeds called it (or its unary twin) already
            for seed in method.seeds[:1] or [method.request_type()]:
                self._call(method, seed.SerializeToString(), "warm-up", self.timeout_s, cancel_after=None)
            if self.report.codes[(method.path, "UNIMPLEMENTED")]:  # in the proto, not served (Health.List)
                self.methods.remove(method)
                self.report.not_served.add(method.path)
        failed = [line for line in self.report.failures if "-> UNIMPLEMENTED" not in line]
        if failed:
            raise AssertionError("seed requests failed:\n" + "\n".join(failed))
        self.report.rss_warm_mb = {name: rss_mb(pid) for name, pid in self.pids.items()}
        self.report.codes.clear()
        self.report.requests = self.report.failure_count = 0
        self.report.failures.clear()
        self.report.warm_up_seconds = time.monotonic() - started

    def run(self, *, requests: int | None = None, seconds: float | None = None) -> Report:
        """Sends until `requests` are done or `seconds` have passed, whichever first."""
        started = time.monotonic()
        stop = threading.Event()
        budget = [requests if requests is not None else math.inf]
        peaks = {name: self.report.rss_peak_mb.get(name, 0.0) for name in self.pids}  # over every run

        def worker(index: int) -> None:
            rng = random.Random(self.rng.random() + index)
            mutator = Mutator(rng)
            while not stop.is_set():
                with self._lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                if seconds is not None and time.monotonic() - started > seconds:
                    return
                self._one(rng, mutator)

        def sample() -> None:
            while not stop.wait(0.25):
                for name, pid in self.pids.items():
                    peaks[name] = max(peaks[name], rss_mb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(self.concurrency) as pool:
            for future in [pool.submit(worker, i) for i in range(self.concurrency)]:
                future.result()
        stop.set()
        sampler.join()
        self.report.seconds = time.monotonic() - started
        self.report.rss_peak_mb = peaks
        self.report.deaths = [name for name, pid in self.pids.items() if not alive(pid)]
        return self.report

    def settle(self, rss_factor: float, wait_s: float = 15.0) -> None:
        """Records RSS after the run, waiting up to `wait_s` for the processes' periodic trim to bring each
        within `rss_factor` x warm-up."""
        deadline = time.monotonic() + wait_s
        while True:
            after = {name: rss_mb(pid) for name, pid in self.pids.items()}
            within = all(after[n] <= rss_factor * self.report.rss_warm_mb[n] for n in after)
            if within or time.monotonic() > deadline:
                self.report.rss_after_mb = after
                return
            time.sleep(0.5)

    def rebase(self) -> dict[str, float]:
        """Makes each process's RSS after the last `settle` the reference that later ratios and `settle` use
        (the working set a process keeps once it has served hostile input); returns the one it replaces."""
        replaced, self.report.rss_warm_mb = self.report.rss_warm_mb, dict(self.report.rss_after_mb)
        return replaced

    def _one(self, rng: random.Random, mutator: Mutator) -> None:
        # The product's methods three times as often as each process's health and reflection methods.
        method = rng.choices(self.methods, [1 if m.path.startswith("/grpc.") else 3 for m in self.methods])[0]
        roll = rng.random()
        if roll < 0.07 and method.seeds:  # a valid request with a deadline of a few milliseconds
            timeout = rng.choice([0.001, 0.005, 0.02, 0.1])
            self._call(
                method, rng.choice(method.seeds).SerializeToString(), f"deadline {timeout}s", timeout, None
            )
        elif roll < 0.14 and method.seeds:  # a valid request cancelled mid-call / mid-stream
            self._call(
                method,
                rng.choice(method.seeds).SerializeToString(),
                "cancelled",
                self.timeout_s,
                cancel_after=rng.choice([0, 1, 2]),
            )
        else:
            data, what = mutator.request(method)
            self._call(method, data, what, self.timeout_s, cancel_after=None)

    def _call(self, method: Method, data: bytes, what: str, timeout: float, cancel_after: int | None) -> None:
        channel = self._channel(method.process)
        code, details = grpc.StatusCode.OK, ""
        try:
            if method.client_streaming and method.server_streaming:
                call = channel.stream_stream(method.path)(iter([data]), timeout=timeout)
                code, details = _drain(call, cancel_after if cancel_after is not None else 1)
            elif method.server_streaming:
                call = channel.unary_stream(method.path)(data, timeout=timeout)
                limit = cancel_after if cancel_after is not None else (1 if "Watch" in method.path else None)
                code, details = _drain(call, limit)
            elif cancel_after is not None:
                future = channel.unary_unary(method.path).future(data, timeout=timeout)
                time.sleep(0.01 * cancel_after)
                future.cancel()
                try:
                    future.result()
                except grpc.FutureCancelledError:
                    code = grpc.StatusCode.CANCELLED
            else:
                channel.unary_unary(method.path)(data, timeout=timeout)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        self._record(method, what, code, details)

    def _record(self, method: Method, what: str, code: grpc.StatusCode, details: str) -> None:
        with self._lock:
            self.report.requests += 1
            self.report.codes[(method.path, code.name)] += 1
            if code not in ALLOWED:
                self.report.failure_count += 1
                if len(self.report.failures) < 50:
                    self.report.failures.append(
                        f"{method.process} {method.path} [{what}] -> {code.name}: {details[:300]}"
                    )


def _drain(call, limit: int | None) -> tuple[grpc.StatusCode, str]:
    """Reads a stream's events, cancelling after `limit` of them (None: to the end)."""
    received = 0
    try:
        if limit == 0:
            call.cancel()
            return grpc.StatusCode.CANCELLED, ""
        for _ in call:
            received += 1
            if limit is not None and received >= limit:
                call.cancel()
                return grpc.StatusCode.CANCELLED, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""
