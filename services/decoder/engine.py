"""The decoder stage (text_proj + UNet) and the super-resolution stages, torch only.

Both loops are step for step the decoder and super-res sections of ``UnCLIPPipeline.__call__`` (and of
``UnCLIPImageVariationPipeline``): the same batch composition, the same per-image generator draws (initial
noise, then one draw per step inside ``UnCLIPScheduler.step``), the same guidance math, the decoder's
``clamp(-1, 1)``, the bicubic upscale before super-resolution and the ``super_res_first`` /
``super_res_last`` split at the last step.

Each loop is written once, in steps (``unclip.batching.stages``): ``start`` (checks, conditioning, timesteps,
initial noise), ``step`` (one denoising step of a group of requests, each at its own timestep, in one forward
pass) and ``finish``. ``decode`` / ``upsample`` are start, step until done, finish; the step batcher drives
the same methods for many requests at once.

One service code runs every stage: ``DecoderEngine`` for the decoder, ``UpsamplerEngine`` once per upsampler
stage (``super_res``, ``super_res_2``), each in its own process. A second upsampler stage draws from the
generators where the first left them. Edits (``inpaint``) add masked sampling to every stage (see
``services/decoder/inpaint.py``): after each model step the known region is pasted back, and the schedule an
edit walks (``KnownRegion.schedule``) may jump back up in noise, where the sample is re-noised
(``KnownRegion.renoise``) instead of calling the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from services.decoder.inpaint import InpaintInput, KnownRegion, UpsamplerKnownRegion, check_inpaint
from services.guidance import checked_guided_sampling, checked_sampler, conditioning, guided, model_input
from unclip import models
from unclip.batching.stages import (
    Task,
    denoise,
    renoise_jumps,
    sampler_step,
    timestep_rows,
    timesteps_for,
)
from unclip.checks import (
    check_callback,
    check_count,
    check_generators,
    check_steps,
    check_tensor,
)
from unclip.rng import randn_per_image
from unclip.sampling import DEFAULT_SAMPLER, build_samplers

__all__ = ["DecoderEngine", "DecoderOutput", "InpaintInput", "UpsamplerEngine"]

StepCallback = Callable[[int, int], None]


@dataclass
class DecoderOutput:
    images: torch.Tensor  # float32 [n, 3, s, s] in [-1, 1]
    generators: list[torch.Generator]  # the n per-image generators, advanced past this stage's draws


@dataclass
class DecoderCondition:
    """A decoder task's conditioning and options (``Task.cond``)."""

    do_cfg: bool  # classifier-free guidance: rows [uncond of all; cond of all] in the forward pass
    guidance_scale: float
    text_encoder_hidden_states: torch.Tensor  # [B, extra + L, H] after text_proj (B = 2n with guidance)
    additive_clip_time_embeddings: torch.Tensor  # [B, T] text_proj's time embedding term
    decoder_text_mask: torch.Tensor  # bool [B, extra + L]


@dataclass
class UpsamplerCondition:
    """An upsampler task's conditioning (``Task.cond``)."""

    image_upscaled: torch.Tensor  # [n, 3, S, S] the low-resolution image, upscaled once
    input_size: int  # its size before upscaling (tasks of one size share a forward pass)


