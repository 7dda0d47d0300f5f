"""The orchestrator's choice among a stage's replicas (services/orchestrator/replicas.py): fewest outstanding
calls first, ties round-robin, recently failed replicas last. Real gRPC channels and stubs (nothing is
dialled: channels connect on first use); tests/reliability/test_replicas.py checks it with real replicas."""

from __future__ import annotations

import grpc
import pytest

from services.orchestrator.replicas import Replicas
from unclip.v1 import decoder_pb2_grpc

TARGETS = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


@pytest.fixture
def replicas():
    channels: list[grpc.Channel] = []

    def channel(target: str) -> grpc.Channel:
        channels.append(grpc.insecure_channel(target))
        return channels[-1]

    yield Replicas("decoder", TARGETS, decoder_pb2_grpc.DecoderStub, channel)
    for c in channels:
        c.close()


def first(replicas: Replicas) -> str:
    return replicas.order()[0][0]


def test_idle_replicas_take_turns(replicas):
    assert [first(replicas) for _ in range(6)] == TARGETS * 2
    assert [t for t, *_ in replicas.order()] == [
        TARGETS[0],
        TARGETS[1],
        TARGETS[2],
    ]  # the rest follow in turn


def test_busy_replicas_go_after_idle_ones(replicas):
    with replicas.outstanding(TARGETS[0]), replicas.outstanding(TARGETS[0]), replicas.outstanding(TARGETS[1]):
        picks = [first(replicas) for _ in range(4)]
        assert picks == [TARGETS[2]] * 4, picks  # 2, 1, 0 outstanding: the idle one, every time
        assert [t for t, *_ in replicas.order()] == [TARGETS[2], TARGETS[1], TARGETS[0]]
    assert sorted(first(replicas) for _ in range(3)) == sorted(TARGETS)  # all answered: turns again


def test_a_call_that_raises_is_no_longer_outstanding(replicas):
    with pytest.raises(RuntimeError), replicas.outstanding(TARGETS[1]):
        raise RuntimeError("the call failed")
    with replicas.outstanding(TARGETS[0]):
        assert {first(replicas) for _ in range(4)} == {TARGETS[1], TARGETS[2]}


def test_a_failed_replica_goes_last_even_when_idle(replicas):
    replicas.failed(TARGETS[2])
    with replicas.outstanding(TARGETS[0]):
        order = [t for t, *_ in replicas.order()]
    assert order[-1] == TARGETS[2] and order[0] == TARGETS[1], order
