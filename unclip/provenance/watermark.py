"""An invisible watermark keyed by a secret: a tiled spread-spectrum pattern in the luminance, found again
by folding the image onto one tile and a phase-only matched filter (the JAWS method: Kalker, Depovere, Haitsma
and Maes, "A video watermarking system for broadcast monitoring", SPIE 3657, 1999).

Why this method: the bundled model makes 64-128 px images of flat shapes. `invisible-watermark` refuses images
under 256 px and its dwtDct misreads flat images even unattacked; `trustmark` downloads its weights on first
use (not possible offline). A pattern that repeats every `TILE` pixels survives cropping (the fold still lines
up; the shift is found by the correlation peak), JPEG and downscaling (the pattern is band-limited to
periods of 4-10 px: `BAND`), and it is cheap (one FFT of one tile). No energy at periods over 10 px: there
the eye sees a mark on a flat colour as blotches (the bundled model's pictures are flat colours), and the
detector's median filter removes those scales anyway. BENCHMARKS.md ("Provenance") has the robustness
table that sets `THRESHOLD` and the sizes where the mark is reliable, and the same attacks on
`invisible-watermark` measured beside it ("Beside `invisible-watermark`", `benchmarks/watermark_imw.py`).

The mark: a sync pattern (what detection looks for) plus `PAYLOAD_BITS` patterns whose signs carry the
payload (hashes of the deployment id and of the image's seed). All patterns come from the key, so without the
key the mark can neither be found nor forged. Equal amounts are added to R, G and B (a luminance change only).
Known limits: a rescale other than ~1x or ~0.5x, a rotation, or averaging many marked images (which estimates
the pattern) defeat it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageFilter

TILE = 64  # the pattern repeats every TILE px (images are multiples of it; others fold with a partial tile)
# The pattern's spatial frequencies, cycles per px: periods of 4-10 px. Above 1/4, a 50 % downscale and JPEG
# lose it; below 1/10, it shows on flat colours as blotches of several px (and the detector's 9 px median
# filter drops it). An earlier pattern of smoothed 4 px cells, with most of its energy below 1/10, left 28
# of 40 flat renders with off-palette blotches over 8 px where this one leaves none (BENCHMARKS.md,
# "Provenance").
BAND = (0.1, 0.25)
PAYLOAD_BITS = 16  # bits carried beside the sync pattern
STRENGTH = 2.5  # standard deviation of the added pattern, in 8-bit levels (PSNR ~40 dB before clipping)
THRESHOLD = 7.0  # detection: the sync correlation peak, in standard deviations of the correlation surface
SCALES = (1.0, 2.0)  # detection tries the image as it is and upscaled 2x (a 50 % downscale undone)
MEDIAN = 9  # px, the median filter whose residual detection reads (content suppression)
MEDIAN_MAX_SIDE = 512  # larger images are read without it
SYNC_SHARE = 0.7  # share of the mark's energy in the sync pattern; the rest is split over the payload bits


@dataclass(frozen=True)
class Detection:
    """What `detect` found in one image."""

    found: bool  # the sync peak is above THRESHOLD
    score: float  # the sync peak in standard deviations (the largest over SCALES)
    payload: int | None  # the decoded bits (None when not found)
    scale: float  # the scale at which the peak was found


class Watermark:
    """The mark of one key. Thread-safe: the patterns are computed once and only read."""

    def __init__(self, key: bytes, strength: float = STRENGTH, threshold: float = THRESHOLD):
        if len(key) < 16:
            raise ValueError("watermark key must hold at least 16 bytes")
        self.strength = strength  # std of the mark in 8-bit levels
        self.threshold = threshold  # detection threshold in standard deviations
        seed = int.from_bytes(hmac.new(key, b"unclip-watermark-v2", hashlib.sha256).digest()[:8], "big")
        rng = np.random.default_rng(seed)
        self.patterns = np.stack([_pattern(rng) for _ in range(1 + PAYLOAD_BITS)])  # [1 + K, T, T]
        self._spectra_plain = np.fft.fft2(self.patterns)  # [1 + K, T, T]
        magnitude = np.abs(self._spectra_plain[0])
        self._band = (magnitude > 0.05 * magnitude.max()).astype(np.float64)  # where the sync has energy
        self._phases = np.conj(self._spectra_plain) / np.maximum(np.abs(self._spectra_plain), 1e-9)

    # ---- embedding ----------------------------------------------------------------------------------------

    def mark(self, payload: int) -> np.ndarray:
        """The tile to add for `payload` ([T, T], float, std = strength in 8-bit levels)."""
        signs = np.array([1.0 if (payload >> bit) & 1 else -1.0 for bit in range(PAYLOAD_BITS)])
        sync = np.sqrt(SYNC_SHARE) * self.patterns[0]
        bits = np.sqrt((1 - SYNC_SHARE) / PAYLOAD_BITS) * np.tensordot(signs, self.patterns[1:], axes=1)
        tile = sync + bits
        return tile * (self.strength / tile.std())

    def embed(self, pixels: np.ndarray, payload: int) -> np.ndarray:
        """pixels: float [H, W, 3] in [0, 1] -> marked, clipped to [0, 1] (the same dtype)."""
        height, width = pixels.shape[:2]
        tile = self.mark(payload) / 255.0
        reps = (-(-height // TILE), -(-width // TILE))
        field = np.tile(tile, reps)[:height, :width, None].astype(pixels.dtype)
        return np.clip(pixels + field, 0.0, 1.0)

    # ---- detection ----------------------------------------------------------------------------------------

    def detect(self, image: PIL.Image.Image) -> Detection:
        """Looks for the mark at every scale in SCALES; the strongest peak decides."""
        best = Detection(found=False, score=0.0, payload=None, scale=1.0)
        residual = _residual(image)
        for scale in SCALES:
            luma = _scaled(residual, scale)
            if min(luma.shape) < TILE:
                continue
            score, payload = self._detect_luma(luma)
            if score > best.score:
                best = Detection(
                    score >= self.threshold, score, payload if score >= self.threshold else None, scale
                )
        return best

    def _detect_luma(self, luma: np.ndarray) -> tuple[float, int]:
        folded = _fold(luma)
        spectrum = np.fft.fft2(folded - folded.mean())
        # Phase correlation over the pattern's band: each frequency counts once, whatever the content's
        # energy there (flat shapes and photos alike), and frequencies the pattern lacks add no noise.
        weight = self._band / np.maximum(np.abs(spectrum), 1e-9)
        sync = np.real(np.fft.ifft2(spectrum * weight * self._phases[0]))
        peak = np.unravel_index(int(np.argmax(sync)), sync.shape)
        others = np.delete(sync.ravel(), np.ravel_multi_index(peak, sync.shape))
        score = float((sync[peak] - others.mean()) / max(others.std(), 1e-12))
        return score, self._payload(spectrum, weight, peak)

    def _payload(self, spectrum: np.ndarray, weight: np.ndarray, peak: tuple) -> int:
        """Weighted least squares for every pattern's amplitude at the found shift (over the band's
        frequencies, through the normal equations: 1 + K unknowns); the bits are the signs."""
        freq = np.fft.fftfreq(TILE)
        shift = np.exp(-2j * np.pi * (freq[:, None] * peak[0] + freq[None, :] * peak[1]))
        band = weight > 0
        design = self._spectra_plain[:, band] * (shift * weight)[band][None]  # [1 + K, bins]
        target = (spectrum * weight)[band]
        normal = np.real(design.conj() @ design.T)
        amplitudes = np.linalg.solve(normal, np.real(design.conj() @ target))
        return sum(1 << bit for bit in range(PAYLOAD_BITS) if amplitudes[1 + bit] > 0)


def payload_for(deployment_id: str, seed: int) -> int:
    """The PAYLOAD_BITS carried: 4 bits of the deployment id's hash, 12 of the image's seed's.

    The image's seed, not the request id: a request repeated with the same seed must give the same pixels
    (outputs are reproducible by seed), and the seed leads to the request through the metadata, the C2PA
    manifest and the audit log."""
    deployment = hashlib.sha256(deployment_id.encode()).digest()[0] & 0xF
    image = int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:2], "big") & 0xFFF
    return deployment | (image << 4)


def _pattern(rng: np.random.Generator) -> np.ndarray:
    """A zero-mean, unit-std random field of TILE x TILE px, periodic (no seams where tiles meet), white noise
    band-passed to `BAND` with soft (linear, 20 %) edges."""
    low, high = BAND
    freq = np.fft.fftfreq(TILE)
    radius = np.hypot(freq[:, None], freq[None, :])
    rise = np.clip((radius - 0.8 * low) / (0.4 * low), 0, 1)
    fall = np.clip((1.2 * high - radius) / (0.4 * high), 0, 1)
    gain = rise * fall
    field = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((TILE, TILE))) * gain))
    field -= field.mean()
    return field / field.std()


def _residual(image: PIL.Image.Image) -> np.ndarray:
    """The luminance minus its median-filtered self: flat areas and clean edges (what the shapes world is made
    of) drop out, the fine-grained mark stays. Without it large flat shapes with strong edges hid the mark in
    15 % of 128 px renders after JPEG q75 (BENCHMARKS.md, "Provenance"). Images over MEDIAN_MAX_SIDE px skip
    the filter (its cost grows with the area, and there the fold averages enough content away)."""
    rgb = image.convert("RGB")
    luma = np.asarray(rgb, dtype=np.float64).mean(axis=2)  # the mark is equal in R, G and B
    if max(rgb.size) > MEDIAN_MAX_SIDE:
        return luma - luma.mean()
    median = np.asarray(rgb.filter(PIL.ImageFilter.MedianFilter(MEDIAN)), dtype=np.float64).mean(axis=2)
    return luma - median


def _scaled(residual: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return residual
    height, width = residual.shape
    field = PIL.Image.fromarray(residual.astype(np.float32), mode="F")
    size = (round(width * scale), round(height * scale))
    return np.asarray(field.resize(size, PIL.Image.Resampling.BICUBIC), dtype=np.float64)


def _fold(luma: np.ndarray) -> np.ndarray:
    """The image summed onto one TILE x TILE tile (position mod TILE), each position averaged."""
    height, width = luma.shape
    ys, xs = np.mgrid[0:height, 0:width]
    index = (ys % TILE) * TILE + (xs % TILE)
    sums = np.bincount(index.ravel(), weights=luma.ravel(), minlength=TILE * TILE)
    counts = np.bincount(index.ravel(), minlength=TILE * TILE)
    return (sums / np.maximum(counts, 1)).reshape(TILE, TILE)
