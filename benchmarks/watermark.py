"""The invisible watermark's robustness table (unclip/provenance/watermark.py): detection after attacks and
the false-positive rate on images never marked, per size; with `--method dwtDct|dwtDctSvd` the same table for
`invisible-watermark` (benchmarks/watermark_imw.py says how to install it beside the project's environment).

    python -m benchmarks.watermark --images 100 --sizes 128,256,1024
    PYTHONPATH=$PWD:/tmp/wmsite python -m benchmarks.watermark --method dwtDct --images 50 --sizes 256,1024

Images: renders of the shapes world (`training/world.py`, flat shapes, what the bundled model draws) and
synthetic photos (1/f "pink" noise fields with a few soft blobs: natural-image spectra). Each marked image
carries a random 16-bit payload (the same images and payloads for every method); each row says how often the
mark was found and how often the whole payload came back exact. Ours: found = sync score >= THRESHOLD.
invisible-watermark: found = all 16 decoded bits equal the embedded ones (it has no other evidence of a mark).
False positives: the same images unmarked (read for the payload their marked twin carries), unmarked after
JPEG q75, and marked images read with another key (ours only: invisible-watermark has no key). PSNR of the
mark over the marked images (8-bit PNG pixels). `--markdown` prints the table rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from typing import NamedTuple, Protocol

import numpy as np
import PIL.Image
import torch

from unclip.provenance.watermark import PAYLOAD_BITS, Watermark


def world_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    from training.world import render, sample_scenes

    scenes = sample_scenes(n, generator=torch.Generator().manual_seed(seed))
    pixels = (render(scenes, size) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [p.astype(np.float64) for p in pixels]


def synthetic_photos(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    freq = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    freq[0, 0] = 1.0
    images = []
    for _ in range(n):
        channels = []
        for _ in range(3):
            spectrum = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))) / freq
            field = np.real(np.fft.ifft2(spectrum))
            channels.append((field - field.min()) / (np.ptp(field) + 1e-9))
        image = 0.5 * np.stack(channels, axis=-1) + 0.25
        images.append(np.clip(image, 0, 1))
    return images


def to_png_image(pixels: np.ndarray) -> PIL.Image.Image:
    array = (pixels * 255).round().astype("uint8")
    return PIL.Image.fromarray(array)


def jpeg(image: PIL.Image.Image, quality: int) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return PIL.Image.open(io.BytesIO(buffer.getvalue()))


def crop(image: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    """10 % off the side: a random 90 % x 90 % window."""
    w, h = image.size
    cw, ch = round(0.9 * w), round(0.9 * h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch))


ATTACKS = {
    "none (PNG)": lambda im, rng: im,
    "JPEG q90": lambda im, rng: jpeg(im, 90),
    "JPEG q75": lambda im, rng: jpeg(im, 75),
    "JPEG q50": lambda im, rng: jpeg(im, 50),
    "resize 50 %": lambda im, rng: im.resize((im.width // 2, im.height // 2), PIL.Image.Resampling.LANCZOS),
    "crop 10 %": crop,
}


class Refused(Exception):
    """The method declined the image (invisible-watermark's size check)."""


FALSE_POSITIVES = ("unmarked (FP)", "unmarked JPEG q75 (FP)", "marked, other key (FP)")


class Reading(NamedTuple):
    found: bool  # the method says the image carries its mark
    exact: bool  # ... and the whole payload came back
    score: float  # ours: the sync peak in standard deviations; invisible-watermark: bits matched
    refused: bool = False  # the library declined the image (invisible-watermark's size check)


class Method(Protocol):
    def embed(self, pixels: np.ndarray, payload: int) -> np.ndarray: ...  # float [H, W, 3] -> uint8 RGB
    def read(self, image: PIL.Image.Image, payload: int) -> Reading: ...
    def foreign(self) -> Method | None: ...  # the same method under another key (None: it has no key)


class Ours:
    """unclip's keyed tiled spread-spectrum mark."""

    def __init__(self, key: bytes = b"benchmark-key-0123456789abcdef"):
        self.mark = Watermark(key)

    def embed(self, pixels: np.ndarray, payload: int) -> np.ndarray:
        return (self.mark.embed(pixels, payload) * 255).round().astype("uint8")

    def read(self, image: PIL.Image.Image, payload: int) -> Reading:
        result = self.mark.detect(image)
        return Reading(result.found, result.found and result.payload == payload, result.score)

    def foreign(self) -> Method | None:
        return Ours(b"another-key-0123456789abcdefgh")


class Imw:
    """invisible-watermark through benchmarks.watermark_imw (imported only when asked for)."""

    def __init__(self, method: str, check_size: bool):
        from benchmarks import watermark_imw

        self.imw = watermark_imw
        self.inner = watermark_imw.ImWatermark(method, check_size)

    def embed(self, pixels: np.ndarray, payload: int) -> np.ndarray:
        try:
            return self.inner.embed(pixels, payload)
        except self.imw.Refused as error:
            raise Refused(str(error)) from error

    def read(self, image: PIL.Image.Image, payload: int) -> Reading:
        found, matched, refused = self.inner.read(image, payload)
        return Reading(found, found, matched, refused)

    def foreign(self) -> Method | None:
        return None


def make_method(name: str, check_size: bool = True) -> Method:
    return Ours() if name == "ours" else Imw(name, check_size)


def run(method: Method, size: int, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    sources = world_images(n, size, seed) + synthetic_photos(n, size, seed + 1)
    payloads = [int(p) for p in rng.integers(0, 1 << PAYLOAD_BITS, len(sources))]
    started = time.perf_counter()
    try:
        marked = [
            PIL.Image.fromarray(method.embed(p, payload))
            for p, payload in zip(sources, payloads, strict=True)
        ]
    except Refused as error:  # recorded as the size's row: what the library does at this size
        return [{"size": size, "images": len(sources), "embed_refused": f"{type(error).__name__}: {error}"}]
    ms_per_embed = 1000 * (time.perf_counter() - started) / len(sources)
    plain = [to_png_image(p) for p in sources]
    psnr = []
    for m, p in zip(marked, plain, strict=True):
        err = np.asarray(m, dtype=np.float64) - np.asarray(p, dtype=np.float64)
        psnr.append(10 * np.log10(255**2 / max(np.mean(err**2), 1e-12)))
    rows: list[dict] = []
    for name, attack in ATTACKS.items():
        started = time.perf_counter()
        readings = [
            method.read(attack(image, rng), payload) for image, payload in zip(marked, payloads, strict=True)
        ]
        rows.append(
            _row(size, name, readings)
            | {"ms_per_detect": 1000 * (time.perf_counter() - started) / len(marked)}
        )
    other = method.foreign()
    for name, images, reader in [
        (FALSE_POSITIVES[0], plain, method),
        (FALSE_POSITIVES[1], [jpeg(p, 75) for p in plain], method),
        (FALSE_POSITIVES[2], marked, other),
    ]:
        if reader is None:
            rows.append(
                {"size": size, "attack": name, "images": len(images), "detected": None, "note": "no key"}
            )
            continue
        readings = [reader.read(image, payload) for image, payload in zip(images, payloads, strict=True)]
        rows.append(_row(size, name, readings))
    rows.append({"size": size, "psnr_db_min": min(psnr), "psnr_db_median": float(np.median(psnr)),
                 "ms_per_embed": ms_per_embed})  # fmt: skip
    return rows


def _row(size: int, attack: str, readings: list[Reading]) -> dict:
    """The first half of `readings` are world renders, the second half synthetic photos (as in `run`)."""
    scores = [r.score for r in readings]
    count, half = len(readings), len(readings) // 2
    found, exact = sum(r.found for r in readings), sum(r.exact for r in readings)
    return {"size": size, "attack": attack, "images": count, "detected": found / count,
            "payload_exact": exact / count, "refused": sum(r.refused for r in readings),
            "detected_world": sum(r.found for r in readings[:half]) / half,
            "detected_photos": sum(r.found for r in readings[half:]) / (count - half),
            "min_score": min(scores), "median_score": float(np.median(scores)), "max_score": max(scores),
            "mean_score": float(np.mean(scores))}  # fmt: skip


def markdown(method: str, rows: list[dict]) -> str:
    """One BENCHMARKS.md table row per size: attacks as `found % (exact %)`, false positives as
    `found/images (max score)`, then the median PSNR."""
    bits = method != "ours"  # invisible-watermark's score is bits matched; found and exact are one
    lines = []
    for size in sorted({r["size"] for r in rows}):
        of_size = [r for r in rows if r["size"] == size]
        if "embed_refused" in of_size[0]:
            lines.append(
                f"| {method} | {size} px ({of_size[0]['images']}) | refused: {of_size[0]['embed_refused']} |"
            )
            continue
        cells = []
        for r in of_size:
            if r.get("attack") in ATTACKS:
                cell = f"{r['detected']:.0%}" if bits else f"{r['detected']:.0%} ({r['payload_exact']:.0%})"
                cells.append(cell + (f", {r['refused']} refused" if r["refused"] else ""))
            elif r.get("attack") in FALSE_POSITIVES:
                if r["detected"] is None:
                    cells.append("— (no key)")
                    continue
                top = f"{r['max_score']:.0f}/{PAYLOAD_BITS} bits" if bits else f"{r['max_score']:.1f}"
                cells.append(f"{round(r['detected'] * r['images'])}/{r['images']} (max {top})")
        psnr = next(r["psnr_db_median"] for r in of_size if "psnr_db_median" in r)
        images = of_size[0]["images"]
        lines.append(f"| {method} | {size} px ({images}) | " + " | ".join(cells) + f" | {psnr:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="per kind (world renders, synthetic photos)")
    parser.add_argument("--sizes", default="64,128,256,1024")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=("ours", "dwtDct", "dwtDctSvd"), default="ours")
    parser.add_argument(
        "--no-size-check",
        action="store_true",
        help="invisible-watermark: call its embedder classes directly, past the 256x256 check of its wrapper",
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table rows for BENCHMARKS.md")
    args = parser.parse_args()
    method = make_method(args.method, check_size=not args.no_size_check)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        n = args.images if size <= 256 else max(10, args.images // 10)
        for row in run(method, size, n, args.seed + size):
            print(json.dumps({"method": args.method} | row), flush=True)
            rows.append(row)
    if args.markdown:
        label = args.method + (" (no size check)" if args.no_size_check else "")
        print(markdown(label, rows))


if __name__ == "__main__":
    main()
