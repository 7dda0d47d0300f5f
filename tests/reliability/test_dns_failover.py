"""The orchestrator's failover through one `dns:` target, without models (seconds, not minutes): two real gRPC
server processes share one port on 127.0.0.1 and 127.0.0.2, a loopback DNS server resolves one name to both,
and `Replicas` (the orchestrator's stage client) calls through `dns://<dns server>/<name>:<port>` while one
server is SIGKILLed with calls in flight on it. test_replicas.py does the same with real stages."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from dns_server import DnsServer  # tests/reliability/dns_server.py (pytest puts this folder on sys.path)

from services.orchestrator.replicas import Replicas
from unclip.runtime.server import create_channel

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]  # the repository: the servers import unclip from it

# A server answering /t.T/Who with its own address after 0.3 s (long enough to be killed mid-call).
SERVER = """
import sys, time, grpc
from unclip.runtime.server import create_server
host, port = sys.argv[1], int(sys.argv[2])
server, port = create_server(f"{host}:{port}")
def who(request, context):
    time.sleep(0.3)
    return host.encode()
handler = grpc.method_handlers_generic_handler("t.T", {"Who": grpc.unary_unary_rpc_method_handler(who)})
server.add_generic_rpc_handlers((handler,))
server.start()
print("listening", port, flush=True)
server.wait_for_termination()
"""


class WhoStub:
    def __init__(self, channel: grpc.Channel):
        self.Who = channel.unary_unary("/t.T/Who")


def test_dns_target_spreads_calls_and_fails_over_on_sigkill():
    # The first server takes a free port on 127.0.0.1; the second takes the same port on 127.0.0.2 (nothing
    # else listens there).
    def start(host: str, port: int) -> tuple[subprocess.Popen, int]:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, host, str(port)], stdout=subprocess.PIPE, cwd=ROOT
        )
        servers.append(server)
        line = server.stdout.readline().split()
        assert line[:1] == [b"listening"], f"the server on {host} did not start"
        return server, int(line[1])

    servers: list[subprocess.Popen] = []
    try:
        _, port = start("127.0.0.1", 0)
        victim, _ = start("127.0.0.2", port)
        with DnsServer({"who.unclip.test": ["127.0.0.1", "127.0.0.2"]}) as dns:
            replicas = Replicas(
                "who", [f"dns://{dns.address}/who.unclip.test:{port}"], WhoStub, create_channel
            )
            # round_robin over the two resolved addresses (once both connections are up: until then it
            # picks among the ready ones)
            seen = {replicas.Who(b"", timeout=10) for _ in range(6)}
            assert seen == {b"127.0.0.1", b"127.0.0.2"}
            answers = [replicas.Who(b"", timeout=10) for _ in range(8)]
            assert min(answers.count(b"127.0.0.1"), answers.count(b"127.0.0.2")) >= 3, answers

            def one(_):
                try:
                    return replicas.Who(b"", timeout=10)
                except grpc.RpcError as error:
                    return error.code()

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(one, i) for i in range(64)]
                time.sleep(0.5)  # 16 calls in flight, half of them on the victim
                victim.kill()
                results = [f.result(timeout=60) for f in futures]
            failed = [r for r in results if not isinstance(r, bytes)]
            assert not failed, failed
            assert b"127.0.0.2" in results  # the victim did answer before it died
            assert results[-8:] == [b"127.0.0.1"] * 8  # and the survivor took the rest
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)
