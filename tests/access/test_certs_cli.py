"""`unclip certs mint --out DIR`: the Secrets of k8s/overlays/gpu-plain-secrets as files. The certificates
pass the stages' own checks under the Services' names (a real TLS handshake through StageGuard), the C2PA
signer signs a manifest that c2pa's reader trusts, and nothing is ever overwritten."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from concurrent import futures

import grpc
import PIL.Image
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from unclip.access.interceptor import StageGuard, allowed_callers
from unclip.access.tls import channel_credentials, server_credentials
from unclip.provenance.c2pa_manifest import C2paSigner, ManifestReader

UNCLIP = [sys.executable, "-m", "unclip"]
SERVICES = ["orchestrator", "encoder", "prior", "decoder", "super-res", "super-res-2", "safety"]


@pytest.fixture(scope="module")
def minted(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs") / "secrets"
    done = subprocess.run(
        [
            *UNCLIP,
            "certs",
            "mint",
            "--out",
            str(out),
            "--namespace",
            "team-x",
            "--client",
            "reporting.team-b",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_one_folder_per_secret_with_the_commands_to_create_them(minted):
    out, stdout = minted
    expected = [f"unclip-tls-{s}" for s in SERVICES] + ["unclip-c2pa", "unclip-watermark"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "clients"])
    for name in expected:
        assert f"kubectl -n team-x create secret generic {name} --from-file={out / name}" in stdout
    ca = _cert(out / "unclip-tls-encoder" / "ca.crt")
    for service in SERVICES:
        folder = out / f"unclip-tls-{service}"
        assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
        assert stat.S_IMODE(os.stat(folder / "tls.key").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        cert = _cert(folder / "tls.crt")
        cert.verify_directly_issued_by(ca)  # one CA for the whole deployment
        # CN: the identity the stages admit; SANs: the names the orchestrator dials in this namespace.
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == service.replace("-", "_")
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        host = f"unclip-{service}"
        assert {host, f"{host}.team-x.svc", f"{host}.team-x.svc.cluster.local"} <= set(
            sans.get_values_for_type(x509.DNSName)
        )
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    assert len((out / "unclip-watermark" / "watermark.key").read_bytes()) == 32
    client = _cert(out / "clients" / "reporting.team-b" / "tls.crt")
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "reporting.team-b"


def _pong(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"pong"


def test_the_certificates_pass_the_stages_checks(minted):
    out, _ = minted
    folder = out / "unclip-tls-encoder"
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[StageGuard("encoder", allowed_callers("encoder"))],
    )
    handler = grpc.method_handlers_generic_handler(
        "unclip.test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(_pong)}
    )
    server.add_generic_rpc_handlers([handler])
    port = server.add_secure_port(
        "127.0.0.1:0",
        server_credentials(str(folder / "tls.crt"), str(folder / "tls.key"), str(folder / "ca.crt")),
    )
    server.start()
    try:
        outcomes = {}
        for caller in ("orchestrator", "safety", "prior"):
            mine = out / f"unclip-tls-{caller}"
            credentials = channel_credentials(
                str(mine / "ca.crt"), str(mine / "tls.crt"), str(mine / "tls.key")
            )
            options = [("grpc.ssl_target_name_override", "unclip-encoder.team-x.svc")]
            with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
                try:
                    outcomes[caller] = channel.unary_unary("/unclip.test.Echo/Ping")(b"ping", timeout=10)
                except grpc.RpcError as error:
                    outcomes[caller] = error.code()
        assert outcomes == {
            "orchestrator": b"pong",
            "safety": b"pong",  # the safety service's embedding filters call the encoder
            "prior": grpc.StatusCode.PERMISSION_DENIED,
        }
    finally:
        server.stop(None)


def test_the_c2pa_signer_signs_manifests_that_verify_against_the_ca(minted):
    out, _ = minted
    folder = out / "unclip-c2pa"
    signer = C2paSigner.from_files(folder / "tls.crt", folder / "tls.key")  # the orchestrator's start check
    png = io.BytesIO()
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    check = ManifestReader((folder / "ca.crt").read_text()).check(signer.sign(png.getvalue(), None))
    assert check.present and check.ours and check.intact, check


def test_nothing_is_overwritten_and_bad_input_names_the_flag(minted, tmp_path):
    out, _ = minted
    before = (out / "unclip-tls-orchestrator" / "tls.key").read_bytes()
    for args, flag in (
        (["--out", str(out)], "--out"),
        (["--out", str(tmp_path / "a"), "--namespace", "Not_A_Namespace"], "--namespace"),
        (["--out", str(tmp_path / "b"), "--days", "0"], "--days"),
    ):
        done = subprocess.run([*UNCLIP, "certs", "mint", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and flag in done.stderr, (args, done.stderr)
    assert (out / "unclip-tls-orchestrator" / "tls.key").read_bytes() == before
