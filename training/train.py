"""Trains the "shapes" toy unCLIP model from scratch and writes it in the Karlo layout.

    python -m training.train --out models/shapes-toy --work runs/toy-model --preset cpu   # make toy-model
    python -m training.train --out DIR --work W --preset gpu --device cuda --components clip,prior
    python -m training.train --out DIR --work W --preset finetune --init-from models/shapes-toy \
        --components decoder,super_res   # continue from trained weights (DIR must hold that model's CLIP)

Components train in order clip -> (prior, decoder), and super_res independently; prior and decoder read the
trained CLIP from --out, so they can run as separate processes once clip is done. Every component is
resumable: rerun the same command after an interruption and it continues from its checkpoint in --work until
its time budget is spent.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, UnCLIPScheduler
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from training import components as C
from training.loop import LoopConfig, train_loop
from training.vocabulary import write_vocabulary
from training.world import PALETTE, random_captions, render, sample_scenes
from unclip.sampling.dpmsolver import dpmsolver_config

COMPONENTS = ["clip", "prior", "decoder", "super_res"]


@dataclass
class Preset:
    """Batch sizes and time budgets (seconds of training per component)."""

    clip_batch: int
    prior_batch: int
    decoder_batch: int
    super_res_batch: int
    super_res_crop: int  # the upsampler trains on crops of this size (px, at 128 px output)
    budgets: dict[str, float]
    decoder_small_share: float = 0.5  # share of small objects in the decoder's batches (the world's is 0.5)
    # Timesteps half of each decoder batch is drawn at (as super_res_focus; the stack's dpmsolver++ with 10
    # steps: 995, 895, ..., 95): the predictions a picture is made of get most of the training.
    decoder_focus: tuple[int, ...] = ()
    # Extra weight of the decoder's x0 loss on pixels along outlines (`edge_weights`; 0: a plain MSE).
    decoder_edge_weight: float = 0.0
    lr_scale: float = 1.0  # multiplies every peak learning rate (lower when fine-tuning)
    warmup_steps: int = 200  # linear learning-rate warm-up
    # Per-channel size ([0, 1] units) of the decoder-like colour errors added to the upsampler's 32 px input,
    # so that it learns to return the palette's flat colours from the decoder's slightly-off ones (0: none).
    super_res_colour_error: float = 0.0
    # Size (32 px pixels, per-image scale U(0, 2)) of a smooth random warp of the upsampler's 32 px input, so
    # that it learns to draw the world's straight edges and sharp corners from the decoder's bent ones.
    super_res_shape_error: float = 0.0
    # Size (32 px pixels, per-image scale U(0, 2); ≤ 0.75 for the blur's 7-tap kernel) of the blur-and-cut
    # rounding of the object in the upsampler's 32 px input (`round_shapes`), so that it draws the world's
    # sharp star points and corners from inputs that lack them (0: none).
    super_res_rounding: float = 0.0
    super_res_small_share: float = 0.5  # share of small objects in the upsampler's batches
    # The upsampler's loss on its x0 prediction: "mse", or "l1" (a per-pixel median), which keeps an uncertain
    # edge between two flat colours sharp where the mean is a soft ramp.
    super_res_loss: str = "mse"
    # Timesteps half of each upsampler batch is drawn at: the grid the stack samples it on (dpmsolver++ with 2
    # steps: 995, 495), so that the few predictions a picture is made of are the best-trained ones.
    super_res_focus: tuple[int, ...] = ()


def sampler_grid(steps: int) -> tuple[int, ...]:
    """The timesteps the stack's dpmsolver++ sampler runs the upsampler at for `steps` steps (2: 995, 495)."""
    config = dpmsolver_config(UnCLIPScheduler(**C.SUPER_RES_SCHEDULER).config)
    scheduler = DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    return tuple(int(t) for t in scheduler.timesteps)