class DecoderEngine:
    """UnCLIPTextProjModel + UNet2DConditionModel + its UnCLIPScheduler: image embedding -> small image."""

    stage = "decoder"
    name = "decoder"  # the step-wise stage's name (batcher, metrics)
    default_num_inference_steps = 25  # Karlo's decoder_num_inference_steps
    # An edit's known region at this stage, RePaint's resampling included; tests swap in other schedules.
    known_region: type[KnownRegion] = KnownRegion

    def __init__(self, text_proj, decoder, scheduler, device="cpu"):
        self.text_proj = text_proj
        self.decoder = decoder
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.output_size: int = decoder.config.sample_size  # pixels of the images it makes
        self.image_embed_dim: int = text_proj.clip_image_embeddings_project_to_time_embeddings.in_features
        self.text_embed_dim: int = text_proj.embedding_proj.in_features
        self.hidden_dim: int = text_proj.encoder_hidden_states_proj.in_features
        self.samplers = build_samplers(scheduler)  # every registered sampler on this stage's schedule

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
    ) -> DecoderEngine:
        """`dtype`: the weights' precision (auto, float32, float16 or bfloat16; see models.parse_dtype).
        Tensors in and out stay float32 whatever it is."""
        dtype = models.parse_dtype(dtype, device)
        model_dir = models.resolve_model_dir(model_dir)
        return cls(
            text_proj=models.load_text_proj(model_dir, device, dtype),
            decoder=models.load_decoder(model_dir, device, dtype),
            scheduler=models.load_scheduler(model_dir, "decoder_scheduler"),
            device=device,
        )

    def _check(self, image_embeds, text_embeds, text_encoder_hidden_states, text_mask, generators, do_cfg):
        n = check_generators(generators)
        rows = 2 * n if do_cfg else n  # guidance doubles the batch: [unconditional; conditional]
        check_count(generators, image_embeds, "image_embeds", 1)
        check_tensor(image_embeds, "image_embeds", [n, self.image_embed_dim])
        check_tensor(text_embeds, "text_embeds", [rows, self.text_embed_dim])
        hidden = check_tensor(
            text_encoder_hidden_states, "text_encoder_hidden_states", [rows, None, self.hidden_dim]
        )
        check_tensor(text_mask, "text_mask", [rows, hidden.shape[1]], dtype=torch.bool)
        return n

    @torch.no_grad()
    def decode(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_encoder_hidden_states: torch.Tensor,
        text_mask: torch.Tensor,
        generators: list[torch.Generator],
        num_inference_steps: int = 25,
        guidance_scale: float = 8.0,
        do_classifier_free_guidance: bool = True,
        inpaint: InpaintInput | None = None,
        step_callback: StepCallback | None = None,
        sampler: str = DEFAULT_SAMPLER,
        eta: float = 0.0,
    ) -> DecoderOutput:
        """Decodes n image embeddings [n, D] into n images [n, 3, s, s] in [-1, 1].

        text_embeds [B, D], text_encoder_hidden_states [B, L, H], text_mask bool [B, L]: the encoder's output,
        B = 2n with guidance (rows [0, n) unconditional), else n. inpaint: masked sampling for edits.
        step_callback(step, total) runs after every step (step = steps done, 1..total); it may raise to stop.
        """
        check_callback(step_callback)
        task = self.start(
            image_embeds,
            text_embeds,
            text_encoder_hidden_states,
            text_mask,
            generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            do_classifier_free_guidance=do_classifier_free_guidance,
            inpaint=inpaint,
            sampler=sampler,
            eta=eta,
        )
        return denoise(self, task, step_callback)

    # ---- the denoising loop in steps (unclip.batching.stages): start, step until done, finish --------------

    @torch.no_grad()
    def start(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_encoder_hidden_states: torch.Tensor,
        text_mask: torch.Tensor,
        generators: list[torch.Generator],
        num_inference_steps: int = 25,
        guidance_scale: float = 8.0,
        do_classifier_free_guidance: bool = True,
        inpaint: InpaintInput | None = None,
        sampler: str = DEFAULT_SAMPLER,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
    ) -> Task[DecoderCondition]:
        """``decode``'s checks, conditioning and initial noise: one request, ready to step. sampler: a
        registered sampler's name (unclip.sampling); eta: its stochasticity where it has one (ddim)."""
        do_cfg, num_inference_steps, guidance_scale, stepper, eta = checked_guided_sampling(
            self.samplers,
            do_classifier_free_guidance,
            num_inference_steps,
            guidance_scale,
            sampler,
            eta,
            edit=inpaint is not None,
        )
        n = self._check(image_embeds, text_embeds, text_encoder_hidden_states, text_mask, generators, do_cfg)
        check_inpaint(inpaint, n)
        generators = list(generators)
        device = self.device

        # 1. Conditioning: text_proj adds the CLIP image embedding as extra context tokens and time embedding.
        text_encoder_hidden_states, additive_clip_time_embeddings = self.text_proj(
            image_embeddings=image_embeds.to(device),
            prompt_embeds=text_embeds.to(device),
            text_encoder_hidden_states=text_encoder_hidden_states.to(device),
            do_classifier_free_guidance=do_cfg,
        )
        extra_tokens = self.text_proj.clip_extra_context_tokens
        decoder_text_mask = F.pad(text_mask.to(device), (extra_tokens, 0), value=True)  # [B, extra + L]

        # 2. Timesteps (an edit's known region may walk them with jumps back up: RePaint's resampling)
        size = self.output_size
        known = self.known_region.at_size(inpaint, size, device) if inpaint is not None else None
        timesteps = timesteps_for(stepper, num_inference_steps, known)

        # 3. Initial latents: per-image noise [n, C, s, s].
        channels = self.decoder.config.in_channels
        dtype = text_encoder_hidden_states.dtype
        if latents is None:
            latents = randn_per_image((n, channels, size, size), generators, device, dtype)
            latents = latents * self.scheduler.init_noise_sigma
        else:  # a given start (e.g. a DDIM-inverted image): no draw, as UnCLIPPipeline's decoder_latents
            latents = check_tensor(latents, "latents", [n, channels, size, size]).to(device, dtype)

        return Task(
            stage=self.name,
            rows=n,
            latents=latents,
            timesteps=timesteps,
            generators=generators,
            image_generators=generators,
            known=known,
            cond=DecoderCondition(
                do_cfg=do_cfg,
                guidance_scale=guidance_scale,
                text_encoder_hidden_states=text_encoder_hidden_states,
                additive_clip_time_embeddings=additive_clip_time_embeddings,
                decoder_text_mask=decoder_text_mask,
            ),
            sampler=stepper,
            sampler_state=stepper.init_state(num_inference_steps, eta),
        )

    def key(self, task: Task[DecoderCondition]) -> tuple:
        """Tasks with equal keys share a forward pass: guidance on or off, and the text length (any samplers
        and step counts)."""
        return (task.cond.do_cfg, task.cond.text_encoder_hidden_states.shape[1])

    @torch.no_grad()
    def step(self, tasks: list[Task[DecoderCondition]]) -> int:
        """4. One denoising step of every task (same key), each at its own timestep, in one forward pass.
        Edits at a jump back up are re-noised instead and stay out of the pass. Returns the rows the forward
        pass held (before guidance doubles them)."""
        tasks = renoise_jumps(self.scheduler, tasks)
        if not tasks:
            return 0
        latents = torch.cat([task.latents for task in tasks])  # [B, C, s, s]
        noise_pred = self.model_output(tasks, latents)
        # compute the previous noisy sample x_t -> x_t-1 (edits: the known region pasted back at its level)
        sampler_step(self.scheduler, tasks, noise_pred, latents)
        return latents.shape[0]

    def model_output(self, tasks: list[Task[DecoderCondition]], latents: torch.Tensor) -> torch.Tensor:
        """The UNet's output for ``latents`` [B, C, s, s] (the tasks' rows, in order) at each task's current
        timestep, guided where the tasks use guidance: [B, 2C, s, s] (noise or sample; learned variance)."""
        latent_model_input, t = model_input(tasks, latents, self.device)
        noise_pred = self.decoder(
            sample=latent_model_input,
            timestep=t,
            encoder_hidden_states=conditioning(tasks, "text_encoder_hidden_states"),
            class_labels=conditioning(tasks, "additive_clip_time_embeddings"),
            attention_mask=conditioning(tasks, "decoder_text_mask"),
        ).sample

        if tasks[0].cond.do_cfg:
            # The UNet predicts [noise; variance]: guide the noise, keep the conditional variance.
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred_uncond, _ = noise_pred_uncond.split(latent_model_input.shape[1], dim=1)
            noise_pred_text, predicted_variance = noise_pred_text.split(latent_model_input.shape[1], dim=1)
            noise_pred = guided(tasks, noise_pred_uncond, noise_pred_text, self.device)
            noise_pred = torch.cat([noise_pred, predicted_variance], dim=1)
        return noise_pred

    def finish(self, task: Task) -> DecoderOutput:
        """5. The images, clamped to [-1, 1] as the reference does."""
        images = task.latents.clamp(-1, 1)
        return DecoderOutput(images=images.float().cpu(), generators=task.image_generators)

    def warmup(self) -> None:
        """A 2-step decode of zeros, so the first request does not pay for lazy init."""
        self.decode(
            torch.zeros(1, self.image_embed_dim),
            torch.zeros(2, self.text_embed_dim),
            torch.zeros(2, 4, self.hidden_dim),
            torch.ones(2, 4, dtype=torch.bool),
            [torch.Generator("cpu").manual_seed(0)],
            num_inference_steps=2,
        )


