"""The orchestrator's TLS front door (`--tls-cert/--tls-key/--client-ca`) through a real orchestrator process
on the shared stack's stages: a client certificate of the front door's CA whose subject the keys file lists
is that client's identity (audit and usage name `cert:SUBJECT` and its tenant; its scopes apply); a subject
not listed is UNAUTHENTICATED; a certificate of another CA, or none at all, fails the handshake."""

from __future__ import annotations

import sys
import time

import grpc
import pytest

from services.safety.audit import read_records
from unclip.access.tls import channel_credentials, mint_stack_certificates
from unclip.access.usage import read_records as read_usage
from unclip.runtime.server import create_channel, health_status
from unclip.stack import Process
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

FAST = pb.SamplingParams(prior_num_inference_steps=2, decoder_num_inference_steps=2)
SUBJECT = "reporting.team-b"
KEYS_FILE = f"""\
keys: []
clients:
  - name: reporting
    subject: {SUBJECT}
    tenant: team-b
    scopes: [generate]
"""


@pytest.fixture(scope="module")
def front_door(stack, tmp_path_factory):
    """(address, front-door CA files by name, usage folder) of an orchestrator serving TLS to its clients."""
    root = tmp_path_factory.mktemp("front-door")
    # The front door's own CA: its server certificate (SANs localhost, 127.0.0.1) and client certificates.
    certs = mint_stack_certificates(root / "tls", ["orchestrator", SUBJECT, "unlisted.team-c"])
    (root / "keys.yaml").write_text(KEYS_FILE)
    running = stack.running
    addr = stack.addresses
    argv = [
        sys.executable, "-m", "services.orchestrator", "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--health-port", "0", "--model", str(stack.model_dir),
        "--encoder-addr", addr["encoder"], "--prior-addr", addr["prior"], "--decoder-addr", addr["decoder"],
        "--upsampler-addrs", f"{addr['super_res']},{addr['super_res_2']}", "--safety-addr", addr["safety"],
        # towards the stages: the stack's orchestrator certificate (the stages admit it)
        "--stage-tls-cert", running._cert("orchestrator", "crt"),
        "--stage-tls-key", running._cert("orchestrator", "key"),
        "--stage-tls-ca", running._cert("ca", "ca"),
        # towards its clients: TLS, and a client certificate of the front door's CA required
        "--tls-cert", str(certs["orchestrator"].cert), "--tls-key", str(certs["orchestrator"].key),
        "--client-ca", str(certs["orchestrator"].ca),
        "--keys-file", str(root / "keys.yaml"), "--usage-dir", str(root / "usage"),
    ]  # fmt: skip
    process = Process("orchestrator-tls", argv, root / "orchestrator.log", has_health_port=True)
    process.start(running._env())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.alive(), process.failure()
            address = process.poll_address()
            if address and health_status(process.probe_address or "", timeout=1.0) == "SERVING":
                break
            assert time.monotonic() < deadline, process.log_tail()
            time.sleep(0.1)
        yield address, certs, root / "usage"
    finally:
        process.popen.terminate()
        process.popen.wait(timeout=30)


def _stub(address: str, credentials: grpc.ChannelCredentials | None) -> tuple[grpc.Channel, object]:
    channel = create_channel(address, credentials=credentials) if credentials else create_channel(address)
    return channel, orchestrator_pb2_grpc.ImageServiceStub(channel)


def _refusal(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


def test_a_listed_client_certificate_is_the_callers_identity(stack, front_door):
    address, certs, usage_dir = front_door
    mine = certs[SUBJECT]
    user = f"front-door-{time.monotonic_ns()}"
    channel, stub = _stub(address, channel_credentials(str(mine.ca), str(mine.cert), str(mine.key)))
    with channel:
        request = pb.GenerateRequest(prompt="a red circle", size=32, params=FAST, user=user, seed=3)
        response = stub.Generate(request, timeout=120)
        assert len(response.images) == 1 and response.images[0].png[:8] == b"\x89PNG\r\n\x1a\n"
        # Its scopes apply: the keys file grants `generate` only.
        code, details = _refusal(lambda: stub.Edit(pb.EditRequest(), timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and f"cert:{SUBJECT}" in details, details
    audit = [r for r in read_records(stack.log_dir / "audit") if r.get("user") == user]
    assert audit and all(r["identity"] == f"cert:{SUBJECT}" and r["tenant"] == "team-b" for r in audit), audit
    [usage] = [r for r in read_usage(usage_dir) if r["request_id"] == response.request_id]
    assert usage["principal"] == f"cert:{SUBJECT}" and usage["tenant"] == "team-b" and usage["images"] == 1


def test_a_certificate_of_the_ca_not_listed_is_unauthenticated(front_door):
    address, certs, _ = front_door
    other = certs["unlisted.team-c"]
    channel, stub = _stub(address, channel_credentials(str(other.ca), str(other.cert), str(other.key)))
    with channel:
        code, details = _refusal(lambda: stub.GetCapabilities(pb.CapabilitiesRequest(), timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not listed in the keys file" in details, details


def test_another_cas_certificate_or_none_fails_the_handshake(front_door, tmp_path):
    address, certs, _ = front_door
    foreign = mint_stack_certificates(tmp_path / "foreign", [SUBJECT])[SUBJECT]  # same subject, another CA
    ca = str(certs[SUBJECT].ca)
    attempts = {
        "another CA": channel_credentials(ca, str(foreign.cert), str(foreign.key)),
        "no certificate": channel_credentials(ca),
        "plaintext": None,
    }
    request = pb.GenerateRequest(prompt="a red circle", size=32, params=FAST)
    for what, credentials in attempts.items():
        channel, stub = _stub(address, credentials)
        with channel:
            code, details = _refusal(lambda s=stub: s.Generate(request, timeout=30))
        # Refused in the handshake, before any handler: never a result, never INVALID_ARGUMENT.
        assert code == grpc.StatusCode.UNAVAILABLE, (what, code, details)