# The upsampler's fine-tuning recipe against the decoder's errors (MODEL_CARD.md, "The upsampler"):
# decoder-like colour and shape errors in its input, blunted shapes, three small objects in four, an L1 loss,
# half of each batch at the grid the stack samples it on (sampling_defaults.json: dpmsolver++, 2 steps).
# The shipped weights' last run (run 9) added the rounding and the small share to run 7's recipe; runs 1-6
# used errors of 0.04 and 0.3, which left red patches in orange objects and yellow arm tips on green stars
# as the decoder drew them.
UPSAMPLER_FIX: dict[str, Any] = dict(
    super_res_colour_error=0.08,
    super_res_shape_error=0.5,
    super_res_rounding=0.5,
    super_res_small_share=0.75,
    super_res_loss="l1",
    super_res_focus=sampler_grid(2),
)

PRESETS = {
    # Two CPU cores: ≈ 20 + 20 + 90 + 45 minutes = 2 h 55 min (see the step timings).
    "cpu": Preset(128, 256, 32, 16, 48, dict(clip=1200, prior=1200, decoder=5400, super_res=2700)),
    # One H100/H200 (the shipped weights): clip, then prior and decoder side by side; super_res beside them.
    "gpu": Preset(512, 512, 256, 64, 64, dict(clip=80, prior=240, decoder=240, super_res=330)),
    # Seconds, for tests of the whole path.
    "smoke": Preset(16, 16, 4, 2, 32, dict(clip=3, prior=3, decoder=3, super_res=3)),
    # Continue trained weights (--init-from) on two CPU cores: small objects oversampled in the decoder
    # (their shapes are its commonest error), the upsampler on whole 128 px images (64 px crops left lighter
    # squares in flat backgrounds: a convolution-only net sees other padding and GroupNorm statistics on the
    # full canvas), lower learning rates.
    "finetune": Preset(
        128,
        128,
        24,
        4,
        128,
        dict(clip=600, prior=900, decoder=2400, super_res=1800),
        decoder_small_share=0.75,
        lr_scale=0.3,
        warmup_steps=50,
        **UPSAMPLER_FIX,
    ),
    # The upsampler fine-tuned from trained weights on whole 128 px canvases on one GPU
    # (`training/fix_upsampler.sh`): trained on 64 px crops, it leaves an off-palette patch over the canvas'
    # interior (its tile edge) at 128 px.
    "gpu-canvas": Preset(
        512,
        512,
        256,
        48,
        128,
        dict(clip=80, prior=240, decoder=240, super_res=420),
        lr_scale=0.3,
        warmup_steps=50,
        **UPSAMPLER_FIX,
    ),
}
LEARNING_RATES = dict(clip=5e-4, prior=3e-4, decoder=1e-3, super_res=1e-3)


# ---------------------------------------------------------------- shared helpers
def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images at the CLIP input size -> the vision tower's input (as CLIPImageProcessor makes it)."""
    mean = torch.tensor(C.CLIP_MEAN, device=images.device)[None, :, None, None]
    std = torch.tensor(C.CLIP_STD, device=images.device)[None, :, None, None]
    return ((images + 1) / 2 - mean) / std


class TextEncoder:
    """The frozen text tower, called exactly as UnCLIPPipeline._encode_prompt calls it."""

    def __init__(self, model_dir: Path, device: str):
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        self.model = CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder").to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.model(tok.input_ids.to(self.device))
        return out.text_embeds, out.last_hidden_state, tok.attention_mask.bool().to(self.device)


def load_image_encoder(model_dir: Path, device: str) -> CLIPVisionModelWithProjection:
    return CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder").to(device).eval()


def noise_schedule(device: str) -> torch.Tensor:
    return UnCLIPScheduler(**C.DECODER_SCHEDULER).alphas_cumprod.to(device)  # the cosine schedule, [1000]