class UpsamplerEngine:
    """One super-resolution stage: <stage>_first (all but the last step), <stage>_last (the last step), and
    <stage>_scheduler. Unconditional apart from the low-resolution image (no guidance)."""

    default_num_inference_steps = 7  # Karlo's super_res_num_inference_steps
    # An edit's known region at this stage: the plain schedule (the upsampler sees the whole low-resolution
    # image the decoder's resampling already harmonised); tests swap in other schedules.
    known_region: type[KnownRegion] = UpsamplerKnownRegion

    def __init__(self, first, last, scheduler, stage="super_res", input_size=0, device="cpu"):
        self.first = first
        self.last = last
        self.scheduler = scheduler
        self.stage = stage  # "super_res" or "super_res_2"
        self.name = stage  # the step-wise stage's name (batcher, metrics)
        self.device = torch.device(device)
        self.output_size: int = first.config.sample_size  # pixels of the images it makes
        # Pixels of the images it takes (the previous stage's output size); 0 = any square size.
        self.input_size: int = input_size
        self.samplers = build_samplers(scheduler)  # every registered sampler on this stage's schedule

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        stage: str = "super_res",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> UpsamplerEngine:
        """`dtype`: the weights' precision (auto, float32, float16 or bfloat16; see models.parse_dtype).
        Tensors in and out stay float32 whatever it is."""
        dtype = models.parse_dtype(dtype, device)
        model_dir = models.resolve_model_dir(model_dir)
        first, last, scheduler = models.load_super_res(model_dir, stage, device, dtype)
        input_size = models.stage_input_size(model_dir, stage)
        return cls(first, last, scheduler, stage=stage, input_size=input_size, device=device)

    def _check(self, images, generators) -> int:
        n = check_generators(generators)
        check_count(generators, images, "images", 1)
        size = self.input_size or None
        images = check_tensor(images, "images", [n, 3, size, size], value_range=(-1.0, 1.0))
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be square, got {images.shape[-2]}x{images.shape[-1]}")
        return n

    @torch.no_grad()
    def upsample(
        self,
        images: torch.Tensor,
        generators: list[torch.Generator],
        num_inference_steps: int = 7,
        inpaint: InpaintInput | None = None,
        step_callback: StepCallback | None = None,
        sampler: str = DEFAULT_SAMPLER,
        eta: float = 0.0,
    ) -> DecoderOutput:
        """Upsamples n images [n, 3, input_size, input_size] in [-1, 1] to [n, 3, output_size, output_size].

        The output is clamped to [-1, 1] (the reference clamps when it converts to pixels; the same values),
        so it can feed the next stage of a cascade. step_callback(step, total) as in ``DecoderEngine.decode``.
        """
        check_callback(step_callback)
        task = self.start(images, generators, num_inference_steps, inpaint=inpaint, sampler=sampler, eta=eta)
        return denoise(self, task, step_callback)

    # ---- the denoising loop in steps (unclip.batching.stages): start, step until done, finish --------------

    @torch.no_grad()
    def start(
        self,
        images: torch.Tensor,
        generators: list[torch.Generator],
        num_inference_steps: int = 7,
        inpaint: InpaintInput | None = None,
        sampler: str = DEFAULT_SAMPLER,
        eta: float = 0.0,
    ) -> Task[UpsamplerCondition]:
        """``upsample``'s checks, upscaled image and initial noise: one request, ready to step."""
        num_inference_steps = check_steps(num_inference_steps)
        stepper = checked_sampler(self.samplers, sampler, eta, edit=inpaint is not None)
        n = self._check(images, generators)
        check_inpaint(inpaint, n)
        generators = list(generators)
        device = self.device

        # 1. Timesteps (an edit's known region may walk them with jumps back up: RePaint's resampling)
        size = self.output_size
        known = self.known_region.at_size(inpaint, size, device) if inpaint is not None else None
        timesteps = timesteps_for(stepper, num_inference_steps, known)

        # 2. Initial latents: per-image noise [n, C, S, S], drawn where the previous stage left the
        # generators.
        channels = self.first.config.in_channels // 2
        images = images.to(device)
        latents = randn_per_image((n, channels, size, size), generators, device, images.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        # 3. The low-resolution image, upscaled once; every step sees it beside the sample.
        if device.type == "mps":  # MPS lacks bicubic interpolation (as the reference)
            image_upscaled = F.interpolate(images, size=[size, size])
        else:
            image_upscaled = F.interpolate(
                images, size=[size, size], mode="bicubic", align_corners=False, antialias=True
            )

        return Task(
            stage=self.name,
            rows=n,
            latents=latents,
            timesteps=timesteps,
            generators=generators,
            image_generators=generators,
            known=known,
            cond=UpsamplerCondition(image_upscaled=image_upscaled, input_size=images.shape[-1]),
            sampler=stepper,
            sampler_state=stepper.init_state(num_inference_steps, eta),
        )

    def key(self, task: Task[UpsamplerCondition]) -> tuple:
        """Tasks with equal keys share a forward pass: the UNet their step needs (``last`` at a task's final
        entry, else ``first``) and the input size (any samplers and step counts)."""
        return (task.last, task.cond.input_size)

    @torch.no_grad()
    def step(self, tasks: list[Task[UpsamplerCondition]]) -> int:
        """4. One denoising step of every task (same key), each at its own timestep, in one forward pass (no
        classifier-free guidance). Edits at a jump back up are re-noised instead and stay out of the pass.
        Returns the rows the forward pass held."""
        tasks = renoise_jumps(self.scheduler, tasks)
        if not tasks:
            return 0
        unet = self.last if tasks[0].last else self.first
        latents = torch.cat([task.latents for task in tasks])  # [B, C, S, S]
        image_upscaled = torch.cat([task.cond.image_upscaled for task in tasks])

        latent_model_input = torch.cat([latents, image_upscaled], dim=1)

        noise_pred = unet(sample=latent_model_input, timestep=timestep_rows(tasks, self.device)).sample

        # compute the previous noisy sample x_t -> x_t-1 (edits: the known region pasted back at its level)
        sampler_step(self.scheduler, tasks, noise_pred, latents)
        return latents.shape[0]

    def finish(self, task: Task) -> DecoderOutput:
        """5. The images, clamped to [-1, 1] (so they can feed the next stage)."""
        images = task.latents.clamp(-1, 1)
        return DecoderOutput(images=images.float().cpu(), generators=task.image_generators)

    def warmup(self) -> None:
        """A 2-step upsample of a gray image, so the first request does not pay for lazy init."""
        size = self.input_size or self.output_size
        self.upsample(
            torch.zeros(1, 3, size, size), [torch.Generator("cpu").manual_seed(0)], num_inference_steps=2
        )
