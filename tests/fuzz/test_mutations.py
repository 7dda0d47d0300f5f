"""The fuzzer's reach, without a stack: every method of every service is found from the descriptors, and the
mutator makes every kind of hostile request from a seed, reproducibly."""

from __future__ import annotations

import random
from collections import Counter

from unclip.fuzz.contracts import SERVICES, discover
from unclip.fuzz.mutations import Mutator
from unclip.v1 import decoder_pb2, encoder_pb2, orchestrator_pb2, prior_pb2, safety_pb2


def test_every_method_of_every_service_is_fuzzed():
    methods = {m.path for m in discover(list(SERVICES))}
    for module in (decoder_pb2, encoder_pb2, orchestrator_pb2, prior_pb2, safety_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                assert f"/{service.full_name}/{method.name}" in methods
    assert "/grpc.health.v1.Health/Check" in methods
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in methods


def test_mutations_are_varied_and_reproducible():
    method = next(m for m in discover(["orchestrator"]) if m.path.endswith("/Edit"))
    method.seeds = [orchestrator_pb2.EditRequest(image=b"\x89PNG", prompt="a star", n=1, size=32)]
    first = [Mutator(random.Random(5)).request(method) for _ in range(1)]
    again = [Mutator(random.Random(5)).request(method) for _ in range(1)]
    assert [what for _, what in first] == [what for _, what in again]
    mutator = Mutator(random.Random(7))
    kinds = Counter(mutator.request(method)[1].split(" ")[0].rstrip(":") for _ in range(400))
    assert {"fields", "truncated", "bit", "field", "random"} <= set(kinds), kinds
