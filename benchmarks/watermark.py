"""The invisible watermark's robustness table (unclip/provenance/watermark.py): detection after attacks and
the false-positive rate on images never marked, per size.

    python -m benchmarks.watermark --images 100 --sizes 128,256,1024

Images: renders of the shapes world (`training/world.py`, flat shapes, what the bundled model draws) and
synthetic photos (1/f "pink" noise fields with a few soft blobs: natural-image spectra). Each marked image
carries a random payload; each row says how often the mark was found (score >= THRESHOLD) and how often the
whole payload came back exact. False positives: the same images unmarked, and marked images read with another
key. PSNR of the mark over the marked images (8-bit PNG pixels).
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import PIL.Image
import torch

from unclip.provenance.watermark import THRESHOLD, Watermark


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


def run(size: int, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    mark = Watermark(b"benchmark-key-0123456789abcdef")
    other = Watermark(b"another-key-0123456789abcdefgh")
    sources = world_images(n, size, seed) + synthetic_photos(n, size, seed + 1)
    rows: list[dict] = []
    payloads = [int(p) for p in rng.integers(0, 1 << 16, len(sources))]
    marked = [to_png_image(mark.embed(p, payload)) for p, payload in zip(sources, payloads, strict=True)]
    plain = [to_png_image(p) for p in sources]
    psnr = []
    for m, p in zip(marked, plain, strict=True):
        err = np.asarray(m, dtype=np.float64) - np.asarray(p, dtype=np.float64)
        psnr.append(10 * np.log10(255**2 / max(np.mean(err**2), 1e-12)))
    for name, attack in ATTACKS.items():
        started = time.perf_counter()
        found = exact = 0
        scores = []
        for image, payload in zip(marked, payloads, strict=True):
            result = mark.detect(attack(image, rng))
            scores.append(result.score)
            found += result.found
            exact += result.found and result.payload == payload
        rows.append(
            {"size": size, "attack": name, "images": len(marked), "detected": found / len(marked),
             "payload_exact": exact / len(marked), "min_score": min(scores),
             "median_score": float(np.median(scores)),
             "ms_per_detect": 1000 * (time.perf_counter() - started) / len(marked)}
        )  # fmt: skip
    for name, images, reader in [
        ("unmarked (FP)", plain, mark),
        ("unmarked JPEG q75 (FP)", [jpeg(p, 75) for p in plain], mark),
        ("marked, other key (FP)", marked, other),
    ]:
        scores = [reader.detect(image).score for image in images]
        rows.append(
            {"size": size, "attack": name, "images": len(images),
             "detected": sum(s >= THRESHOLD for s in scores) / len(images), "max_score": max(scores),
             "median_score": float(np.median(scores))}
        )  # fmt: skip
    rows.append({"size": size, "psnr_db_min": min(psnr), "psnr_db_median": float(np.median(psnr))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="per kind (world renders, synthetic photos)")
    parser.add_argument("--sizes", default="64,128,256,1024")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        n = args.images if size <= 256 else max(10, args.images // 10)
        for row in run(size, n, args.seed + size):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
