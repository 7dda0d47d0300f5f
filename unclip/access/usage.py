"""Usage and energy accounting: per request, per key and per tenant.

Each answered request's usage — images returned, the stages' compute seconds (every denoising step's time is
split over the requests in it by their rows, in unclip.batching.batcher), and the estimated energy (compute
seconds × the configured watts of the stages' device) — goes three ways: the response's `usage` field,
Prometheus counters by tenant, and a durable ledger (JSON lines, one file per UTC day, each line fsynced
before the response leaves) that `unclip usage` sums by key or tenant.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import Counter

from unclip.access.keys import Identity

USAGE_IMAGES = Counter("unclip_usage_images", "Images returned, by tenant.", ["tenant"])
USAGE_COMPUTE = Counter("unclip_usage_compute_seconds", "Stage compute seconds used, by tenant.", ["tenant"])
USAGE_ENERGY = Counter("unclip_usage_energy_joules", "Estimated energy used, by tenant.", ["tenant"])


@dataclass
class UsageRecord:
    time: str  # ISO 8601 UTC
    request_id: str
    method: str  # Generate, CreateVariation, Edit
    principal: str  # "key:NAME", "cert:SUBJECT", "anonymous:anonymous"
    key: str  # the key name / certificate subject
    tenant: str
    images: int
    compute_seconds: float
    energy_joules: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


class UsageLedger:
    """Appends UsageRecords to `directory/usage-YYYY-MM-DD.jsonl` (fsync per record); thread-safe."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: UsageRecord) -> None:
        line = (json.dumps(asdict(record), sort_keys=True) + "\n").encode()
        path = self.directory / f"usage-{record.time[:10]}.jsonl"
        with self._lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)


def read_records(directory: str | os.PathLike[str]) -> Iterator[dict]:
    for path in sorted(Path(directory).glob("usage-*.jsonl")):
        with open(path) as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)


class Accounting:
    """Fills a response's usage and records it (counters, ledger)."""

    def __init__(self, ledger: UsageLedger | None, watts: float, tenant_label=lambda tenant: tenant):
        self.ledger = ledger  # None: no ledger (counters and responses only)
        self.watts = watts  # estimated power of a stage's device while it computes
        self.tenant_label = tenant_label  # bounded Prometheus label of a tenant

    def settle(self, response, stage_seconds: dict[str, float], identity: Identity, method: str,
               request_id: str) -> None:  # fmt: skip
        compute = sum(stage_seconds.values())
        usage = response.usage
        usage.images = len(response.images)
        usage.compute_seconds = compute
        usage.energy_joules = compute * self.watts
        for stage, seconds in stage_seconds.items():
            usage.stage_seconds[stage] = seconds
        label = self.tenant_label(identity.tenant)
        USAGE_IMAGES.labels(label).inc(usage.images)
        USAGE_COMPUTE.labels(label).inc(compute)
        USAGE_ENERGY.labels(label).inc(usage.energy_joules)
        if self.ledger is not None:
            self.ledger.append(
                UsageRecord(
                    time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
                    request_id=request_id,
                    method=method,
                    principal=identity.principal,
                    key=identity.name,
                    tenant=identity.tenant,
                    images=usage.images,
                    compute_seconds=round(compute, 6),
                    energy_joules=round(usage.energy_joules, 3),
                    stage_seconds={k: round(v, 6) for k, v in stage_seconds.items()},
                )
            )
