"""Access control in the rendered overlays: every service mounts its certificate Secret and its settings point
at the mounted files; cert-manager's Certificates name the identities the stages admit and the Services'
DNS names (checked with a real TLS handshake against the stages' own caller check); the orchestrator mounts
the keys file and the C2PA signer; the probes' health-only port is open to the kubelet."""

from __future__ import annotations

import base64
import datetime
import posixpath
from concurrent import futures
from pathlib import Path

import grpc
import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.deploy.test_manifests import (
    OVERLAYS,
    ROOT,
    _allowed_peers,
    by_name,
    container,
    env_of,
    kinds,
    settings_data,
    stages_of,
)
from unclip.access import keys
from unclip.access.interceptor import StageGuard, allowed_callers
from unclip.access.tls import channel_credentials, server_credentials
from unclip.runtime import settings

CERT_MANAGER_OVERLAYS = ["dev", "gpu", "gpu-hpa", "gpu-cascade"]
# The settings naming files of the service's own certificate: as a server (stages), as a client (callers).
SERVER_TLS = ("UNCLIP_TLS_CERT", "UNCLIP_TLS_KEY", "UNCLIP_CLIENT_CA")
CLIENT_TLS = ("UNCLIP_STAGE_TLS_CERT", "UNCLIP_STAGE_TLS_KEY", "UNCLIP_STAGE_TLS_CA")
SECRET_FILES = ("tls.crt", "tls.key", "ca.crt")  # what cert-manager writes, and what the docs have you create
# The key the dev overlay admits (documented in docs/operations.md and k8s/overlays/dev/keys.yaml).
DEV_KEY = "uk_DEV-ONLY-the-dev-overlay-key-not-a-secret0"

CERTIFICATE_SCHEMA = {  # cert-manager.io/v1 Certificate: the fields this deployment relies on
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string"},
                "commonName": {"type": "string", "maxLength": 64},
                "isCA": {"type": "boolean"},
                "subject": {"type": "object"},
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "emailAddresses": {"type": "array", "items": {"type": "string"}},
                "usages": {
                    "type": "array",
                    "items": {
                        "enum": [
                            "digital signature",
                            "server auth",
                            "client auth",
                            "email protection",
                            "cert sign",
                        ]
                    },
                },
                "duration": {"type": "string", "pattern": "^[0-9]+h$"},
                "renewBefore": {"type": "string", "pattern": "^[0-9]+h$"},
                "privateKey": {
                    "type": "object",
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                        "group": {"type": "string"},
                    },
                },
            },
        },
    },
}
ISSUER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "spec": {"oneOf": [{"required": ["selfSigned"]}, {"required": ["ca"]}]},
    },
}


def secret_mounts(deployment) -> dict[str, tuple[str, dict]]:
    """mountPath -> (Secret name, the volume) of the container's Secret volumes."""
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", []) if "secret" in v}
    out = {}
    for mount in container(deployment).get("volumeMounts", []):
        if mount["name"] in volumes:
            assert "subPath" not in mount, f"{mount['name']}: a subPath mount never sees the Secret's updates"
            assert mount.get("readOnly") is True, mount["name"]
            volume = volumes[mount["name"]]
            out[mount["mountPath"]] = (volume["secret"]["secretName"], volume)
    return out


def secret_of_file(deployment, path: str) -> tuple[str, str]:
    """(Secret name, key) that the file `path` in the container comes from."""
    folder, filename = posixpath.split(path)
    mounts = secret_mounts(deployment)
    assert folder in mounts, f"{path} is not in a mounted Secret ({sorted(mounts)})"
    name, volume = mounts[folder]
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    return name, items.get(filename, filename)


def tls_secret(deployment, docs, names: tuple[str, str, str]) -> str:
    """The one Secret whose tls.crt / tls.key / ca.crt the three settings `names` point at."""
    env = env_of(deployment, docs)
    found = {secret_of_file(deployment, env[n]) for n in names}
    secrets = {name for name, _ in found}
    assert len(secrets) == 1, (deployment["metadata"]["name"], found)
    assert {key for _, key in found} == set(SECRET_FILES)
    return secrets.pop()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_mounts_its_certificate_and_its_settings_point_at_it(rendered, overlay):
    docs = rendered[overlay]
    deployments = by_name(docs, "Deployment")
    used: dict[str, str] = {}
    for name, (process, _) in stages_of(docs).items():
        d = deployments[name]
        env = env_of(d, docs)
        if process == "orchestrator":
            # The front door stays plaintext (API keys); the certificate is its identity towards the stages.
            assert not env.get("UNCLIP_TLS_CERT") and not env.get("UNCLIP_CLIENT_CA")
            secret = tls_secret(d, docs, CLIENT_TLS)
        else:
            secret = tls_secret(d, docs, SERVER_TLS)
            if process == "safety":  # it calls the encoder with the same identity
                assert tls_secret(d, docs, CLIENT_TLS) == secret
            else:
                assert not any(env.get(n) for n in CLIENT_TLS), name
        assert secret not in used, f"{name} and {used.get(secret)} share {secret}: one identity per service"
        used[secret] = name
        pod = d["spec"]["template"]["spec"]
        for _, volume in secret_mounts(d).values():  # readable through fsGroup, by no one else
            assert volume["secret"]["defaultMode"] & 0o077 == 0o040, name
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_health_only_port_is_served_probed_and_open_to_the_kubelet(rendered, overlay):
    docs = rendered[overlay]
    deployments = by_name(docs, "Deployment")
    policies = kinds(docs, "NetworkPolicy")
    for name in stages_of(docs):
        d = deployments[name]
        c = container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert int(env_of(d, docs)["UNCLIP_HEALTH_PORT"]) == ports["health"], name
        assert all(
            c[p]["grpc"]["port"] == ports["health"]
            for p in ("startupProbe", "readinessProbe", "livenessProbe")
        )
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert {} in _allowed_peers(policies, labels, "ingress", "health"), f"{name}: probes blocked"
        # ... and the health port opens nothing else: the main port keeps its own policy.
        assert {} not in _allowed_peers(policies, labels, "ingress", "grpc"), name


