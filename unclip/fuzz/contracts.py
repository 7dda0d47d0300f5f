"""What the fuzzer fuzzes: the services of each process, their methods (from the descriptors), the codes an
answer may end with, and the /proc reads it checks processes with."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.NOT_FOUND,
    }
)
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
# The services each process of a stack serves (replicas share their stage's name before "#").
# Every stage also serves BatchHold (the orchestrator's stack-wide pause of batch rows).
HOLD = "unclip.v1.BatchHold"
SERVICES = {
    "orchestrator": ["unclip.v1.ImageService"],
    "encoder": ["unclip.v1.Encoder", HOLD],
    "prior": ["unclip.v1.Prior", HOLD],
    "decoder": ["unclip.v1.Decoder", HOLD],
    "super_res": ["unclip.v1.Upsampler", HOLD],
    "super_res_2": ["unclip.v1.Upsampler", HOLD],
    "safety": ["unclip.v1.Safety", HOLD],
}
MB = 1024 * 1024


@dataclass
class Method:
    process: str  # which process serves it ("super_res", ...)
    path: str  # "/unclip.v1.Prior/Sample"
    request_type: type[Message]
    server_streaming: bool
    client_streaming: bool
    seeds: list[Message] = field(default_factory=list)  # valid requests captured at warm-up


@dataclass
class Report:
    requests: int = 0
    codes: Counter = field(default_factory=Counter)  # (path, code name) -> count
    failures: list[str] = field(default_factory=list)  # one line per disallowed answer (first 50 kept)
    failure_count: int = 0
    deaths: list[str] = field(default_factory=list)
    rss_warm_mb: dict[str, float] = field(default_factory=dict)
    rss_after_mb: dict[str, float] = field(default_factory=dict)
    rss_peak_mb: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    warm_up_seconds: float = 0.0
    not_served: set[str] = field(default_factory=set)  # methods in the protos that the server leaves out

    def rss_ratio(self) -> dict[str, float]:
        return {
            p: self.rss_after_mb[p] / self.rss_warm_mb[p] for p in self.rss_after_mb if self.rss_warm_mb[p]
        }

    def summary(self) -> dict:
        by_code = Counter()
        for (_, code), count in self.codes.items():
            by_code[code] += count
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "warm_up_seconds": round(self.warm_up_seconds, 1),
            "not_served": sorted(self.not_served),
            "codes": dict(by_code),
            "failures": self.failure_count,
            "failure_examples": self.failures[:10],
            "deaths": self.deaths,
            "rss_warm_mb": {k: round(v) for k, v in self.rss_warm_mb.items()},
            "rss_peak_mb": {k: round(v) for k, v in self.rss_peak_mb.items()},
            "rss_after_mb": {k: round(v) for k, v in self.rss_after_mb.items()},
            "rss_ratio": {k: round(v, 3) for k, v in self.rss_ratio().items()},
        }


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return 0.0
    return 0.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] not in "ZX"  # a zombie has exited
    except FileNotFoundError:
        return False


def discover(processes: list[str]) -> list[Method]:
    """Every method of every service of these processes (and their health and reflection services)."""
    from google.protobuf import descriptor_pool
    from google.protobuf.message_factory import GetMessageClass
    from grpc_health.v1 import health_pb2  # noqa: F401 (registers the descriptors)
    from grpc_reflection.v1alpha import reflection_pb2  # noqa: F401

    import unclip.v1.decoder_pb2  # noqa: F401
    import unclip.v1.encoder_pb2  # noqa: F401
    import unclip.v1.hold_pb2  # noqa: F401
    import unclip.v1.orchestrator_pb2  # noqa: F401
    import unclip.v1.prior_pb2  # noqa: F401
    import unclip.v1.safety_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    methods = []
    for process in processes:
        for name in [*SERVICES[process.split("#")[0]], HEALTH, REFLECTION]:
            service = pool.FindServiceByName(name)
            for method in service.methods:
                methods.append(
                    Method(
                        process=process,
                        path=f"/{name}/{method.name}",
                        request_type=GetMessageClass(method.input_type),
                        server_streaming=method.server_streaming,
                        client_streaming=method.client_streaming,
                    )
                )
    return methods
