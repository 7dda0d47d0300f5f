"""The denoising stages cut into steps, so requests can share forward passes step by step.

Each engine's loop (``PriorEngine.sample``, ``DecoderEngine.decode``, ``UpsamplerEngine.upsample``) runs
one request from its first step to its last. Here the same loop is split in three: ``start`` (checks,
conditioning, initial noise: what comes before the loop), ``step`` (one iteration of the loop for a group of
requests, each at its own step of its own schedule, in one forward pass) and ``finish`` (what comes after the
loop). A request is a ``Task``; ``unclip.batching.batcher.StepBatcher`` decides which tasks step together.

What batching keeps and what it changes:
- every row draws from its own image's generator, in the engine's order (initial noise in ``start``, the
  scheduler's draw in ``batched_step``, the edit's draw right after it), so batching never changes the noise;
- with classifier-free guidance the forward pass holds [unconditional rows of every task; conditional rows of
  every task], the two halves of guidance in one pass, each task with its own guidance scale;
- the float rounding of a forward pass depends on its batch (kernels differ by batch size), so an image
  batched with others can differ from the same image alone by a small drift (measured in tests/batching). A
  task stepped alone takes exactly the engine's operations, bit for bit (``deterministic``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from services.decoder.engine import DecoderEngine, DecoderOutput, UpsamplerEngine
from services.decoder.inpaint import InpaintInput, KnownRegion, check_inpaint
from services.prior.engine import MAX_CANDIDATES, PriorEngine, PriorOutput
from unclip.batching.scheduler import batched_step
from unclip.checks import check_flag, check_guidance, check_steps
from unclip.rng import derive_generator, randn_per_image


@dataclass(eq=False)
class Task:
    """One request's denoising state inside a stage."""

    stage: str  # "prior", "decoder", "super_res", ...
    rows: int  # samples it adds to a forward pass (images; n * k for a reranking prior), before guidance
    latents: torch.Tensor  # [rows, ...] the current sample
    timesteps: list[int]  # its own schedule
    generators: list[torch.Generator]  # one per row
    image_generators: list[torch.Generator]  # one per image: what the output hands on
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific conditioning
    steps_done: int = 0  # denoising steps completed: the stage's own step counter

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.steps_done >= len(self.timesteps)

    @property
    def timestep(self) -> int:
        return self.timesteps[self.steps_done]

    @property
    def prev_timestep(self) -> int | None:
        """None at the last step, as the engines pass it (the scheduler then uses t - 1, adds no noise)."""
        i = self.steps_done + 1
        return None if i == len(self.timesteps) else self.timesteps[i]


def _timesteps(scheduler, num_inference_steps: int) -> list[int]:
    scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates the scheduler
    scheduler.set_timesteps(num_inference_steps)
    return [int(t) for t in scheduler.timesteps]


def _cat_halves(tensors: list[torch.Tensor], counts: list[int], do_cfg: bool) -> torch.Tensor:
    """Tasks' [2n_i, ...] tensors ([uncond; cond] each) -> [uncond of all; cond of all]; else a plain cat."""
    if not do_cfg:
        return torch.cat(tensors)
    uncond = [t[:n] for t, n in zip(tensors, counts, strict=True)]
    cond = [t[n:] for t, n in zip(tensors, counts, strict=True)]
    return torch.cat(uncond + cond)


def _guidance(tasks: list[Task], ndim: int, device) -> float | torch.Tensor:
    """One float when the group shares a guidance scale (the engines' arithmetic), else one per row."""
    scales = [task.extra["guidance_scale"] for task in tasks]
    if all(s == scales[0] for s in scales):
        return scales[0]
    per_row = torch.tensor([s for task, s in zip(tasks, scales, strict=True) for _ in range(task.rows)])
    return per_row.reshape(-1, *([1] * (ndim - 1))).to(device)


def _split(tensor: torch.Tensor, tasks: list[Task]) -> list[torch.Tensor]:
    return list(tensor.split([task.rows for task in tasks]))