def test_certificate_and_issuer_resources_are_well_formed(rendered):
    for overlay in CERT_MANAGER_OVERLAYS:
        docs = rendered[overlay]
        issuers = by_name(docs, "Issuer")
        for issuer in issuers.values():
            jsonschema.validate(issuer, ISSUER_SCHEMA)
        certificates = {c["spec"]["secretName"]: c for c in kinds(docs, "Certificate")}
        for cert in certificates.values():
            jsonschema.validate(cert, CERTIFICATE_SCHEMA)
            assert cert["metadata"]["namespace"] == "unclip"
            issuer = issuers[cert["spec"]["issuerRef"]["name"]]  # a namespaced Issuer of this overlay
            if "ca" in issuer["spec"]:  # backed by a CA Certificate issued by a self-signed Issuer
                ca = certificates[issuer["spec"]["ca"]["secretName"]]
                assert ca["spec"]["isCA"] is True
                assert "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]]["spec"]
    assert not kinds(rendered["gpu-plain-secrets"], "Certificate")
    assert not kinds(rendered["gpu-plain-secrets"], "Issuer")


def _issue(spec: dict, ca_key, ca_cert) -> tuple[bytes, bytes]:
    """What cert-manager's CA Issuer signs for `spec`: subject CN + O, DNS SANs, the key and extended key
    usages asked for. Returns (certificate PEM, PKCS#8 key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    eku = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
           "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION}  # fmt: skip
    name = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, o)
        for o in spec.get("subject", {}).get("organizations", [])
    ]
    name.append(x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"]))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=int(spec["duration"].removesuffix("h"))))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku[u] for u in spec["usages"] if u in eku]), critical=False)
    )
    if spec.get("dnsNames"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in spec["dnsNames"]]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem), key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca(folder: Path):
    from unclip.access.tls import mint_ca

    ca_key, ca_cert = mint_ca("unclip stack CA")
    (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_cert


def _pong(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"pong"


@pytest.mark.parametrize("overlay", ["dev", "gpu-cascade"])
def test_certificates_pass_the_stages_checks_under_the_service_names(rendered, overlay, tmp_path):
    """Each Certificate, issued as cert-manager would, serves its stage under the name the orchestrator
    dials (hostname verification) and identifies its caller as the stages expect: the orchestrator (and the
    safety service at the encoder) get through the stage's own caller check, another stage does not."""
    docs = rendered[overlay]
    deployments = by_name(docs, "Deployment")
    services = by_name(docs, "Service")
    certificates = {c["spec"]["secretName"]: c["spec"] for c in kinds(docs, "Certificate")}
    ca_key, ca_cert = _ca(tmp_path)
    ca = str(tmp_path / "ca.crt")
    files: dict[str, tuple[str, str, str]] = {}  # deployment -> (cert, key, CN)
    for name, (process, _) in stages_of(docs).items():
        d = deployments[name]
        secret = tls_secret(d, docs, CLIENT_TLS if process == "orchestrator" else SERVER_TLS)
        spec = certificates[secret]
        assert set(spec["usages"]) >= {"server auth", "client auth"}, secret  # as unclip/access/tls.py mints
        # Every name a Service of this Deployment is reached by is covered.
        for service_name, service in services.items():
            labels = d["spec"]["template"]["metadata"]["labels"]
            if all(labels.get(k) == v for k, v in service["spec"]["selector"].items()):
                for suffix in ("", ".unclip", ".unclip.svc", ".unclip.svc.cluster.local"):
                    assert service_name + suffix in spec["dnsNames"], (secret, service_name + suffix)
        cert_pem, key_pem = _issue(spec, ca_key, ca_cert)
        (tmp_path / f"{name}.crt").write_bytes(cert_pem)
        (tmp_path / f"{name}.key").write_bytes(key_pem)
        files[name] = (str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key"), spec["commonName"])

    data = settings_data(docs)
    dialed = {"UNCLIP_ENCODER_ADDR", "UNCLIP_PRIOR_ADDR", "UNCLIP_DECODER_ADDR", "UNCLIP_UPSAMPLER_ADDRS",
              "UNCLIP_SAFETY_ADDR"}  # fmt: skip
    targets = [t for key in dialed for t in data[key].split(",")]
    callers = {"unclip-orchestrator", "unclip-safety"}
    checked = 0
    for target in targets:
        host = target.removeprefix("dns:///").rsplit(":", 1)[0]
        label = stages_of(docs)[host][1]
        cert, key, _ = files[host]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2),
            interceptors=[StageGuard(label, allowed_callers(label))],
        )
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "unclip.test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(_pong)}
                )
            ]
        )
        port = server.add_secure_port("127.0.0.1:0", server_credentials(cert, key, ca))
        server.start()
        try:
            for caller in [*sorted(callers), "unclip-prior"]:
                caller_cert, caller_key, caller_cn = files[caller]
                options = [("grpc.ssl_target_name_override", host)]  # verify the name the orchestrator dials
                with grpc.secure_channel(
                    f"127.0.0.1:{port}", channel_credentials(ca, caller_cert, caller_key), options=options
                ) as channel:
                    ping = channel.unary_unary("/unclip.test.Echo/Ping")
                    if caller_cn in allowed_callers(label):
                        assert ping(b"ping", timeout=10) == b"pong", (host, caller)
                        checked += 1
                    else:
                        with pytest.raises(grpc.RpcError) as refused:
                            ping(b"ping", timeout=10)
                        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, (host, caller)
        finally:
            server.stop(None)
    # The orchestrator reached every stage it dials; the safety service reached the encoder.
    assert checked == len(targets) + 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_orchestrator_mounts_the_keys_file_and_the_signer(rendered, overlay):
    docs = rendered[overlay]
    deployments = by_name(docs, "Deployment")
    orchestrator = deployments["unclip-orchestrator"]
    env = env_of(orchestrator, docs)
    assert secret_of_file(orchestrator, env["UNCLIP_KEYS_FILE"]) == ("unclip-keys", "keys.yaml")
    # Signing happens in the orchestrator (unclip/provenance, "orchestrator:" settings): on where mounted.
    assert settings.SETTINGS["c2pa_cert"].help.startswith("orchestrator:")
    assert env.get("UNCLIP_C2PA", "true") == "true"
    assert secret_of_file(orchestrator, env["UNCLIP_C2PA_CERT"]) == ("unclip-c2pa", "tls.crt")
    assert secret_of_file(orchestrator, env["UNCLIP_C2PA_KEY"]) == ("unclip-c2pa", "tls.key")
    assert secret_of_file(orchestrator, env["UNCLIP_C2PA_TRUST_ANCHORS"]) == ("unclip-c2pa", "ca.crt")
    watermark_secret, _ = secret_of_file(orchestrator, env["UNCLIP_WATERMARK_KEY_FILE"])
    assert watermark_secret.startswith("unclip-watermark")
    # The signer's and the keys file's Secrets reach no other pod.
    for name, d in deployments.items():
        if name != "unclip-orchestrator":
            mounted = {secret for secret, _ in secret_mounts(d).values()}
            assert not mounted & {"unclip-keys", "unclip-c2pa", watermark_secret}, name
    for cert in kinds(docs, "Certificate"):
        if cert["spec"]["secretName"] == "unclip-c2pa":  # C2PA wants a CA-issued emailProtection leaf
            assert set(cert["spec"]["usages"]) == {"digital signature", "email protection"}
            assert not cert["spec"].get("isCA") and cert["spec"]["privateKey"]["encoding"] == "PKCS8"


