"""The provenance parts in process (no stack): metadata chunks leave the pixels alone and carry the prompt
only when asked; verify's rules on files signed by us, by someone else, carrying only metadata or only the
mark; bad secrets stop the start naming the setting."""

from __future__ import annotations

import io
import types

import numpy as np
import PIL.Image
import pytest
import torch

from unclip.provenance.c2pa_manifest import C2paSigner, ManifestReader
from unclip.provenance.certs import mint_test_signer
from unclip.provenance.metadata import GenerationRecord, add_text_chunks
from unclip.provenance.stamp import PROVENANCE_SETTINGS, Provenance
from unclip.provenance.verify import Verifier, verify_png
from unclip.provenance.watermark import Watermark, payload_for
from unclip.runtime import settings
from unclip.runtime.images import encode_png


@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    return mint_test_signer(tmp_path_factory.mktemp("ours")), mint_test_signer(
        tmp_path_factory.mktemp("theirs")
    )


def args(**overrides):
    values = {name: settings.SETTINGS[name].default for name in PROVENANCE_SETTINGS}
    return types.SimpleNamespace(**{**values, **overrides})


def flat_png(size: int = 128) -> bytes:
    """A flat-shapes-like picture: two colours, one square."""
    pixels = torch.full((size, size, 3), 0.3)
    pixels[size // 4 : size // 2, size // 4 : size // 2] = torch.tensor([0.9, 0.2, 0.2])
    return encode_png(pixels)


def record(prompt: str | None = "a red square") -> GenerationRecord:
    created = "2026-12-06T00:00:00.000Z"
    return GenerationRecord("toy", "0" * 64, "unclip", "req", 0, 5, 128, created, "generate", prompt=prompt)


def test_metadata_keeps_the_pixels_and_writes_the_prompt_only_when_asked(signers):
    ours, _ = signers
    png = flat_png()
    quiet = Provenance.from_args(args(model=None)).stamp(png, record())
    loud = Provenance.from_args(args(provenance_prompt=True)).stamp(png, record())
    for stamped in (quiet, loud):
        assert np.array_equal(
            np.asarray(PIL.Image.open(io.BytesIO(stamped))), np.asarray(PIL.Image.open(io.BytesIO(png)))
        )
    assert "unclip:prompt" not in PIL.Image.open(io.BytesIO(quiet)).text
    assert "a red square" not in PIL.Image.open(io.BytesIO(quiet)).text["unclip:parameters"]
    assert PIL.Image.open(io.BytesIO(loud)).text["unclip:prompt"] == "a red square"
    off = Provenance.from_args(
        args(provenance_metadata=False, c2pa_cert=str(ours.cert), c2pa_key=str(ours.key))
    )
    assert PIL.Image.open(io.BytesIO(off.stamp(png, record()))).text == {}  # C2PA only


def test_verify_rules(signers):
    ours, theirs = signers
    mark = Watermark(ours.watermark_key.read_bytes())
    verifier = Verifier(ManifestReader(ours.ca.read_text()), mark, "unclip")
    png = flat_png()
    mine = C2paSigner.from_files(ours.cert, ours.key).sign(
        add_text_chunks(png, record().text_chunks()), record()
    )
    foreign = C2paSigner.from_files(theirs.cert, theirs.key).sign(png, None)
    only_metadata = add_text_chunks(png, record().text_chunks())
    pixels = np.asarray(PIL.Image.open(io.BytesIO(png)), dtype=np.float64) / 255
    only_mark = encode_png(torch.from_numpy(mark.embed(pixels, payload_for("unclip", 5)).astype(np.float32)))

    assert verify_png(mine, verifier).verdict == "intact"
    result = verify_png(foreign, verifier)
    assert (
        result.verdict == "not_ours"
        and result.validation_state == "Valid"
        and "another" not in result.summary
    )
    assert "unclip TEST C2PA signer" in result.summary  # someone else's valid manifest is named, not trusted
    assert verify_png(only_metadata, verifier).verdict == "not_ours"  # chunks alone prove nothing
    stripped = verify_png(only_mark, verifier)
    assert stripped.verdict == "altered" and stripped.exit_code == 6 and stripped.watermark.found
    unsigned = Verifier(ManifestReader(""), mark, "unclip", signs=False)
    assert verify_png(only_mark, unsigned).verdict == "intact"  # a deployment that signs nothing
    with pytest.raises(ValueError, match="^image"):
        verify_png(b"not an image", verifier)


def test_bad_secrets_stop_the_start_naming_the_setting(signers, tmp_path):
    ours, _ = signers
    with pytest.raises(ValueError, match="UNCLIP_C2PA_CERT and UNCLIP_C2PA_KEY"):
        Provenance.from_args(args(c2pa_cert=str(ours.cert)))
    with pytest.raises(ValueError, match="UNCLIP_C2PA_CERT / UNCLIP_C2PA_KEY"):
        Provenance.from_args(args(c2pa_cert=str(ours.cert), c2pa_key=str(ours.ca)))  # a certificate, no key
    with pytest.raises(ValueError, match="UNCLIP_WATERMARK_KEY_FILE"):
        Provenance.from_args(args(watermark_key_file=str(tmp_path / "missing")))
    secrets = dict(
        c2pa_cert=str(ours.cert), c2pa_key=str(ours.key), watermark_key_file=str(ours.watermark_key)
    )
    off = Provenance.from_args(args(c2pa=False, watermark=False, **secrets))
    assert off.signer is None and off.watermark is None


def test_the_mark_leaves_flat_pictures_clean_and_survives_jpeg_and_halving():
    """The bundled model draws flat colours: the mark must not show on them as off-palette blotches (the
    strict reader's cleanliness, training/outline.py: no blob over 8 px beyond 0.06 of the palette colour),
    and it must still be found at 128 px after JPEG q50 and a 50 % downscale (BENCHMARKS.md, "Provenance":
    100 %). The earlier pattern of smoothed 4 px cells left 9 of these 24 renders unclean."""
    from training.outline import cleanliness, read_colours
    from training.world import render, sample_scenes

    mark = Watermark(b"flat-pictures-key-0123456789abcdef")
    scenes = sample_scenes(24, torch.Generator().manual_seed(3))
    renders = (render(scenes, 128) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float64)
    clean, jpeg_found, half_found = 0, 0, 0
    for i, pixels in enumerate(renders):
        marked = PIL.Image.fromarray(np.round(mark.embed(pixels, i) * 255).astype(np.uint8))
        rgb = torch.from_numpy(np.asarray(marked, dtype=np.float32) / 255).permute(2, 0, 1)
        clean += cleanliness(rgb, *read_colours(rgb))["clean"]
        buffer = io.BytesIO()
        marked.save(buffer, "JPEG", quality=50)
        jpeg_found += mark.detect(PIL.Image.open(buffer)).found
        half_found += mark.detect(marked.resize((64, 64), PIL.Image.Resampling.BICUBIC)).found
    assert clean == 24, clean
    assert jpeg_found >= 23 and half_found >= 23, (jpeg_found, half_found)