def _scheduler_step(scheduler, tasks: list[Task], model_output: torch.Tensor, latents: torch.Tensor) -> None:
    """The scheduler step of every task's rows at once, then each task's latents (and edit) updated."""
    timesteps = [task.timestep for task in tasks for _ in range(task.rows)]
    prevs = [task.prev_timestep for task in tasks for _ in range(task.rows)]
    generators = [g for task in tasks for g in task.generators]
    prev_sample = batched_step(scheduler, model_output, timesteps, latents, prevs, generators)
    for task, rows in zip(tasks, _split(prev_sample, tasks), strict=True):
        known = task.extra.get("known")
        if known is not None:  # edits: the known region at the new noise level, drawn after the step's draw
            rows = known.paste(rows, scheduler, task.prev_timestep, task.generators)
        task.latents = rows
        task.steps_done += 1


class PriorStage:
    """PriorEngine.sample in steps. Group key: guidance on or off."""

    name = "prior"

    def __init__(self, engine: PriorEngine):
        self.engine = engine

    @torch.no_grad()
    def start(
        self,
        text_embeds: torch.Tensor,
        text_encoder_hidden_states: torch.Tensor,
        text_mask: torch.Tensor,
        generators: list[torch.Generator],
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        do_classifier_free_guidance: bool = True,
        num_candidates: int = 1,
    ) -> Task:
        engine = self.engine
        do_cfg = check_flag(do_classifier_free_guidance, "do_classifier_free_guidance")
        num_inference_steps = check_steps(num_inference_steps)
        guidance_scale = check_guidance(guidance_scale)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int):
            raise ValueError(f"num_candidates must be an integer, got {type(num_candidates).__name__}")
        if not 0 <= num_candidates <= MAX_CANDIDATES:
            raise ValueError(f"num_candidates must be in 0..{MAX_CANDIDATES}, got {num_candidates}")
        if num_candidates > 1 and engine.text_embed_dim != engine.embedding_dim:
            raise ValueError("num_candidates > 1 needs text and image embeddings of the same size (rerank)")
        n = engine._check(text_embeds, text_encoder_hidden_states, text_mask, generators, do_cfg)
        k, device = max(1, num_candidates), engine.device
        text_embeds = text_embeds.to(device)
        hidden = text_encoder_hidden_states.to(device)
        mask = text_mask.to(device)
        if k > 1:  # candidate j of image i is row i * k + j (as PriorEngine.sample)
            text_embeds, hidden, mask = (x.repeat_interleave(k, dim=0) for x in (text_embeds, hidden, mask))
        row_generators = [g if j == 0 else derive_generator(g, j) for g in generators for j in range(k)]
        timesteps = _timesteps(engine.scheduler, num_inference_steps)
        latents = randn_per_image((n * k, engine.embedding_dim), row_generators, device, text_embeds.dtype)
        latents = latents * engine.scheduler.init_noise_sigma
        return Task(
            stage=self.name,
            rows=n * k,
            latents=latents,
            timesteps=timesteps,
            generators=row_generators,
            image_generators=list(generators),
            extra={
                "do_cfg": do_cfg,
                "guidance_scale": guidance_scale,
                "k": k,
                "text_embeds": text_embeds,
                "hidden": hidden,
                "mask": mask,
            },
        )

    def key(self, task: Task) -> tuple:
        return (task.extra["do_cfg"],)

    @torch.no_grad()
    def step(self, tasks: list[Task]) -> None:
        engine, do_cfg = self.engine, tasks[0].extra["do_cfg"]
        counts = [task.rows for task in tasks]
        latents = torch.cat([task.latents for task in tasks])  # [B, D]
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        t = torch.tensor([task.timestep for task in tasks for _ in range(task.rows)], device=engine.device)
        predicted = engine.prior(
            latent_model_input,
            timestep=torch.cat([t] * 2) if do_cfg else t,
            proj_embedding=_cat_halves([task.extra["text_embeds"] for task in tasks], counts, do_cfg),
            encoder_hidden_states=_cat_halves([task.extra["hidden"] for task in tasks], counts, do_cfg),
            attention_mask=_cat_halves([task.extra["mask"] for task in tasks], counts, do_cfg),
        ).predicted_image_embedding
        if do_cfg:
            predicted_uncond, predicted_text = predicted.chunk(2)
            scale = _guidance(tasks, predicted_uncond.dim(), engine.device)
            predicted = predicted_uncond + scale * (predicted_text - predicted_uncond)
        _scheduler_step(engine.scheduler, tasks, predicted, latents)

    @torch.no_grad()
    def finish(self, task: Task) -> PriorOutput:
        engine, k = self.engine, task.extra["k"]
        image_embeds = engine.prior.post_process_latents(task.latents)  # [n * k, D]
        if k > 1:  # rerank as PriorEngine.sample: the candidate closest to the conditional text embedding
            n = task.rows // k
            text_embeds = task.extra["text_embeds"]
            cond = text_embeds[n * k :] if task.extra["do_cfg"] else text_embeds
            best = (image_embeds * cond).sum(dim=-1).view(n, k).argmax(dim=1)
            image_embeds = image_embeds.view(n, k, -1)[torch.arange(n, device=image_embeds.device), best]
        return PriorOutput(image_embeds=image_embeds.float().cpu(), generators=task.image_generators)