def add_noise(x0: torch.Tensor, alphas_cumprod: torch.Tensor, focus: tuple[int, ...] = ()):
    """Noises x0 at uniform timesteps; with `focus`, half of the batch (alternate rows) at those timesteps."""
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=x0.device)
    if focus:
        rows = t[::2]
        rows.copy_(torch.tensor(focus, device=x0.device)[torch.randint(0, len(focus), rows.shape)])
    a = alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
    noise = torch.randn_like(x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t


def oversample_small(scenes, share: float):
    """Redraws sizes so that a `share` of the scenes are small (positions uniform; large ones centred)."""
    if share == 0.5:
        return scenes  # the world's own distribution, untouched
    n = len(scenes)
    small = torch.rand(n) < share
    scenes.size = torch.where(small, 0, 1)
    scenes.position = torch.where(small, torch.randint(0, 5, (n,)), 0)
    return scenes


def init_from(module: torch.nn.Module, args, folder: str, droppable: tuple[str, ...] = ()) -> None:
    """Loads trained weights from --init-from/<folder> into a freshly built module (fine-tuning).
    droppable: prefixes of trained weights the module may lack (a part its architecture no longer has)."""
    if not args.init_from:
        return
    trained = type(module).from_pretrained(Path(args.init_from) / folder)
    try:
        result = module.load_state_dict(trained.state_dict(), strict=False)
    except RuntimeError as error:  # a tensor of another shape: another model size
        raise SystemExit(f"--init-from: {folder} does not match this model's sizes: {error}") from None
    extra = [k for k in result.unexpected_keys if not k.startswith(droppable)]  # startswith(()) is False
    if result.missing_keys or extra:
        missing = result.missing_keys
        raise SystemExit(f"--init-from: {folder} does not match: missing {missing}, extra {extra}")
    print(f"initialised {folder} from {args.init_from}", flush=True)


def drop_rows(x: torch.Tensor, replacement: torch.Tensor, p: float) -> torch.Tensor:
    """Replaces each row of x by `replacement` with probability p (classifier-free guidance training)."""
    keep = torch.rand(x.shape[0], device=x.device) >= p
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, replacement.expand_as(x))


