"""A local certificate authority for `unclip up`, and the gRPC credentials of servers and stage channels.

`mint_stack_certificates(folder, names)` makes a CA (ECDSA P-256, valid 30 days) and one certificate per
service name, each usable as server and as client certificate (serverAuth + clientAuth), whose subject CN and
first SAN are the service name (what the stages check), with `localhost` and `127.0.0.1` as further SANs so
loopback targets verify. Private keys are written mode 0600 in a 0700 folder. In Kubernetes the same files
come from cert-manager `Certificate`s (k8s/components/cert-manager) or from plain Secrets that `unclip certs
mint` writes with `mint_ca`, `mint_leaf` (the Services' DNS names as SANs) and `mint_signer` (a C2PA signer of
the same CA); see docs/operations.md, "Secrets".
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # PEM certificate
    key: Path  # PEM private key (mode 0600)
    ca: Path  # PEM CA certificate that signed it (and that it trusts)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "unclip"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def mint_ca(
    common_name: str = "unclip local stack CA", validity: datetime.timedelta = VALIDITY
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def _leaf(
    key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str, validity: datetime.timedelta
) -> x509.CertificateBuilder:
    """What every certificate the CA issues has: subject `name`, the CA as issuer, a random serial, validity
    from five minutes ago (clock skew) to `validity` from now but never past the CA's, not a CA itself."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + min(validity, ca_cert.not_valid_after_utc - now))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )


def mint_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    hosts: list[str],
    validity: datetime.timedelta = VALIDITY,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A certificate for `name` (CN and first DNS SAN) also valid for `hosts` (DNS names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    cert = (
        _leaf(key, ca_cert, name, validity)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def mint_signer(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    validity: datetime.timedelta = VALIDITY,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A C2PA signing certificate issued by the CA: digitalSignature and the emailProtection EKU, which C2PA
    validators require (they refuse self-signed leaves and TLS-only usages), with the key identifiers."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "key_cert_sign",
         "crl_sign", "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    cert = (
        _leaf(key, ca_cert, name, validity)
        .add_extension(x509.KeyUsage(digital_signature=True, **usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The private key as PKCS#8 PEM, mode 0600."""
    _write_private(path, _key_pem(key))


def mint_stack_certificates(
    folder: Path, names: list[str], hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> dict[str, CertFiles]:
    """A fresh CA in `folder` and a certificate per name; returns name -> its files."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_key, ca_cert = mint_ca()
    ca_path = folder / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files = {}
    for name in names:
        key, cert = mint_leaf(ca_key, ca_cert, name, list(hosts))
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, _key_pem(key))
        files[name] = CertFiles(cert_path, key_path, ca_path)
    return files  # the CA's key is not kept: nothing can be signed by it after this


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS for a server; with `client_ca`, clients must present a certificate signed by it (the handshake
    fails otherwise)."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=bool(client_ca),
    )


def channel_credentials(ca: str, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """TLS for a client trusting `ca`, presenting `cert`/`key` when given (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def peer_names(context: grpc.ServicerContext) -> list[str]:
    """The authenticated peer's certificate names (SANs, then CN) — empty without a verified certificate."""
    auth = context.auth_context() or {}
    names = [v.decode() for v in auth.get("x509_subject_alternative_name", [])]
    names += [v.decode() for v in auth.get("x509_common_name", [])]
    return names


def peer_common_name(context: grpc.ServicerContext) -> str:
    values = (context.auth_context() or {}).get("x509_common_name", [])
    return values[0].decode() if values else ""
