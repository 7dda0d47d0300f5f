"""Quotas per key and per tenant, and the ceiling on the compute one request may ask for.

- images per minute: a token bucket per key (`images_per_minute` in the keys file) and per tenant
  (`tenants:`), refilled continuously, holding at most one minute's worth; a request takes `n` tokens when
  it is admitted (asking for more than a whole minute's worth can never pass: INVALID_ARGUMENT naming `n`).
- concurrent requests: per key (`max_concurrent`) and per tenant.
- compute ceiling: `compute_units` (decoder-step equivalents, size-weighted) over `max_request_compute` is
  INVALID_ARGUMENT naming the fields to lower.

A refusal is RESOURCE_EXHAUSTED with a google.rpc.RetryInfo, `retry-after-ms` and `unclip-limit: <name>`
trailing metadata (unclip.runtime.errors.resource_exhausted); the names are `images_per_minute`,
`max_concurrent`, `tenant_images_per_minute`, `tenant_max_concurrent` (plain backpressure says `capacity`, the
per-caller in-flight cap `max_inflight_per_caller`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from unclip.access.keys import Identity, Limits
from unclip.runtime.errors import resource_exhausted


@dataclass
class TokenBucket:
    per_minute: int  # refill rate; also the capacity (one minute's worth)
    tokens: float = -1.0  # current level (-1: full, set on first use)
    updated: float = field(default_factory=time.monotonic)

    def _refill(self, now: float) -> None:
        if self.tokens < 0:
            self.tokens = float(self.per_minute)
        elapsed = max(0.0, now - self.updated)  # a bucket made after `now` was taken has not aged
        self.tokens = min(float(self.per_minute), self.tokens + elapsed * self.per_minute / 60)
        self.updated = max(now, self.updated)

    def wait_for(self, amount: int, now: float) -> float:
        """Seconds until `amount` tokens are there (0: now)."""
        self._refill(now)
        missing = amount - self.tokens
        return 0.0 if missing <= 0 else missing * 60 / self.per_minute

    def take(self, amount: int) -> None:
        self.tokens -= amount


class Quotas:
    """The quota state of one orchestrator (in memory: per replica; see docs/operations.md)."""

    def __init__(self, tenant_limits: Callable[[str], Limits]):
        self.tenant_limits = tenant_limits  # the keys file's `tenants:` entry of a tenant
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}  # ("key"|"tenant", name) -> bucket
        self._running: dict[tuple[str, str], int] = {}

    def _bucket(self, scope: str, name: str, per_minute: int) -> TokenBucket:
        bucket = self._buckets.get((scope, name))
        if bucket is None or bucket.per_minute != per_minute:  # a changed limit starts a full bucket
            bucket = self._buckets[(scope, name)] = TokenBucket(per_minute)
        return bucket

    @contextlib.contextmanager
    def admit(self, identity: Identity, images: int) -> Iterator[None]:
        """Takes `images` tokens and one concurrency slot of the key and its tenant, or raises."""
        if identity.kind == "anonymous":
            yield
            return
        tenant = self.tenant_limits(identity.tenant)
        checks = [
            ("key", identity.principal, identity.limits, ""),
            ("tenant", identity.tenant, tenant, "tenant_"),
        ]
        with self._lock:
            now = time.monotonic()
            for scope, name, limits, prefix in checks:
                if limits.max_concurrent and self._running.get((scope, name), 0) >= limits.max_concurrent:
                    raise resource_exhausted(
                        f"{scope} {name!r} has {limits.max_concurrent} requests in progress, its limit "
                        f"({prefix}max_concurrent)",
                        1.0,
                        limit=f"{prefix}max_concurrent",
                    )
            buckets = []
            for scope, name, limits, prefix in checks:
                if not limits.images_per_minute:
                    continue
                if images > limits.images_per_minute:
                    raise ValueError(
                        f"n: {images} images exceed {scope} {name!r}'s whole {prefix}images_per_minute "
                        f"({limits.images_per_minute}); ask for fewer"
                    )
                bucket = self._bucket(scope, name, limits.images_per_minute)
                wait = bucket.wait_for(images, now)
                if wait > 0:
                    raise resource_exhausted(
                        f"{scope} {name!r} is over its {prefix}images_per_minute "
                        f"({limits.images_per_minute}); retry in {wait:.1f} s",
                        wait,
                        limit=f"{prefix}images_per_minute",
                    )
                buckets.append(bucket)
            for bucket in buckets:
                bucket.take(images)
            for scope, name, _, _ in checks:
                self._running[(scope, name)] = self._running.get((scope, name), 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for scope, name, _, _ in checks:
                    left = self._running[(scope, name)] - 1
                    if left:
                        self._running[(scope, name)] = left
                    else:
                        del self._running[(scope, name)]


# ---- the per-request compute ceiling --------------------------------------------------------------------

COMPUTE_FIELDS = (
    "n, params.prior_num_inference_steps, params.prior_num_candidates, params.decoder_num_inference_steps, "
    "params.super_res_num_inference_steps"
)


def compute_units(
    n: int,
    prior_steps: int,
    candidates: int,
    decoder_steps: int,
    super_res_steps: list[int],
    sizes: list[int],
) -> float:
    """What a request asks of the stages, in decoder-step equivalents: n × (prior steps × candidates +
    decoder steps + Σ upsampler steps × (its output size / the decoder's)²). `sizes`: each cascade stage's
    output side, decoder first. A default request on a 64 -> 256 cascade is ~25 + 25 + 7 × 16 = 162."""
    per_image = prior_steps * candidates + decoder_steps
    for steps, size in zip(super_res_steps, sizes[1:], strict=False):
        per_image += steps * (size / sizes[0]) ** 2
    return n * per_image


def check_compute(units: float, ceiling: float) -> None:
    if ceiling and units > ceiling:
        raise ValueError(
            f"{COMPUTE_FIELDS}: the request asks for {units:,.0f} compute units (decoder-step equivalents), "
            f"over this service's ceiling of {ceiling:,.0f}; lower them"
        )
