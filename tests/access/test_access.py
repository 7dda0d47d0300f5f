"""Controlled access through the shared stack (API keys at the orchestrator, mTLS between the services):
who may call what, key management from the CLI, revocation within a second, the direct-stage attack, and the
identity the audit records."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc

from services.safety.audit import read_records
from tests.helpers import code_of
from unclip.access.client import with_key
from unclip.access.tls import channel_credentials, mint_stack_certificates
from unclip.runtime.server import create_channel, health_status
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    orchestrator_pb2_grpc,
    prior_pb2,
    prior_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)
from unclip.v1 import orchestrator_pb2 as pb

UNCLIP = [sys.executable, "-m", "unclip"]
FAST = pb.SamplingParams(prior_num_inference_steps=2, decoder_num_inference_steps=2)
FAST_FLAGS = ["--prior-steps", "2", "--decoder-steps", "2", "--size", "32", "--no-progress"]
STAGES = ["encoder", "prior", "decoder", "super_res", "super_res_2", "safety"]


def unclip(*args: str, env: dict[str, str], cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*UNCLIP, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_front_door_needs_a_valid_key_but_health_does_not(stack):
    request = pb.GenerateRequest(prompt="a red circle", size=32, params=FAST)
    bogus = "uk_" + "A" * 43
    with create_channel(stack.address) as plain:
        stub = orchestrator_pb2_grpc.ImageServiceStub(plain)
        code, details = code_of(lambda: stub.Generate(request, timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
        code, _ = code_of(lambda: stub.GetCapabilities(pb.CapabilitiesRequest(), timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert health_status(stack.address) == "SERVING"  # probes and load balancers need no key
    for header in (f"Bearer {bogus}", f"Basic {bogus}", "Bearer"):
        with create_channel(stack.address) as plain:
            stub = orchestrator_pb2_grpc.ImageServiceStub(plain)
            metadata = (("authorization", header),)
            code, details = code_of(lambda s=stub, m=metadata: s.Generate(request, timeout=30, metadata=m))
            assert code == grpc.StatusCode.UNAUTHENTICATED, details
            assert bogus not in details and "A" * 10 not in details  # the key is never echoed


def test_keys_create_use_scope_and_revoke_within_a_second(stack, tmp_path):
    keys_file = str(stack.running.keys_file)
    created = unclip("keys", "create", "gen-only", "--tenant", "team-t", "--scopes", "generate",
                     "--keys-file", keys_file, env=stack.env)  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("uk_") and len(key) >= 43 and "shown only this once" in created.stderr
    listed = unclip("keys", "list", "--keys-file", keys_file, env=stack.env)
    assert "gen-only" in listed.stdout and "team-t" in listed.stdout and key not in listed.stdout
    assert key not in (stack.running.keys_file.read_text())  # stored hashed

    env = {**stack.env, "UNCLIP_API_KEY": key}
    done = unclip("generate", "a red circle", "--seed", "1", "--out", str(tmp_path), *FAST_FLAGS, env=env)
    assert done.returncode == 0, done.stderr
    image = done.stdout.split()[0]
    done = unclip("vary", image, "--out", str(tmp_path), *FAST_FLAGS[:-1], env=env)
    assert done.returncode == 4 and "PERMISSION_DENIED" in done.stderr and "'vary'" in done.stderr, (
        done.stderr
    )
    assert key not in done.stderr

    with with_key(create_channel(stack.address), key) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        stub.GetCapabilities(pb.CapabilitiesRequest(), timeout=30)
        revoked = unclip("keys", "revoke", "gen-only", "--keys-file", keys_file, env=stack.env)
        assert revoked.returncode == 0, revoked.stderr
        since = time.monotonic()
        while True:
            try:
                stub.GetCapabilities(pb.CapabilitiesRequest(), timeout=30)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in error.details()
                break
            assert time.monotonic() - since < 1.0, "the revoked key was still accepted after 1 s"
            time.sleep(0.02)
    done = unclip("generate", "a red circle", *FAST_FLAGS, "--out", str(tmp_path), env=env)
    assert done.returncode == 4 and "revoked" in done.stderr, done.stderr


def _stage_calls(channel: grpc.Channel) -> dict[str, object]:
    """One real method of each stage, with a request that would be valid or INVALID_ARGUMENT if it got in."""
    return {
        "encoder": lambda: encoder_pb2_grpc.EncoderStub(channel).EncodeText(
            encoder_pb2.EncodeTextRequest(prompts=["hate"]), timeout=10
        ),
        "prior": lambda: prior_pb2_grpc.PriorStub(channel).Sample(prior_pb2.PriorRequest(), timeout=10),
        "decoder": lambda: decoder_pb2_grpc.DecoderStub(channel).Decode(
            decoder_pb2.DecodeRequest(), timeout=10
        ),
        "super_res": lambda: decoder_pb2_grpc.UpsamplerStub(channel).Upsample(
            decoder_pb2.UpsampleRequest(), timeout=10
        ),
        "super_res_2": lambda: decoder_pb2_grpc.UpsamplerStub(channel).Upsample(
            decoder_pb2.UpsampleRequest(), timeout=10
        ),
        "safety": lambda: safety_pb2_grpc.SafetyStub(channel).CheckPrompt(
            safety_pb2.CheckPromptRequest(
                prompt="a cat", context=safety_pb2.RequestContext(identity="svc:admin", tenant="root")
            ),
            timeout=10,
        ),
    }


def test_every_stage_refuses_callers_without_the_right_certificate(stack, tmp_path):
    """The issue's direct-stage attack (EncodeText -> Sample -> Decode -> Upsample of a prompt the
    orchestrator refuses, and a forged identity sent to Safety) draws and records nothing: without a
    certificate, or with one from another CA, the handshake fails; with the stack's CA but not as the
    orchestrator, PERMISSION_DENIED. Never a result, never INVALID_ARGUMENT (which would mean the request
    reached the servicer)."""
    running = stack.running
    other_ca = mint_stack_certificates(tmp_path / "other-ca", ["orchestrator"])["orchestrator"]
    audit_before = len(list(read_records(stack.log_dir / "audit")))
    for name in STAGES:
        address = stack.addresses[name]
        plain = create_channel(address)
        foreign = create_channel(
            address, credentials=channel_credentials(str(other_ca.ca), str(other_ca.cert), str(other_ca.key))
        )
        foreign_client = create_channel(  # trusts the stack's CA, presents another CA's certificate
            address,
            credentials=channel_credentials(running._cert("ca", "ca"), str(other_ca.cert), str(other_ca.key)),
        )
        not_allowed = create_channel(
            address,
            credentials=channel_credentials(
                running._cert("ca", "ca"), running._cert("client", "crt"), running._cert("client", "key")
            ),
        )
        try:
            for channel in (plain, foreign, foreign_client):
                code, details = code_of(_stage_calls(channel)[name])
                assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
            code, details = code_of(_stage_calls(not_allowed)[name])
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
            assert "'client' may not call" in details
        finally:
            for channel in (plain, foreign, foreign_client, not_allowed):
                channel.close()
        # The plaintext health-only port answers health, and nothing else.
        health_only = stack.health_address(name)
        assert health_only != address and health_status(health_only) == "SERVING", name
        with create_channel(health_only) as channel:
            code, _ = code_of(_stage_calls(channel)[name])
            assert code == grpc.StatusCode.UNIMPLEMENTED, name
    assert len(list(read_records(stack.log_dir / "audit"))) == audit_before  # Safety recorded nothing


def test_the_audit_records_the_authenticated_identity_and_tenant(stack):
    user = f"audit-identity-{time.monotonic_ns()}"
    with stack.channel() as channel:
        request = pb.GenerateRequest(prompt="a red circle", size=32, params=FAST, user=user)
        orchestrator_pb2_grpc.ImageServiceStub(channel).Generate(request, timeout=120)
    records = [r for r in read_records(stack.log_dir / "audit") if r.get("user") == user]
    assert records and all(r["identity"] == "key:local" and r["tenant"] == "local" for r in records), records


def test_the_cli_finds_the_running_local_stack_its_key_and_its_logs_by_itself(stack, tmp_path):
    """No --addr, --dir or variables: `generate` and `info` reach the stack named by the state file with the
    key it names, `usage` and `audit` read its ledger and audit log; a variable, when set, wins over it."""
    from unclip import stack_state

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / stack_state.FILE_NAME).write_text(stack.running.state().to_json())  # pid: this test, alive
    unset = ("UNCLIP_ADDR", "UNCLIP_API_KEY", "UNCLIP_USAGE_DIR", "UNCLIP_AUDIT_DIR")
    env = {k: v for k, v in stack.env.items() if k not in unset}
    env["UNCLIP_STATE_DIR"] = str(state_dir)

    done = unclip("generate", "a red circle", "--seed", "1", "--out", str(tmp_path), *FAST_FLAGS, env=env)
    assert done.returncode == 0, done.stderr
    done = unclip("info", env=env)
    assert done.returncode == 0 and f"stack at {stack.address}" in done.stdout, done.stderr
    done = unclip("usage", "--by", "tenant", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert "local" in [json.loads(line)["tenant"] for line in done.stdout.splitlines()]
    done = unclip("audit", "--stage", "prompt", "--identity", "key:local", env=env)
    assert done.returncode == 0 and "allow" in done.stdout, done.stderr

    nowhere = "127.0.0.1:1"  # nothing listens on port 1
    done = unclip("info", "--timeout", "5", env={**env, "UNCLIP_ADDR": nowhere})
    assert done.returncode == 1 and f"no stack at {nowhere}" in done.stderr, done.stderr
    done = unclip("usage", env={**env, "UNCLIP_USAGE_DIR": str(tmp_path / "none")})
    assert done.returncode == 2 and str(tmp_path / "none") in done.stderr, done.stderr
    done = unclip("audit", env={**env, "UNCLIP_AUDIT_DIR": str(tmp_path / "none")})
    assert done.returncode == 2 and "UNCLIP_AUDIT_DIR" in done.stderr, done.stderr
