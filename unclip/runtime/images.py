"""Images in and out: encoded files <-> PIL <-> tensors, edit masks, and the final downscale.

Conventions: model tensors are float32 [n, 3, S, S] in [-1, 1] (as the stages produce them); output pixels are
float32 [n, S, S, 3] in [0, 1] exactly as diffusers' pipelines post-process (x * 0.5 + 0.5, clamped); PNGs are
8-bit RGB rounded as diffusers' `numpy_to_pil`.
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from unclip.limits import LIMITS, check

# Uploads: the formats a client may send (Pillow can open many more, some through external programs), and
# the pixel modes that convert to 8-bit RGB(A) without a colour-management choice. Other modes (F, I, I;16,
# LAB, HSV) are refused naming the mode. Sizes: unclip.limits "upload_bytes" and "upload_side".
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"}
)


def decode_image(data: bytes, field: str) -> PIL.Image.Image:
    """An uploaded image file as an RGB or RGBA (when it has alpha) PIL image; ValueError naming `field`.

    The one validation layer for uploads, in this order: byte size, format (UPLOAD_FORMATS), the width and
    height from the file's header (before any pixel is decoded: a 100-byte PNG can claim 4096 x 4096), the
    pixel mode, then decoding and conversion. Only the first frame of a multi-frame file is read.
    """
    if not data:
        raise ValueError(f"{field} is required")
    check("upload_bytes", len(data), field=f"{field} (bytes)")
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except PIL.UnidentifiedImageError as error:  # its message quotes a BytesIO object's repr
        raise ValueError(
            f"{field} is not an image file (PNG, JPEG, WebP, TIFF, BMP or GIF): {len(data)} bytes"
        ) from error
    except Exception as error:  # PIL raises many types for bad bytes
        raise ValueError(
            f"{field} is not a decodable image; send PNG, JPEG, WebP, TIFF, BMP or GIF "
            f"({type(error).__name__}: {str(error)[:200]})"
        ) from error
    side = LIMITS["upload_side"].high
    if not (1 <= image.width <= side and 1 <= image.height <= side):
        raise ValueError(
            f"{field} is {image.width}x{image.height}: width and height must be 1..{side} pixels"
        )
    if image.mode not in CONVERTIBLE_MODES:
        raise ValueError(
            f"{field} has pixel mode {image.mode}, which has no 8-bit RGB form; send an RGB or RGBA image"
        )
    try:
        image.load()
        has_alpha = "A" in image.getbands() or "transparency" in image.info
        return image.convert("RGBA" if has_alpha else "RGB")
    except Exception as error:  # truncated data, a decoder error, a bad palette
        raise ValueError(
            f"{field} is not a decodable image ({type(error).__name__}: {str(error)[:200]})"
        ) from error


def require_square(image: PIL.Image.Image, field: str) -> None:
    if image.width != image.height:
        raise ValueError(f"{field} must be square, got {image.width}x{image.height}")


def pil_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[n, 3, S, S] in [-1, 1] -> [n, S, S, 3] in [0, 1], as UnCLIPPipeline post-processes."""
    return (images * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().contiguous()


def encode_png(pixels: torch.Tensor) -> bytes:
    """[S, S, 3] in [0, 1] -> PNG bytes (rounded to 8 bits as diffusers' numpy_to_pil)."""
    array = (pixels.numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def downscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """High-quality downscale of [n, 3, S, S] to [n, 3, size, size] (antialiased bicubic, kept in range)."""
    if images.shape[-1] == size:
        return images
    resized = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(-1, 1)


def resize_image(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """An uploaded image at the requested size (LANCZOS, as PIL resizes best)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), PIL.Image.Resampling.LANCZOS)


def known_mask(image: PIL.Image.Image, mask: PIL.Image.Image | None) -> torch.Tensor:
    """The OpenAI Images API's edit mask as float32 [1, S, S]: 1 = keep, 0 = regenerate (fully transparent
    pixels).

    Without a mask the image's own alpha channel is the mask.
    """
    field, source = ("mask", mask) if mask is not None else ("image", image)
    if mask is not None and mask.size != image.size:
        raise ValueError(
            f"mask must be the image's size {image.width}x{image.height}, got {mask.width}x{mask.height}"
        )
    has_alpha = "A" in source.getbands() or "transparency" in source.info
    if not has_alpha:
        if mask is None:
            raise ValueError("mask is required: the image has no alpha channel to mark what to regenerate")
        raise ValueError(
            "mask must have an alpha channel (RGBA PNG): its fully transparent pixels are regenerated"
        )
    alpha = np.asarray(source.convert("RGBA"), dtype=np.uint8)[..., 3]
    known = torch.from_numpy((alpha > 0).astype(np.float32))[None]
    if bool(known.all()):
        raise ValueError(f"{field} has no fully transparent pixel: nothing to regenerate")
    return known


def resize_mask(known: torch.Tensor, size: int) -> torch.Tensor:
    """[.., 1, S, S] keep-mask at `size`: a pixel stays known only if every pixel it covers is known."""
    if known.shape[-1] == size:
        return known
    batched = known if known.dim() == 4 else known[None]
    if size < known.shape[-1]:
        resized = (F.interpolate(batched, size=(size, size), mode="area") >= 1.0 - 1e-6).float()
    else:
        resized = F.interpolate(batched, size=(size, size), mode="nearest")
    return resized if known.dim() == 4 else resized[0]
