"""Is this image ours, and is it as we made it? The one check behind `unclip verify`, the orchestrator's
Verify RPC and the HTTP gateway's `POST /v1/content_provenance_checks` (no transport here).

    verifier = Verifier(reader, watermark, deployment)     # or Provenance.verifier() in the orchestrator
    result = verify_png(file_bytes, verifier)              # PNG, JPEG or WebP bytes
    result.verdict        # "intact" | "altered" | "not_ours"
    result.exit_code      # 0 | 6 | 7 (the CLI's)
    result.to_dict()      # JSON-ready, with c2pa's `validation_state`

The rules, strongest evidence first:
- a C2PA manifest signed by a certificate chaining to our trust anchors: "intact" when every check passes
  (signature, chain, hash binding: one changed pixel byte or metadata chunk breaks it), else "altered";
- no manifest of ours but our watermark is found: "altered" (the manifest was stripped, e.g. by a re-save, a
  screenshot or a JPEG conversion; the pixels still carry our mark). A deployment that signs nothing calls
  such an image "intact" with integrity unattested;
- neither: "not_ours". Metadata chunks alone prove nothing (anyone can write them); they are reported, never
  trusted. A valid manifest from another signer is reported as someone else's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from unclip.provenance.c2pa_manifest import ManifestCheck, ManifestReader
from unclip.provenance.metadata import PREFIX, read_text
from unclip.provenance.watermark import Detection, Watermark, payload_for
from unclip.runtime.images import decode_image

INTACT, ALTERED, NOT_OURS = "intact", "altered", "not_ours"
EXIT_CODES = {INTACT: 0, ALTERED: 6, NOT_OURS: 7}
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class Verifier:
    """What a deployment checks with: its trust anchors, its watermark key, its id."""

    reader: ManifestReader  # C2PA validation against our trust anchors
    watermark: Watermark | None  # None: the deployment marks nothing, the check is skipped
    deployment: str  # UNCLIP_DEPLOYMENT_ID (the watermark payload's first bits)
    signs: bool = True  # this deployment signs C2PA manifests (no manifest + our mark = stripped)


@dataclass
class VerifyResult:
    verdict: str  # INTACT, ALTERED or NOT_OURS
    summary: str  # one line for people
    validation_state: str  # c2pa's: "Trusted", "Valid", "Invalid", or "" without a manifest
    manifest: ManifestCheck
    watermark: Detection | None  # None when the deployment has no watermark key
    watermark_payload_matches: bool | None  # the mark's payload vs the seed the file's metadata claims
    metadata: dict[str, str] = field(default_factory=dict)  # the file's unclip:* text chunks (unverified)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def request_id(self) -> str:
        return self.metadata.get(PREFIX + "request_id", "")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["exit_code"] = self.exit_code
        return record


def verify_png(data: bytes, verifier: Verifier) -> VerifyResult:
    """Checks one image file's bytes; ValueError ("image ...") when they are not an image."""
    image = decode_image(data, "image")
    mime = MIME.get(image.format or "", "image/png")
    manifest = verifier.reader.check(data, mime)
    detection = verifier.watermark.detect(image) if verifier.watermark is not None else None
    metadata = (
        {k: v for k, v in read_text(data).items() if k.startswith(PREFIX)} if mime == MIME["PNG"] else {}
    )
    matches = _payload_matches(detection, metadata, verifier.deployment)
    marked = detection is not None and detection.found
    if manifest.present and manifest.ours:
        verdict = INTACT if manifest.intact else ALTERED
        why = (
            "C2PA manifest signed by us, valid"
            if manifest.intact
            else f"C2PA manifest signed by us, broken ({', '.join(manifest.failures) or manifest.state})"
        )
    elif marked:
        verdict = ALTERED if verifier.signs else INTACT
        why = (
            "our watermark, but our C2PA manifest is missing or replaced (stripped or re-encoded)"
            if verifier.signs
            else "our watermark (this deployment signs no manifest: integrity not attested)"
        )
    else:
        verdict = NOT_OURS
        why = "no manifest of ours and no watermark of ours"
        if manifest.present:
            why += f" (a C2PA manifest from {manifest.signer or 'another signer'}: {manifest.state})"
        elif metadata:
            why += " (unclip metadata chunks present, unverifiable on their own)"
    if detection is not None:
        why += f"; watermark {'found' if marked else 'not found'} (score {detection.score:.1f})"
    else:
        why += "; watermark not checked (no key)"
    return VerifyResult(verdict, f"{verdict}: {why}", manifest.state, manifest, detection, matches, metadata)


def _payload_matches(detection: Detection | None, metadata: dict[str, str], deployment: str) -> bool | None:
    seed = metadata.get(PREFIX + "seed", "")
    if detection is None or not detection.found or not seed.isdigit():
        return None
    return detection.payload == payload_for(deployment, int(seed))