def test_the_dev_keys_secret_admits_the_documented_dev_key(rendered, tmp_path):
    [secret] = [s for s in kinds(rendered["dev"], "Secret") if s["metadata"]["name"] == "unclip-keys"]
    path = tmp_path / "keys.yaml"
    path.write_bytes(base64.b64decode(secret["data"]["keys.yaml"]))
    record = keys.KeyStore(str(path)).by_key(DEV_KEY)
    assert record is not None and not record.revoked and record.tenant == "dev"
    assert DEV_KEY in (ROOT / "docs" / "operations.md").read_text()
    watermark = [
        s for s in kinds(rendered["dev"], "Secret") if s["metadata"]["name"].startswith("unclip-watermark")
    ]
    assert len(base64.b64decode(watermark[0]["data"]["watermark.key"])) >= 16  # the orchestrator's minimum


def test_the_plain_secret_path_renders_the_same_wiring(rendered):
    """gpu-plain-secrets mounts what gpu mounts; only the Certificates (cert-manager's part) are absent."""

    def wiring(docs):
        return {
            name: (sorted(secret_mounts(d)), sorted(s for s, _ in secret_mounts(d).values()), env_of(d, docs))
            for name, d in by_name(docs, "Deployment").items()
        }

    plain, managed = rendered["gpu-plain-secrets"], rendered["gpu"]
    assert wiring(plain) == wiring(managed)
    assert sorted(d["kind"] for d in managed if not d["apiVersion"].startswith("cert-manager.io/")) == sorted(
        d["kind"] for d in plain
    )
