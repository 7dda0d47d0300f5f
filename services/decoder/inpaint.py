"""Masked sampling for edits, shared by the decoder and every upsampler stage.

After every denoising step the known region of the sample is replaced by the original image (resized to the
stage's resolution) noised to the noise level the sample now has (``scheduler.add_noise`` at the step's
previous
timestep); after the final step it is replaced by the original itself. The noise comes from the image's own
generator, drawn right after the scheduler step's own draw, so an edit is as reproducible as a generation.

At a resolution below the mask's, a pixel counts as known only if every mask pixel it covers is known.

Resampling (RePaint, Lugmayr et al. 2022): pasting alone lets the regenerated region ignore the known one
(the model sees the known pixels only through noise, one step at a time), so objects can come out cut,
misplaced or missing. ``KnownRegion.schedule`` can therefore walk every stretch of ``jump_length`` steps
``1 + resample_jumps`` times (off by default, see RESAMPLE_JUMPS): at the end of a stretch the sample is
re-noised back to its start (``renoise``, forward diffusion) and denoised again, each pass pasting the known
region anew, so the regenerated region gets several chances to agree with it. Jumps happen only in the noisier
``resample_until`` share of the schedule, where the layout is decided; the low-noise end only sharpens. The
upsamplers condition on the whole (already harmonised) low-resolution image, so they walk the plain schedule
(``UpsamplerKnownRegion``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unclip.checks import check_tensor
from unclip.rng import randn_per_image


@dataclass
class InpaintInput:
    image: torch.Tensor  # float32 [n, 3, S, S] in [-1, 1], any S (each stage resizes it to its own size)
    mask: torch.Tensor  # float32 [n, 1, S, S], 1 = known (keep), 0 = regenerate; only exact 1 counts as known


def check_inpaint(inpaint: InpaintInput | None, n: int, field: str = "inpaint") -> None:
    """Validates an edit's image and mask for n images; no-op when ``inpaint`` is None."""
    if inpaint is None:
        return
    if not isinstance(inpaint, InpaintInput):
        raise ValueError(f"{field} must be an InpaintInput, got {type(inpaint).__name__}")
    image = check_tensor(inpaint.image, f"{field}.image", [n, 3, None, None], value_range=(-1.0, 1.0))
    size = image.shape[-1]
    if image.shape[-2] != size:
        raise ValueError(f"{field}.image must be square, got {image.shape[-2]}x{size}")
    check_tensor(inpaint.mask, f"{field}.mask", [n, 1, size, size], value_range=(0.0, 1.0))


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """[n, C, S, S] -> [n, C, size, size]: bicubic with antialiasing (a proper low-pass when shrinking)."""
    if image.shape[-1] == size:
        return image
    resized = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(-1, 1)  # bicubic overshoots at edges; the original stays in the data range


def known_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """[n, 1, S, S] -> bool [n, 1, size, size]: True where every covered input pixel is fully known (== 1)."""
    unknown = (mask != 1).float()
    if mask.shape[-1] > size:
        # A low-resolution pixel is unknown if any pixel it covers is (max-pool of "unknown").
        unknown = F.adaptive_max_pool2d(unknown, size)
    elif mask.shape[-1] < size:
        unknown = F.interpolate(unknown, size=(size, size), mode="nearest")
    return unknown == 0


# Resampling defaults. Off: on the shapes toy model (training/edits.py, 60 edits at 32 px, seed-paired) plain
# masked sampling got 49/60 and jump_length 5 / resample_jumps 2 / resample_until 0.6 also 49/60 (at 128 px
# 10/12 -> 11/12), jump_length 1 / resample_jumps 3 fewer (18 vs 19 of 24), at 1.8-4x the decoder's model
# calls: its edit failures are colour drift and low-contrast objects, not seams. Turn it on per stage with
# KnownRegion.at_size(..., jump_length=5, resample_jumps=2) where a model shows a gain.
JUMP_LENGTH = 5
RESAMPLE_JUMPS = 0
RESAMPLE_UNTIL = 0.6