# ---------------------------------------------------------------- components
def train_clip(args, preset: Preset, sz: C.ModelSizes) -> None:
    out, dev = Path(args.out), args.device
    tokenizer = C.build_tokenizer(out / "tokenizer", sz.max_tokens)
    write_vocabulary(out)  # the words the text encoder will see, for the orchestrator's unknown-word warning
    parts = torch.nn.ModuleDict(
        dict(text=C.build_text_encoder(sz, len(tokenizer)), vision=C.build_image_encoder(sz))
    )
    parts["logit_scale"] = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(2.659))])  # log(1/0.07)
    parts.to(dev)
    rng = random.Random(args.seed)

    def step(_: int) -> torch.Tensor:
        scenes = sample_scenes(preset.clip_batch)
        texts, mentions = random_captions(scenes, rng)
        images = render(scenes, sz.clip_image_size, dev)
        tok = tokenizer(
            texts, padding="max_length", max_length=sz.max_tokens, truncation=True, return_tensors="pt"
        )
        t = F.normalize(parts["text"](tok.input_ids.to(dev)).text_embeds, dim=-1)
        v = F.normalize(parts["vision"](pixel_values=clip_pixels(images)).image_embeds, dim=-1)
        logits = parts["logit_scale"][0].clamp(max=4.6).exp() * v @ t.T  # [images, captions]
        # Soft targets: a caption that leaves attributes out matches every image that agrees on the rest.
        ok = torch.ones_like(logits, dtype=torch.bool)
        for key in ("shape", "color", "background", "size", "position"):
            vals = getattr(scenes, key).to(dev)
            stated = torch.tensor([getattr(m, key, True) for m in mentions], device=dev)
            ok &= (vals[:, None] == vals[None, :]) | ~stated[None, :]
        target = ok.float()
        loss_i = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(target.T / target.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        return (loss_i + loss_t) / 2

    ema = train_loop(_loop_cfg("clip", args, preset), parts, step, Path(args.work))
    ema["text"].save_pretrained(out / "text_encoder")
    ema["vision"].save_pretrained(out / "image_encoder")
    C.build_feature_extractor(sz).save_pretrained(out / "feature_extractor")


def train_prior(args, preset: Preset, sz: C.ModelSizes) -> None:
    out, dev = Path(args.out), args.device
    text, vision = TextEncoder(out, dev), load_image_encoder(out, dev)
    prior = C.build_prior(sz).to(dev)
    init_from(prior, args, "prior")  # clip_mean / clip_std come with it (the space it was trained in)
    with torch.no_grad():  # embedding statistics: the prior works in normalized space (post_process_latents)
        embeds = torch.cat(
            [
                vision(
                    pixel_values=clip_pixels(
                        render(sample_scenes(min(preset.prior_batch, 512)), sz.clip_image_size, dev)
                    )
                ).image_embeds
                for _ in range(8)
            ]
        )
        if not args.init_from:
            prior.clip_mean.copy_(embeds.mean(0, keepdim=True))
            prior.clip_std.copy_(embeds.std(0, keepdim=True))
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)
    null = text([""])
    acp = noise_schedule(dev)
    rng = random.Random(args.seed + 1)

    def step(_: int) -> torch.Tensor:
        scenes = sample_scenes(preset.prior_batch)
        texts, _ = random_captions(scenes, rng)
        with torch.no_grad():
            x0 = vision(pixel_values=clip_pixels(render(scenes, sz.clip_image_size, dev))).image_embeds
            x0 = (x0 - prior.clip_mean) / prior.clip_std
            emb, hid, mask = text(texts)
            keep = torch.rand(len(texts), device=dev) >= 0.1  # 10 % unconditional ("")
            emb = torch.where(keep[:, None], emb, null[0])
            hid = torch.where(keep[:, None, None], hid, null[1])
            mask = torch.where(keep[:, None], mask, null[2])
        x_t, t = add_noise(x0, acp)
        pred = prior(
            x_t, timestep=t, proj_embedding=emb, encoder_hidden_states=hid, attention_mask=mask
        ).predicted_image_embedding
        return F.mse_loss(pred, x0)  # x₀ ("sample") prediction

    ema = train_loop(_loop_cfg("prior", args, preset), prior, step, Path(args.work))
    ema.save_pretrained(out / "prior")
    C.save_schedulers(out)


def train_decoder(args, preset: Preset, sz: C.ModelSizes) -> None:
    out, dev = Path(args.out), args.device
    text, vision = TextEncoder(out, dev), load_image_encoder(out, dev)
    parts = torch.nn.ModuleDict(dict(text_proj=C.build_text_proj(sz), decoder=C.build_decoder(sz))).to(dev)
    init_from(parts["text_proj"], args, "text_proj")
    init_from(parts["decoder"], args, "decoder")
    null = text([""])
    acp = noise_schedule(dev)
    rng = random.Random(args.seed + 2)
    n_extra = sz.clip_extra_context_tokens

    def step(_: int) -> torch.Tensor:
        scenes = oversample_small(sample_scenes(preset.decoder_batch), preset.decoder_small_share)
        texts, _ = random_captions(scenes, rng)
        x0 = render(scenes, sz.decoder_size, dev)  # [B, 3, 32, 32]
        with torch.no_grad():
            image_embeds = vision(
                pixel_values=clip_pixels(render(scenes, sz.clip_image_size, dev))
            ).image_embeds
            emb, hid, mask = text(texts)
            keep = torch.rand(len(texts), device=dev) >= 0.5  # caption dropped 50 % of the time
            emb = torch.where(keep[:, None], emb, null[0])
            hid = torch.where(keep[:, None, None], hid, null[1])
            mask = torch.where(keep[:, None], mask, null[2])
        null_image = parts["text_proj"].learned_classifier_free_guidance_embeddings[None]
        image_embeds = drop_rows(image_embeds, null_image, 0.1)  # CLIP embedding dropped 10 %
        enc, additive = parts["text_proj"](
            image_embeddings=image_embeds,
            prompt_embeds=emb,
            text_encoder_hidden_states=hid,
            do_classifier_free_guidance=False,
        )
        x_t, t = add_noise(x0, acp, preset.decoder_focus)
        pred = parts["decoder"](
            x_t,
            t,
            encoder_hidden_states=enc,
            class_labels=additive,
            attention_mask=F.pad(mask, (n_extra, 0), value=True),
        ).sample  # [B, 6, 32, 32]
        x0_pred, variance = pred.split(3, dim=1)
        # x₀ prediction; the variance half is trained towards -1: learned_range's small posterior variance.
        weight = edge_weights(x0, preset.decoder_edge_weight)
        x0_loss = (weight * (x0_pred - x0).square()).mean() / weight.mean()
        return x0_loss + 0.1 * F.mse_loss(variance, torch.full_like(variance, -1.0))

    ema = train_loop(_loop_cfg("decoder", args, preset), parts, step, Path(args.work))
    ema["text_proj"].save_pretrained(out / "text_proj")
    ema["decoder"].save_pretrained(out / "decoder")
    C.save_schedulers(out)


