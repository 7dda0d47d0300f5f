"""A local C2PA signer for testing: a CA and a leaf it issues, minted with `cryptography` at `unclip up`.

C2PA validators refuse self-signed signing certificates and want a CA-issued leaf whose extended key usage
allows document signing (emailProtection here); the leaf's key signs, the CA is the trust anchor `unclip
verify` checks against. Everything here says TEST in its name: a manifest signed by it proves only that this
machine's stack made the image. Production deployments mount their own signer (a k8s Secret) and set
UNCLIP_C2PA_CERT / UNCLIP_C2PA_KEY. This CA is separate from any TLS CA of the stack on purpose (a TLS
server or client leaf cannot be the C2PA signer).
"""

from __future__ import annotations

import datetime
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 30  # a test signer outlives any local stack, and no longer


@dataclass(frozen=True)
class TestSigner:
    """Paths of a minted test signer (PEM files) and the watermark key beside it."""

    cert: Path  # leaf then CA (the chain C2PA embeds)
    key: Path  # the leaf's private key (PKCS#8)
    ca: Path  # the trust anchor
    watermark_key: Path  # 32 random bytes

    def env(self) -> dict[str, str]:
        """The orchestrator's settings for this signer."""
        return {
            "UNCLIP_C2PA_CERT": str(self.cert),
            "UNCLIP_C2PA_KEY": str(self.key),
            "UNCLIP_C2PA_TRUST_ANCHORS": str(self.ca),
            "UNCLIP_WATERMARK_KEY_FILE": str(self.watermark_key),
        }


def mint_test_signer(folder: Path) -> TestSigner:
    """Writes a new test CA, a signer leaf it issued, and a watermark key into `folder` (keys mode 0600)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(
        _name("unclip TEST C2PA CA (not trusted outside this machine)"),
        _name("unclip TEST C2PA CA (not trusted outside this machine)"),
        ca_key.public_key(),
        ca_key,
        now,
        ca=True,
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(
        _name("unclip TEST C2PA signer"), ca.subject, leaf_key.public_key(), ca_key, now, ca=False
    )
    signer = TestSigner(
        cert=folder / "c2pa-test-signer-chain.pem",
        key=folder / "c2pa-test-signer-key.pem",
        ca=folder / "c2pa-test-ca.pem",
        watermark_key=folder / "watermark-test.key",
    )
    pem = serialization.Encoding.PEM
    signer.cert.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    signer.ca.write_bytes(ca.public_bytes(pem))
    _write_secret(
        signer.key,
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    _write_secret(signer.watermark_key, secrets.token_bytes(32))
    return signer


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "unclip local test"),
        ]
    )


def _certificate(subject, issuer, public_key, signing_key, now, *, ca: bool) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
    return builder.sign(signing_key, hashes.SHA256())


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
