"""`invisible-watermark` (the `imwatermark` module) as a method of `benchmarks.watermark`: its `dwtDct` and
`dwtDctSvd` embedders with the same 16-bit payload as unclip's mark, read back the way its README shows.

Measured with invisible-watermark 0.2.0, opencv-python-headless 5.1.0.95, PyWavelets 1.9.0 (the extra
`bench-watermark` in pyproject.toml). They are not in the project's environment; install them apart and put
them on the path, e.g.

    python -m pip install --target /tmp/wmsite --no-deps invisible-watermark==0.2.0 \\
        opencv-python-headless==5.1.0.95 PyWavelets==1.9.0
    PYTHONPATH=$PWD:/tmp/wmsite python -m benchmarks.watermark --method dwtDct

(`--no-deps`: the package asks for opencv-python with its GUI libraries and for torch, which the environment
already has; only its `rivaGan` method uses torch, with onnxruntime, and it carries 32 bits only.)

"Found" for this library means the decoded bits equal the embedded ones, all 16: it has no key and no sync
signal, so the only evidence of a mark is a payload the reader already expects (here the reader is told the
image's payload, as a verifier would be that reads the seed from the PNG's metadata). The library's
`WatermarkEncoder`/`WatermarkDecoder` refuse images of fewer than 256 x 256 pixels (an area check: 230 x 230
is refused too); with `check_size=False` its embedder classes are called directly, without that check.
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from unclip.provenance.watermark import PAYLOAD_BITS, SCALES

METHODS = ("dwtDct", "dwtDctSvd")
# Images this large are read as they are only: a 2x read (2048 px) costs ~1 s of CPU with dwtDctSvd, and a
# mark made at the image's own size sits on an 8 px block grid that the upscale doubles, so that read can
# only add chance matches. Smaller images (a 1024 px image downscaled 50 %, say) get the 2x read.
UPSCALE_BELOW = 1024


class Refused(Exception):
    """The library declined the image (its size check)."""


def payload_bits(payload: int) -> list[int]:
    return [(payload >> bit) & 1 for bit in range(PAYLOAD_BITS)]


class ImWatermark:
    """One imwatermark method; `embed` and `read` speak RGB pixels, the library speaks BGR uint8 (OpenCV)."""

    def __init__(self, method: str, check_size: bool = True):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        self.method = method
        self.check_size = check_size
        try:
            import imwatermark  # noqa: F401
        except ImportError as error:  # not in the project's environment by design: say where it comes from
            raise SystemExit(f"{error}: install the extra bench-watermark apart (see {__file__})") from error

    def embed(self, pixels: np.ndarray, payload: int) -> np.ndarray:
        """pixels: float [H, W, 3] in [0, 1] -> marked uint8 [H, W, 3] RGB."""
        bgr = np.ascontiguousarray((pixels * 255).round().astype("uint8")[..., ::-1])
        bits = payload_bits(payload)
        if self.check_size:
            from imwatermark import WatermarkEncoder

            encoder = WatermarkEncoder()
            encoder.set_watermark("bits", bits)
            try:
                out = encoder.encode(bgr, self.method)
            except RuntimeError as error:  # "image too small, should be larger than 256x256"
                raise Refused(str(error)) from error
        else:
            out = self._embedder(bits).encode(bgr)
        return np.ascontiguousarray(out[..., ::-1])

    def read(self, image: PIL.Image.Image, payload: int) -> tuple[bool, float, bool]:
        """(found, bits matched out of PAYLOAD_BITS, refused at every scale): the image as it is and,
        under UPSCALE_BELOW px, upscaled 2x (what unclip's detector tries too: a 50 % downscale undone); the
        first exact read ends the search."""
        expected = np.array(payload_bits(payload), dtype=bool)
        best, reads = 0, 0
        rgb = image.convert("RGB")
        for scale in SCALES if max(rgb.size) < UPSCALE_BELOW else (1.0,):
            scaled = rgb if scale == 1.0 else rgb.resize(
                (round(rgb.width * scale), round(rgb.height * scale)), PIL.Image.Resampling.BICUBIC
            )  # fmt: skip
            bgr = np.ascontiguousarray(np.asarray(scaled)[..., ::-1])
            try:
                bits = np.asarray(self._decode(bgr), dtype=bool)
            except Refused:
                continue
            reads += 1
            best = max(best, int((bits == expected).sum()))
            if best == PAYLOAD_BITS:
                break
        return best == PAYLOAD_BITS, float(best), reads == 0

    def _decode(self, bgr: np.ndarray) -> np.ndarray:
        if self.check_size:
            from imwatermark import WatermarkDecoder

            try:
                return WatermarkDecoder("bits", PAYLOAD_BITS).decode(bgr, self.method)
            except RuntimeError as error:
                raise Refused(str(error)) from error
        return self._embedder([]).decode(bgr)

    def _embedder(self, bits: list[int]):
        # The classes behind WatermarkEncoder/Decoder, with their default scales and block size.
        if self.method == "dwtDct":
            from imwatermark.maxDct import EmbedMaxDct

            return EmbedMaxDct(bits, wmLen=PAYLOAD_BITS)
        from imwatermark.dwtDctSvd import EmbedDwtDctSvd

        return EmbedDwtDctSvd(bits, wmLen=PAYLOAD_BITS)
