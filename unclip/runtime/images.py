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

# Larger uploads are refused before decoding (a 16-megapixel PNG can be a few KB: a decompression bomb).
MAX_INPUT_PIXELS = 4096 * 4096


def decode_image(data: bytes, field: str) -> PIL.Image.Image:
    """Decodes an uploaded image file; ValueError naming `field` when it is missing or not an image."""
    if not data:
        raise ValueError(f"{field} is required")
    try:
        image = PIL.Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ValueError(f"{field} is {image.width}x{image.height}, over {MAX_INPUT_PIXELS} pixels")
        image.load()
    except ValueError:
        raise
    except PIL.UnidentifiedImageError as error:  # its message quotes a BytesIO object's repr
        raise ValueError(f"{field} is not an image file (PNG, JPEG or WebP): {len(data)} bytes") from error
    except Exception as error:  # PIL raises many types for bad bytes
        raise ValueError(f"{field} is not a readable image ({type(error).__name__}: {error})") from error
    return image


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
