"""Several replicas of one stage, with failover.

A stage's target is a list of addresses (`host:port|host:port` or `host:port,host:port`; each gets its own
channel) or one `dns:///name:port` (gRPC's round_robin policy spreads calls over every
address the name resolves to; `dns://<dns server>:53/name:port` names the DNS server to ask). With one `dns:`
target a retry goes through the same channel, whose round_robin skips a replica whose connection dropped
(tests/reliability/test_dns_failover.py and test_replicas.py check it with real resolution).

A call that fails with UNAVAILABLE (the replica is gone, draining after SIGTERM, or died mid-call) or
RESOURCE_EXHAUSTED (its queue is full) is retried on another replica while the deadline allows, and so is
CANCELLED when this side did not cancel: a server shutting down cancels the calls it has received but not
yet handed to a handler (grpc/grpc#41785), so a replica draining after SIGTERM can answer CANCELLED. Calls
to a stage are idempotent, since the request carries every image's generator state, so a retry draws
exactly the same noise. A replica that failed is tried last for a few seconds.

Over a list of addresses each call goes to the replica with the fewest calls outstanding from this
orchestrator (Envoy's LEAST_REQUEST), ties broken round-robin: replicas of unequal speed (another node, a
busier core, a replica still warming up) get work in proportion to how fast they return it, where plain
round-robin gives each the same share and the slow one's queue grows. Idle, sequential calls alternate
exactly as round-robin does.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from unclip.runtime.server import stage_health_status

# Codes after which another replica may succeed.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def retryable(code: grpc.StatusCode, cancelled_here: bool = False) -> bool:
    """Whether another replica may succeed after `code`. CANCELLED counts unless this side cancelled: a
    stage never cancels a call it has accepted, but a draining server cancels the ones it had not yet
    handed to a handler."""
    return code in RETRYABLE or (code == grpc.StatusCode.CANCELLED and not cancelled_here)


# Seconds a failed replica goes to the back of the line.
PENALTY_SECONDS = 3.0
# Attempts through one dns:/// channel (gRPC picks the replica): enough to get past one dead address.
DNS_ATTEMPTS = 3


def parse_targets(value: str) -> list[str]:
    """`a:1|a:2` or `a:1,a:2` -> ["a:1", "a:2"]; a `dns:///` target stays one entry."""
    return [t.strip() for t in value.replace("|", ",").split(",") if t.strip()]


class ReplicatedMethod:
    """One RPC method of a stage, callable on any of its replicas (a stub-method look-alike)."""

    def __init__(self, stage: Replicas, name: str):
        self.stage = stage
        self.name = name

    def attempts(self) -> list[tuple[str, Any]]:
        """(target, multi-callable) pairs in the order to try them. Streaming methods use the plain channel:
        the tracing interceptor hides a stream's cancel() (the caller propagates the trace itself)."""
        plain = self.name.endswith("Stream")
        return [
            (target, getattr(plain_stub if plain else stub, self.name))
            for target, stub, plain_stub in self.stage.order()
        ]

    def __call__(self, request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
        """A blocking call with failover (used outside requests, e.g. GetStageInfo at start)."""
        error: grpc.RpcError | None = None
        for target, method in self.attempts():
            try:
                with self.stage.outstanding(target):
                    return method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as failed:
                if not retryable(failed.code()):
                    raise
                self.stage.failed(target)
                error = failed
        assert error is not None
        raise error


class Replicas:
    """Stubs of one stage on each of its replicas; `replicas.Decode` is a ReplicatedMethod."""

    def __init__(
        self,
        stage: str,
        targets: list[str],
        stub_class: type,
        channel: Callable[[str], Any],
        plain_channel: Callable[[str], Any] | None = None,
    ):
        if not targets:
            raise ValueError(f"{stage} needs at least one address")
        self.stage = stage
        self.targets = targets
        plain_channel = plain_channel or channel
        # (target, stub on the instrumented channel, stub on a plain channel)
        self.stubs = [
            (target, stub_class(channel(target)), stub_class(plain_channel(target))) for target in targets
        ]
        self._next = itertools.count()
        self._down: dict[str, float] = {}  # target -> until when it is tried last
        self._outstanding = dict.fromkeys(targets, 0)  # target -> calls from this process not yet answered
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> ReplicatedMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return ReplicatedMethod(self, name)

    def order(self) -> list[tuple[str, Any, Any]]:
        """Replicas in the order to try them: those that failed recently last, then fewest outstanding
        calls first; equals keep the round-robin order from the next replica."""
        with self._lock:
            start = next(self._next) % len(self.stubs)
            now = time.monotonic()
            down = {t for t, until in self._down.items() if until > now}
            load = dict(self._outstanding)
        rotated = self.stubs[start:] + self.stubs[:start]
        ordered = sorted(rotated, key=lambda s: (s[0] in down, load[s[0]]))  # stable: ties stay rotated
        if len(ordered) == 1 and ordered[0][0].startswith("dns:"):
            return ordered * DNS_ATTEMPTS
        return ordered

    def serving(self, timeout: float = 2.0) -> bool:
        """Whether at least one replica's health says SERVING (a dns:/// target: the one gRPC picks)."""
        return any(stage_health_status(target, timeout=timeout) == "SERVING" for target in self.targets)

    @contextmanager
    def outstanding(self, target: str) -> Iterator[None]:
        """Counts a call to `target` as outstanding while the block runs (the order() of other calls)."""
        with self._lock:
            self._outstanding[target] += 1
        try:
            yield
        finally:
            with self._lock:
                self._outstanding[target] -= 1

    def failed(self, target: str) -> None:
        with self._lock:
            self._down[target] = time.monotonic() + PENALTY_SECONDS
