"""C2PA content credentials with `c2pa-python` (the Content Authenticity Initiative's library).

Signing: one manifest per PNG with the `c2pa.created` action, digital source type `trainedAlgorithmicMedia`,
the generator's name and version and the deployment's model, signed with the deployment's key and
certificate chain (ES256). No thumbnail (it would add up to ~400 KB to a 128 px PNG). The manifest's hash
binding covers every byte of the PNG but its own chunk, the metadata chunks included, so they are written
first.

Reading: c2pa's Reader validates the signature, the certificate chain against our trust anchors, and the hash
binding. `check_manifest` sorts the outcome into what `unclip verify` needs: is there a manifest, was it
signed by a certificate we trust (ours), and is it intact.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import c2pa

from unclip.provenance import GENERATOR, VERSION
from unclip.provenance.metadata import DIGITAL_SOURCE_TYPE, GenerationRecord

PNG = "image/png"
SIGNER_TRUSTED = "signingCredential.trusted"


@dataclass
class C2paSigner:
    """Signs PNGs with one certificate chain and key (read once at start). Thread-safe: every call builds its
    own c2pa Signer, Context and Builder (a c2pa Signer is consumed by use)."""

    cert_chain: str  # PEM, leaf first
    private_key: str  # PEM
    tsa_url: str | None = None  # RFC 3161 time-stamp authority, or none

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, tsa_url: str = "") -> C2paSigner:
        """Reads the PEM files and signs a probe image, so a bad signer stops the start, not a request."""
        signer = cls(Path(cert).read_text(), Path(key).read_text(), tsa_url or None)
        probe = _probe_png()
        signer.sign(probe, None)
        return signer

    def sign(self, png: bytes, record: GenerationRecord | None) -> bytes:
        """The PNG with a signed, embedded C2PA manifest."""
        builder_settings = c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}})
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(
                c2pa.C2paSigningAlg.ES256, self.cert_chain.encode(), self.private_key.encode(), self.tsa_url
            )
        )
        out = io.BytesIO()
        with (
            c2pa.Context(settings=builder_settings) as context,
            c2pa.Builder(_manifest(record), context) as b,
        ):
            b.sign(signer, PNG, io.BytesIO(png), out)
        signer.close()
        return out.getvalue()


def _manifest(record: GenerationRecord | None) -> dict[str, Any]:
    agent = {"name": GENERATOR, "version": VERSION}
    action: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": DIGITAL_SOURCE_TYPE,
        "softwareAgent": agent,
    }
    manifest: dict[str, Any] = {
        "claim_generator_info": [agent],
        "title": "unclip image",
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [action]}}],
    }
    if record is not None:
        manifest["title"] = f"{record.request_id}-{record.index}.png"
        action["parameters"] = {
            "model": record.model,
            "model_sha256": record.model_sha256,
            "deployment": record.deployment,
            "request_id": record.request_id,
            "index": record.index,
        }
    return manifest


@dataclass(frozen=True)
class ManifestCheck:
    """What c2pa's Reader found in one file."""

    present: bool  # a C2PA manifest is embedded
    ours: bool  # signed by a certificate chaining to our trust anchors
    intact: bool  # every validation check passed (signature, chain, hash binding)
    state: str  # c2pa's validation state: "Trusted", "Valid", "Invalid", or "" when absent
    failures: tuple[str, ...] = ()  # c2pa's failure codes, e.g. "assertion.dataHash.mismatch"
    generator: str = ""  # the claim generator's name
    signer: str = ""  # the signing certificate's common name


class ManifestReader:
    """Validates manifests against a fixed set of trust anchors (PEM text; '' trusts nothing)."""

    def __init__(self, trust_anchors_pem: str):
        self.trust_anchors_pem = trust_anchors_pem

    def _context(self) -> c2pa.Context:
        config: dict[str, Any] = {"verify": {"verify_trust": True}}
        if self.trust_anchors_pem:
            config["trust"] = {"trust_anchors": self.trust_anchors_pem}
        return c2pa.Context(settings=c2pa.Settings.from_dict(config))

    def check(self, data: bytes, mime: str = PNG) -> ManifestCheck:
        try:
            with self._context() as context, c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
                state = reader.get_validation_state() or ""
                results = reader.get_validation_results() or {}
                manifest = reader.get_active_manifest() or {}
        except c2pa.C2paError as error:
            if "ManifestNotFound" in type(error).__name__ or "no JUMBF" in str(error):
                return ManifestCheck(present=False, ours=False, intact=False, state="")
            # A manifest that cannot even be parsed: present, broken, not attributable.
            return ManifestCheck(True, False, False, "Invalid", failures=(f"unreadable: {error}",))
        active = results.get("activeManifest", {})
        successes = {entry.get("code") for entry in active.get("success", [])}
        failures = tuple(entry.get("code", "") for entry in active.get("failure", []))
        generators = manifest.get("claim_generator_info") or [{}]
        return ManifestCheck(
            present=True,
            ours=SIGNER_TRUSTED in successes,
            intact=state == "Trusted" and not failures,
            state=state,
            failures=failures,
            generator=str(generators[0].get("name", "")),
            signer=str((manifest.get("signature_info") or {}).get("common_name", "")),
        )


def trust_anchors_from_chain(chain_pem: str) -> str:
    """The CA certificates of a signer chain (every certificate after the leaf), as PEM."""
    marker = "-----END CERTIFICATE-----"
    certs = [part.strip() + "\n" + marker + "\n" for part in chain_pem.split(marker) if part.strip()]
    return "".join(certs[1:])


def manifest_json(data: bytes) -> dict[str, Any] | None:
    """The active manifest as a dict (no trust check), for display; None when absent or unreadable."""
    try:
        with c2pa.Reader(PNG, io.BytesIO(data)) as reader:
            return json.loads(reader.json())
    except c2pa.C2paError:
        return None


def _probe_png() -> bytes:
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8), "gray").save(buffer, format="PNG")
    return buffer.getvalue()