class DecoderStage:
    """DecoderEngine.decode in steps. Group key: guidance on or off, and the text length."""

    name = "decoder"

    def __init__(self, engine: DecoderEngine):
        self.engine = engine

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
    ) -> Task:
        engine = self.engine
        do_cfg = check_flag(do_classifier_free_guidance, "do_classifier_free_guidance")
        num_inference_steps = check_steps(num_inference_steps)
        guidance_scale = check_guidance(guidance_scale)
        n = engine._check(
            image_embeds, text_embeds, text_encoder_hidden_states, text_mask, generators, do_cfg
        )
        check_inpaint(inpaint, n)
        generators, device = list(generators), engine.device
        # as DecoderEngine.decode, 1. conditioning, 2. timesteps, 3. initial latents
        hidden, time_embeds = engine.text_proj(
            image_embeddings=image_embeds.to(device),
            prompt_embeds=text_embeds.to(device),
            text_encoder_hidden_states=text_encoder_hidden_states.to(device),
            do_classifier_free_guidance=do_cfg,
        )
        extra_tokens = engine.text_proj.clip_extra_context_tokens
        mask = F.pad(text_mask.to(device), (extra_tokens, 0), value=True)  # [B, extra + L]
        timesteps = _timesteps(engine.scheduler, num_inference_steps)
        channels, size = engine.decoder.config.in_channels, engine.output_size
        latents = randn_per_image((n, channels, size, size), generators, device, hidden.dtype)
        latents = latents * engine.scheduler.init_noise_sigma
        known = KnownRegion.at_size(inpaint, size, device) if inpaint is not None else None
        return Task(
            stage=self.name,
            rows=n,
            latents=latents,
            timesteps=timesteps,
            generators=generators,
            image_generators=generators,
            extra={
                "do_cfg": do_cfg,
                "guidance_scale": guidance_scale,
                "hidden": hidden,
                "time_embeds": time_embeds,
                "mask": mask,
                "known": known,
            },
        )

    def key(self, task: Task) -> tuple:
        return (task.extra["do_cfg"], task.extra["hidden"].shape[1])

    @torch.no_grad()
    def step(self, tasks: list[Task]) -> None:
        engine, do_cfg = self.engine, tasks[0].extra["do_cfg"]
        counts = [task.rows for task in tasks]
        latents = torch.cat([task.latents for task in tasks])  # [B, C, s, s]
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        t = torch.tensor([task.timestep for task in tasks for _ in range(task.rows)], device=engine.device)
        noise_pred = engine.decoder(
            sample=latent_model_input,
            timestep=torch.cat([t] * 2) if do_cfg else t,
            encoder_hidden_states=_cat_halves([task.extra["hidden"] for task in tasks], counts, do_cfg),
            class_labels=_cat_halves([task.extra["time_embeds"] for task in tasks], counts, do_cfg),
            attention_mask=_cat_halves([task.extra["mask"] for task in tasks], counts, do_cfg),
        ).sample
        if do_cfg:  # guide the noise, keep the conditional variance (as DecoderEngine.decode)
            channels = latent_model_input.shape[1]
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred_uncond, _ = noise_pred_uncond.split(channels, dim=1)
            noise_pred_text, predicted_variance = noise_pred_text.split(channels, dim=1)
            scale = _guidance(tasks, noise_pred_uncond.dim(), engine.device)
            noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
            noise_pred = torch.cat([noise_pred, predicted_variance], dim=1)
        _scheduler_step(engine.scheduler, tasks, noise_pred, latents)

    def finish(self, task: Task) -> DecoderOutput:
        return DecoderOutput(images=task.latents.clamp(-1, 1).float().cpu(), generators=task.image_generators)