def edge_weights(images: torch.Tensor, extra: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1, plus `extra` where a 3 × 3 neighbourhood spans two colours
    (a band about two pixels wide along every outline), so that the few pixels that decide a small shape's
    points and corners weigh more than the flat canvas around them. images: [B, 3, H, W] in [-1, 1]."""
    spread = F.max_pool2d(images, 3, 1, 1) + F.max_pool2d(-images, 3, 1, 1)  # max - min per channel
    return 1.0 + extra * (spread.amax(1, keepdim=True) > 0.1).float()


def colour_errors(low: torch.Tensor, size: float) -> torch.Tensor:
    """Adds what the decoder gets wrong in colour at 32 px: a per-image shift, a smooth field (bicubic from
    4 × 4 control points) and per-pixel noise, each ~N(0, size²) per channel in [0, 1] units, scaled per image
    by U(0, 2) so that some inputs are nearly exact. The world's palette colours are ≥ 0.36 apart, so errors
    of this size leave the intended colour unambiguous. low: [B, 3, H, W] in [-1, 1]."""
    b, _, h, w = low.shape
    dev = low.device
    strength = 2 * size * 2 * torch.rand(b, 1, 1, 1, device=dev)  # ×2: [0, 1] -> [-1, 1] units
    shift = torch.randn(b, 3, 1, 1, device=dev)
    control = torch.randn(b, 3, 4, 4, device=dev)
    field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=False)
    pixel = torch.randn_like(low)
    return (low + strength * (shift + field + pixel) / 3**0.5).clamp(-1, 1)


def shape_errors(low: torch.Tensor, size_px: float) -> torch.Tensor:
    """Bends outlines as the decoder does at 32 px: resamples the image through a smooth random displacement
    field (bicubic from 8 × 8 control points, ~N(0, size_px²) pixels per axis, scaled per image by U(0, 2)).
    low: [B, 3, H, W] in [-1, 1]."""
    b, _, h, w = low.shape
    dev = low.device
    strength = size_px * (2 / h) * 2 * torch.rand(b, 1, 1, 1, device=dev)  # pixels -> grid units ([-1, 1])
    control = torch.randn(b, 2, 8, 8, device=dev)
    field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=False)  # [B, 2, H, W]
    identity = torch.eye(2, 3, device=dev)[None].expand(b, 2, 3)
    grid = F.affine_grid(identity, [b, 3, h, w], align_corners=False) + strength * field.permute(0, 2, 3, 1)
    return F.grid_sample(low, grid, mode="bilinear", padding_mode="border", align_corners=False)


def degrade(low: torch.Tensor, colour_error: float = 0.0, shape_error: float = 0.0) -> torch.Tensor:
    """Optional decoder-like errors (`shape_errors`, `colour_errors`), then a Gaussian blur (σ 0.3–1.2 px, per
    image) and slight noise on the 32 px input (DALL-E 2's upsamplers)."""
    if shape_error > 0:
        low = shape_errors(low, shape_error)
    if colour_error > 0:
        low = colour_errors(low, colour_error)
    b = low.shape[0]
    y = gaussian_blur(low, 0.3 + 0.9 * torch.rand(b, device=low.device))
    return (y + 0.02 * torch.rand(b, 1, 1, 1, device=low.device) * torch.randn_like(y)).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur with one σ (pixels, ≤ ~1.5: a 7-tap kernel) per image; x: [B, C, H, W],
    sigma: [B]. Edges replicate."""
    b, c = x.shape[:2]
    taps = torch.arange(-3, 4, device=x.device, dtype=torch.float32)
    k = torch.exp(-(taps[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 7]
    padded = F.pad(x, (3, 3, 3, 3), mode="replicate")
    # per-image kernels through grouped convolutions
    y = padded.reshape(1, b * c, *padded.shape[2:])
    kh = k.repeat_interleave(c, 0)[:, None, None, :]
    kv = k.repeat_interleave(c, 0)[:, None, :, None]
    return F.conv2d(F.conv2d(y, kh, groups=b * c), kv, groups=b * c).reshape_as(x)


def round_shapes(
    low: torch.Tensor, background: torch.Tensor, colour: torch.Tensor, size_px: float
) -> torch.Tensor:
    """Blunts the object (`blunt`) by σ = size_px × U(0, 2) pixels per image, so that the upsampler learns to
    draw sharp points and corners from inputs that lack them. low: [B, 3, H, W] world renders in [-1, 1];
    background, colour: [B, 3] their palette colours in [0, 1]."""
    return blunt(low, background, colour, size_px * 2 * torch.rand(low.shape[0], device=low.device))


def blunt(
    low: torch.Tensor, background: torch.Tensor, colour: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """Points short and blunt, corners rounded, concave corners filled, the edge still one pixel wide: the
    object's coverage (read back from the render's two colours) blurred by sigma [B] pixels and cut again at
    one half with the slope of a one-pixel edge. Arguments as `round_shapes`."""
    bg, span = background[:, :, None, None], (colour - background)[:, :, None, None]
    alpha = ((low + 1) / 2 - bg).mul(span).sum(1, keepdim=True) / span.square().sum(1, keepdim=True)
    blurred = gaussian_blur(alpha, sigma)
    # a straight edge blurred by σ has slope 1 / (σ √(2π)) at one half; a one-pixel edge has slope 1
    gain = (sigma * (2 * math.pi) ** 0.5).clamp(min=1.0)[:, None, None, None]
    alpha = ((blurred - 0.5) * gain + 0.5).clamp(0, 1)
    return (bg + alpha * span) * 2 - 1


def train_super_res(args, preset: Preset, sz: C.ModelSizes) -> None:
    out, dev = Path(args.out), args.device
    unet = C.build_super_res(sz).to(dev)
    # Upsamplers trained with UNet2DModel's default mid-block attention fine-tune without it.
    init_from(unet, args, "super_res_first", droppable=("mid_block.attentions.",))
    acp = noise_schedule(dev)
    crop = preset.super_res_crop

    def step(_: int) -> torch.Tensor:
        scenes = oversample_small(sample_scenes(preset.super_res_batch), preset.super_res_small_share)
        high = render(scenes, sz.super_res_size, dev)  # [B, 3, 128, 128]
        low = render(scenes, sz.decoder_size, dev)
        if preset.super_res_rounding > 0:
            palette = PALETTE.to(dev)
            low = round_shapes(
                low, palette[scenes.background], palette[scenes.color], preset.super_res_rounding
            )
        low = degrade(low, preset.super_res_colour_error, preset.super_res_shape_error)
        up = F.interpolate(low, size=high.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
        i, j = (random.randrange(0, sz.super_res_size - crop + 1) for _ in range(2))
        high, up = high[..., i : i + crop, j : j + crop], up[..., i : i + crop, j : j + crop]
        x_t, t = add_noise(high, acp, preset.super_res_focus)
        pred = unet(torch.cat([x_t, up], dim=1), t).sample
        loss = F.l1_loss if preset.super_res_loss == "l1" else F.mse_loss
        return loss(pred, high)  # x₀ prediction

    ema = train_loop(_loop_cfg("super_res", args, preset), unet, step, Path(args.work))
    ema.save_pretrained(out / "super_res_first")
    ema.save_pretrained(out / "super_res_last")  # one network for every step, the last one included
    C.save_schedulers(out)


def _loop_cfg(name: str, args, preset: Preset) -> LoopConfig:
    budget = preset.budgets[name] * args.budget_scale
    return LoopConfig(
        name=name,
        budget_s=budget,
        lr=LEARNING_RATES[name] * preset.lr_scale,
        warmup_steps=preset.warmup_steps,
        max_steps=args.max_steps,
        ckpt_every_s=min(60.0, max(budget / 5, 1.0)),
        log_every=args.log_every,
    )


TRAINERS = dict(clip=train_clip, prior=train_prior, decoder=train_decoder, super_res=train_super_res)


def non_negative(text: str) -> float:
    """argparse type: a float ≥ 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def share(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def timesteps(text: str) -> tuple[int, ...]:
    """argparse type: "995,495" -> (995, 495); "" -> () (no focus)."""
    try:
        steps = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of timesteps") from None
    last = C.SUPER_RES_SCHEDULER["num_train_timesteps"] - 1
    if any(not 0 <= t <= last for t in steps):
        raise argparse.ArgumentTypeError(f"timesteps must be in 0..{last}, got {text!r}")
    return steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="model folder (Karlo layout) to write")
    p.add_argument("--work", required=True, help="checkpoints and logs (resume from here)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--components", default=",".join(COMPONENTS), help="comma-separated subset, in order")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every time budget")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per component (smoke tests)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from",
        default=None,
        help="model folder whose trained weights each component starts from (fine-tuning; clip excluded)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--lr-scale", type=non_negative, default=None, help="default: the preset's")
    p.add_argument("--decoder-small-share", type=share, default=None, help="default: the preset's")
    p.add_argument("--decoder-edge-weight", type=non_negative, default=None, help="default: the preset's")
    p.add_argument(
        "--decoder-focus", type=timesteps, default=None, help="e.g. 995,895,...,95 (default: the preset's)"
    )
    p.add_argument("--super-res-colour-error", type=non_negative, default=None, help="default: the preset's")
    p.add_argument("--super-res-shape-error", type=non_negative, default=None, help="default: the preset's")
    p.add_argument("--super-res-rounding", type=non_negative, default=None, help="default: the preset's")
    p.add_argument("--super-res-small-share", type=share, default=None, help="default: the preset's")
    p.add_argument("--super-res-loss", choices=["mse", "l1"], default=None, help="default: the preset's")
    p.add_argument(
        "--super-res-focus", type=timesteps, default=None, help="e.g. 995,495 (default: the preset's)"
    )
    args = p.parse_args(argv)
    names = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in names if c not in COMPONENTS]
    if unknown:
        p.error(f"--components: unknown {unknown}; choose from {COMPONENTS}")
    if args.init_from and "clip" in names:
        p.error("--init-from: clip cannot be fine-tuned (the prior and decoder live in its embedding space)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    # every flag named after a Preset field overrides it when given
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Preset)}
    preset = replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.time()
        TRAINERS[name](args, preset, C.ModelSizes())
        print(f"[{name}] exported to {args.out} ({time.time() - t0:.0f}s wall)", flush=True)


if __name__ == "__main__":
    main()
