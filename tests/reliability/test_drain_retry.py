"""A replica that drains answers some calls CANCELLED: gRPC's server cancels the calls it has received but not
yet handed to a handler when it shuts down (grpc/grpc#41785). The orchestrator's stage calls retry those on
another replica, since this side did not cancel them. Real gRPC servers in this process, no models."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest

from services.orchestrator.clients import Calls
from services.orchestrator.replicas import Replicas
from unclip.runtime.errors import StatusError
from unclip.runtime.server import create_channel, create_server

pytestmark = pytest.mark.timeout(120)


class WhoStub:
    def __init__(self, channel: grpc.Channel):
        self.Who = channel.unary_unary("/t.T/Who")


def _server(handler) -> tuple[grpc.Server, str]:
    server, port = create_server("127.0.0.1:0", max_workers=4)
    methods = {"Who": grpc.unary_unary_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", methods),))
    server.start()
    return server, f"127.0.0.1:{port}"


def _answer(name: bytes, seconds: float = 0.0):
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(seconds)
        return name

    return who


def _cancels(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.CANCELLED, "server shutting down")


def test_cancelled_by_a_replica_is_retried_on_another():
    cancelling, a = _server(_cancels)
    answering, b = _server(_answer(b"b"))
    try:
        replicas = Replicas("who", [a, b], WhoStub, create_channel)
        # Round-robin starts at each replica in turn: every call succeeds, some after a retry.
        answers = [Calls(None, 10.0)(replicas.Who, b"", "who") for _ in range(4)]
        assert answers == [b"b"] * 4
    finally:
        cancelling.stop(None)
        answering.stop(None)


def test_cancelled_by_every_replica_reads_unavailable():
    first, a = _server(_cancels)
    second, b = _server(_cancels)
    try:
        replicas = Replicas("who", [a, b], WhoStub, create_channel)
        with pytest.raises(StatusError) as raised:
            Calls(None, 10.0)(replicas.Who, b"", "who")
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert "who stage" in str(raised.value)
    finally:
        first.stop(None)
        second.stop(None)


def test_stopping_one_replica_under_load_fails_no_call():
    """32 callers keep two replicas busy while one stops with a grace period, five times over."""
    outcomes: Counter[str] = Counter()
    for _ in range(5):
        draining, a = _server(_answer(b"a", 0.05))
        staying, b = _server(_answer(b"b", 0.05))
        replicas = Replicas("who", [a, b], WhoStub, create_channel)
        stop = threading.Event()

        def call_until_stopped(replicas: Replicas = replicas, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    Calls(None, 20.0)(replicas.Who, b"", "who")
                    outcomes["ok"] += 1
                except StatusError as error:
                    outcomes[f"{error.code.name}: {error}"] += 1

        callers = [threading.Thread(target=call_until_stopped) for _ in range(32)]
        for caller in callers:
            caller.start()
        time.sleep(0.4)
        draining.stop(30)
        time.sleep(0.4)
        stop.set()
        for caller in callers:
            caller.join()
        staying.stop(None)
    assert set(outcomes) == {"ok"}, outcomes
    assert outcomes["ok"] > 100