@dataclass
class KnownRegion:
    """An edit's known region at one stage's resolution, and the schedule an edit walks there."""

    image: torch.Tensor  # float32 [n, 3, s, s] the original, resized
    known: torch.Tensor  # bool [n, 1, s, s] True = keep the original
    jump_length: int = JUMP_LENGTH  # steps walked down before a jump back up (RePaint's j); 0: no resampling
    resample_jumps: int = RESAMPLE_JUMPS  # extra walks of each stretch (RePaint's r - 1); 0: no resampling
    resample_until: float = RESAMPLE_UNTIL  # jumps only within this share of the schedule, from its noisy end

    @classmethod
    def at_size(cls, inpaint: InpaintInput, size: int, device: torch.device, **schedule) -> KnownRegion:
        """schedule: jump_length / resample_jumps / resample_until, overriding the class defaults."""
        image = resize_image(inpaint.image.to(device), size)
        return cls(image=image, known=known_mask(inpaint.mask.to(device), size), **schedule)

    def paste(self, latents, scheduler, prev_timestep, generators: list[torch.Generator]) -> torch.Tensor:
        """The sample after a step with its known region replaced (see the module docstring).

        prev_timestep: the timestep the sample is now at; None after the final step (the original itself).
        """
        if prev_timestep is None:
            return torch.where(self.known, self.image, latents)
        noise = randn_per_image(self.image.shape, generators, latents.device, latents.dtype)
        timesteps = torch.full((self.image.shape[0],), int(prev_timestep), dtype=torch.long)
        noisy = scheduler.add_noise(self.image, noise, timesteps)
        return torch.where(self.known, noisy, latents)

    def schedule(self, timesteps: list[int]) -> list[int]:
        """The timesteps an edit walks, given the plain ones (descending).

        A later entry larger than the one before it is a jump back up (RePaint's resampling): the sampler then
        re-noises the sample with ``renoise`` instead of calling the model, so the regenerated region gets
        another chance to agree with the known one. With jump_length j and resample_jumps r, after reaching
        entry i (i a multiple of j, in the first resample_until of the schedule) the walk goes back to entry
        i - j and down to i again, r times: [.., t_i, t_(i-j), .., t_i, ..]. It always ends at the last plain
        entry, so the final step (and the paste of the original itself) is unchanged. With jump_length or
        resample_jumps 0: the timesteps unchanged (plain masked sampling).
        """
        plain = [int(t) for t in timesteps]
        j, r = self.jump_length, self.resample_jumps
        if j <= 0 or r <= 0 or len(plain) < 2:
            return plain
        last_jump = int(self.resample_until * (len(plain) - 1))  # the deepest entry a jump starts from
        walk = plain[:1]
        for i in range(1, len(plain)):
            walk.append(plain[i])
            if i % j == 0 and i <= last_jump:
                for _ in range(r):
                    walk += plain[i - j : i + 1]  # up to entry i - j (a re-noise), then down to i again
        return walk

    @staticmethod
    def renoise(
        latents, scheduler, from_t: int, to_t: int, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Forward diffusion q(x_to | x_from) for to_t > from_t, with each image's own generator.

        x_to = sqrt(abar_to / abar_from) * x_from + sqrt(1 - abar_to / abar_from) * noise.
        """
        if to_t <= from_t:
            raise ValueError(f"renoise goes up in noise: to_t ({to_t}) must exceed from_t ({from_t})")
        alphas_cumprod = scheduler.alphas_cumprod.to(latents.device)
        ratio = (alphas_cumprod[to_t] / alphas_cumprod[from_t]).to(latents.dtype)
        noise = randn_per_image(latents.shape, generators, latents.device, latents.dtype)
        return ratio.sqrt() * latents + (1 - ratio).sqrt() * noise


@dataclass
class UpsamplerKnownRegion(KnownRegion):
    """The known region at an upsampler: the plain schedule (it sees the harmonised low-res image whole)."""

    jump_length: int = 0
    resample_jumps: int = 0
