"""What the orchestrator does to every final image: watermark the pixels (before the final safety check, so
the verdict is on what leaves), then write the metadata chunks and sign the C2PA manifest into the PNG.

`Provenance.from_args` reads the settings (unclip/runtime/settings.py, section "provenance"); every part is
off when its setting is off or its secret is missing. Bad secrets stop the start with a message naming the
setting.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unclip.provenance.c2pa_manifest import C2paSigner, ManifestReader, trust_anchors_from_chain
from unclip.provenance.metadata import GenerationRecord, add_text_chunks
from unclip.provenance.verify import Verifier
from unclip.provenance.watermark import Watermark, payload_for

# The orchestrator's flags for provenance (each also an environment variable; docs/operations.md).
PROVENANCE_SETTINGS = [
    "model",
    "provenance_metadata",
    "provenance_prompt",
    "deployment_id",
    "c2pa",
    "c2pa_cert",
    "c2pa_key",
    "c2pa_trust_anchors",
    "c2pa_tsa_url",
    "watermark",
    "watermark_key_file",
    "watermark_min_size",
]


@dataclass
class Provenance:
    """The deployment's provenance parts; None for a part that is off."""

    model: str  # the model's name (its folder's)
    model_sha256: str  # sha256 of its weights manifest ('' when unknown)
    deployment: str  # UNCLIP_DEPLOYMENT_ID
    metadata: bool  # write the PNG text chunks
    prompt: bool  # ... including the prompt
    signer: C2paSigner | None  # C2PA signing
    reader: ManifestReader  # C2PA validation against our trust anchors (Verify)
    watermark: Watermark | None  # the invisible mark
    watermark_min_size: int  # smaller images are not marked (the mark is not reliable there)

    @classmethod
    def from_args(cls, args: Any) -> Provenance:
        """From the parsed settings; ValueError naming the setting when a secret cannot be used."""
        signer = None
        if args.c2pa and (args.c2pa_cert or args.c2pa_key):
            if not (args.c2pa_cert and args.c2pa_key):
                raise ValueError("UNCLIP_C2PA_CERT and UNCLIP_C2PA_KEY must be set together")
            try:
                signer = C2paSigner.from_files(args.c2pa_cert, args.c2pa_key, args.c2pa_tsa_url)
            except Exception as error:  # OSError, c2pa.C2paError: either way the signer is unusable
                raise ValueError(
                    f"UNCLIP_C2PA_CERT / UNCLIP_C2PA_KEY: cannot sign with them: {error}"
                ) from error
        anchors = ""
        if args.c2pa_trust_anchors:
            anchors = _read_text(args.c2pa_trust_anchors, "UNCLIP_C2PA_TRUST_ANCHORS")
        elif args.c2pa_cert:
            anchors = trust_anchors_from_chain(_read_text(args.c2pa_cert, "UNCLIP_C2PA_CERT"))
        watermark = None
        if args.watermark and args.watermark_key_file:
            try:
                key = Path(args.watermark_key_file).read_bytes()
            except OSError as error:
                raise ValueError(f"UNCLIP_WATERMARK_KEY_FILE: cannot read it: {error.strerror}") from error
            watermark = Watermark(key)
        model_name, model_sha256 = model_identity(args.model)
        return cls(
            model=model_name,
            model_sha256=model_sha256,
            deployment=args.deployment_id,
            metadata=args.provenance_metadata,
            prompt=args.provenance_prompt,
            signer=signer,
            reader=ManifestReader(anchors),
            watermark=watermark,
            watermark_min_size=args.watermark_min_size,
        )

    def verifier(self) -> Verifier:
        """What Verify checks with: the same trust anchors, watermark key and deployment id."""
        return Verifier(self.reader, self.watermark, self.deployment, signs=self.signer is not None)

    def marks(self, size: int) -> bool:
        return self.watermark is not None and size >= self.watermark_min_size

    def embed(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """[n, 3, S, S] in [-1, 1] -> the same, watermarked (unchanged when this size is not marked); row i
        carries payload_for(deployment, seeds[i]): the same seed gives the same pixels."""
        if not self.marks(images.shape[-1]):
            return images
        assert self.watermark is not None
        pixels = (images * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float64)
        marked = np.stack(
            [
                self.watermark.embed(p, payload_for(self.deployment, seed))
                for p, seed in zip(pixels, seeds, strict=True)
            ]
        )
        return torch.from_numpy(marked).permute(0, 3, 1, 2).float() * 2.0 - 1.0

    def stamper(
        self, request_id: str, seed: int, size: int, operation: str, stages: dict, prompt: str | None
    ) -> Callable[[bytes, int], bytes]:
        """png, index -> the stamped PNG of one request's image `index` (one creation time per request)."""
        created, marked = now_iso(), self.marks(size)

        def stamp(png: bytes, index: int) -> bytes:
            record = GenerationRecord(
                model=self.model,
                model_sha256=self.model_sha256,
                deployment=self.deployment,
                request_id=request_id,
                index=index,
                seed=seed + index,
                size=size,
                created=created,
                operation=operation,
                stages=stages,
                watermark=marked,
                prompt=prompt,
            )
            return self.stamp(png, record)

        return stamp

    def stamp(self, png: bytes, record: GenerationRecord) -> bytes:
        """Metadata chunks, then the C2PA manifest (signed last: it covers the chunks)."""
        if self.metadata:
            if not self.prompt:
                record.prompt = None
            png = add_text_chunks(png, record.text_chunks())
        if self.signer is not None:
            png = self.signer.sign(png, record)
        return png


def stage_parameters(params: Any, upsampler_stages: list[str]) -> dict[str, dict[str, Any]]:
    """Per stage, what sampled it (services.orchestrator.pipeline.Params, with the upsampler stages run)."""
    stages: dict[str, dict[str, Any]] = {
        "prior": {
            "scheduler": "UnCLIPScheduler",
            "steps": params.prior_num_inference_steps,
            "guidance_scale": params.prior_guidance_scale,
            "num_candidates": params.prior_num_candidates,
        },
        "decoder": {
            "scheduler": "UnCLIPScheduler",
            "steps": params.decoder_num_inference_steps,
            "guidance_scale": params.decoder_guidance_scale,
        },
    }
    for stage, steps in zip(upsampler_stages, params.super_res_num_inference_steps, strict=False):
        stages[stage] = {"scheduler": "UnCLIPScheduler", "steps": steps}
    return stages


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def manifest_sha256(manifest: dict) -> str:
    """The weights hash in every image's provenance: sha256 of the weights manifest (unclip.storage) as
    canonical JSON (sorted keys). The same value for a local folder and for its copy in S3, whatever the
    uploaded file's formatting."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def s3_manifest_sha256(url: str) -> str:
    """manifest_sha256 of the model at `s3://bucket/prefix`, from its unclip-manifest.json: one GET of a small
    object, no weights downloaded (the manifest lists every file's sha256, which fetch_model checks). S3 ETags
    are not used: a multipart upload's ETag is no content hash."""
    from unclip.storage import S3Config, parse_s3_url, read_manifest

    bucket, prefix = parse_s3_url(url)
    manifest, _ = read_manifest(S3Config.from_env().client(), bucket, prefix)
    return manifest_sha256(manifest)


def model_identity(model: str | None) -> tuple[str, str]:
    """(name, sha256 of the weights manifest) of the served model (manifest_sha256: the same value for a
    folder and its copy in S3). A local folder is hashed file by file, or its unclip-manifest.json read when
    present; an s3:// model is named by the URL's last part and hashed from the manifest in the bucket (one
    GET; ValueError naming UNCLIP_MODEL when it cannot be read)."""
    from unclip.storage import MANIFEST_NAME, StorageError, build_manifest

    if not model:
        return "unknown", ""
    if model.startswith("s3://"):
        try:
            digest = s3_manifest_sha256(model)
        except (StorageError, ValueError) as error:
            raise ValueError(f"UNCLIP_MODEL: cannot read the weights manifest of {model}: {error}") from error
        return model.rstrip("/").rsplit("/", 1)[-1], digest
    folder = Path(model)
    if not folder.is_dir():
        return folder.name, ""
    pushed = folder / MANIFEST_NAME
    if pushed.is_file():
        return folder.name, manifest_sha256(json.loads(pushed.read_text()))
    return folder.name, manifest_sha256(build_manifest(folder))


def _read_text(path: str, setting: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as error:
        raise ValueError(f"{setting}: cannot read {path}: {error.strerror}") from error