class UpsamplerStage:
    """UpsamplerEngine.upsample in steps. Group key: which UNet the step needs (first, or last at a task's
    final step) and the input size."""

    def __init__(self, engine: UpsamplerEngine):
        self.engine = engine
        self.name = engine.stage

    @torch.no_grad()
    def start(
        self,
        images: torch.Tensor,
        generators: list[torch.Generator],
        num_inference_steps: int = 7,
        inpaint: InpaintInput | None = None,
    ) -> Task:
        engine = self.engine
        num_inference_steps = check_steps(num_inference_steps)
        n = engine._check(images, generators)
        check_inpaint(inpaint, n)
        generators, device = list(generators), engine.device
        timesteps = _timesteps(engine.scheduler, num_inference_steps)
        channels, size = engine.first.config.in_channels // 2, engine.output_size
        images = images.to(device)
        latents = randn_per_image((n, channels, size, size), generators, device, images.dtype)
        latents = latents * engine.scheduler.init_noise_sigma
        known = KnownRegion.at_size(inpaint, size, device) if inpaint is not None else None
        if device.type == "mps":  # MPS lacks bicubic interpolation (as the reference)
            upscaled = F.interpolate(images, size=[size, size])
        else:
            upscaled = F.interpolate(
                images, size=[size, size], mode="bicubic", align_corners=False, antialias=True
            )
        return Task(
            stage=self.name,
            rows=n,
            latents=latents,
            timesteps=timesteps,
            generators=generators,
            image_generators=generators,
            extra={"upscaled": upscaled, "known": known, "input_size": images.shape[-1]},
        )

    def key(self, task: Task) -> tuple:
        return (task.steps_done == task.total - 1, task.extra["input_size"])

    @torch.no_grad()
    def step(self, tasks: list[Task]) -> None:
        engine = self.engine
        last = tasks[0].steps_done == tasks[0].total - 1
        unet = engine.last if last else engine.first
        latents = torch.cat([task.latents for task in tasks])  # [B, C, S, S]
        upscaled = torch.cat([task.extra["upscaled"] for task in tasks])
        t = torch.tensor([task.timestep for task in tasks for _ in range(task.rows)], device=engine.device)
        noise_pred = unet(sample=torch.cat([latents, upscaled], dim=1), timestep=t).sample
        _scheduler_step(engine.scheduler, tasks, noise_pred, latents)

    def finish(self, task: Task) -> DecoderOutput:
        return DecoderOutput(images=task.latents.clamp(-1, 1).float().cpu(), generators=task.image_generators)


def stage_for(engine: Any) -> PriorStage | DecoderStage | UpsamplerStage:
    """The step-wise view of a loaded engine."""
    if isinstance(engine, PriorEngine):
        return PriorStage(engine)
    if isinstance(engine, DecoderEngine):
        return DecoderStage(engine)
    if isinstance(engine, UpsamplerEngine):
        return UpsamplerStage(engine)
    raise ValueError(
        f"engine must be a PriorEngine, DecoderEngine or UpsamplerEngine, got {type(engine).__name__}"
    )
