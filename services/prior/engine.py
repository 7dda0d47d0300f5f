"""The prior stage: CLIP text embedding -> CLIP image embedding, torch only.

One denoising loop, step for step as ``UnCLIPPipeline.__call__``'s prior section: the same batch composition
([unconditional; conditional] rows with guidance), the same per-image generator draws (initial noise, then one
draw per step inside ``UnCLIPScheduler.step``), the same guidance math and ``post_process_latents``.

The loop is written once, in steps (``unclip.batching.stages``): ``start`` (1.-3.: checks, conditioning,
timesteps, initial noise), ``step`` (4.: one denoising step of a group of requests, each at its own
timestep, in one forward pass) and ``finish`` (5.: post-processing, rerank). ``sample`` is start, step until
done, finish; the step batcher drives the same three methods for many requests at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.guidance import checked_guided_sampling, conditioning, guided, model_input
from unclip import models
from unclip.batching.stages import (
    Task,
    denoise,
    sampler_step,
    timesteps_for,
)
from unclip.checks import (
    check_callback,
    check_count,
    check_generators,
    check_tensor,
)
from unclip.limits import LIMITS
from unclip.rng import derive_generator, randn_per_image
from unclip.sampling import DEFAULT_SAMPLER, build_samplers


@dataclass
class PriorCondition:
    """A prior task's conditioning and options (``Task.cond``)."""

    do_cfg: bool  # classifier-free guidance: rows [uncond of all; cond of all] in the forward pass
    guidance_scale: float
    num_candidates: int  # k embeddings drawn per image (rerank when > 1)
    text_embeds: torch.Tensor  # [B * k, D] (B = 2n with guidance), candidate j of image i at row i * k + j
    text_encoder_hidden_states: torch.Tensor  # [B * k, L, H]
    text_mask: torch.Tensor  # bool [B * k, L]


@dataclass
class PriorOutput:
    image_embeds: torch.Tensor  # float32 [n, D] CLIP image embeddings (after post_process_latents)
    generators: list[torch.Generator]  # the n per-image generators, advanced past the prior's draws


class PriorEngine:
    """PriorTransformer + its UnCLIPScheduler. Also the prior's step-wise stage (start/key/step/finish)."""

    name = "prior"  # the stage's name (batcher, metrics)

    def __init__(self, prior, scheduler, device="cpu"):
        self.prior = prior
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.embedding_dim: int = prior.config.embedding_dim  # D of the image embedding it samples
        self.text_embed_dim: int = prior.embedding_proj.in_features  # D of the text embedding it reads
        self.hidden_dim: int = prior.encoder_hidden_states_proj.in_features  # H of the text hidden states
        self.num_tokens: int = prior.config.num_embeddings  # L: the tokenizer's model_max_length
        self.samplers = build_samplers(scheduler)  # every registered sampler on this stage's schedule

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
    ) -> PriorEngine:
        """`dtype`: the weights' precision (auto, float32, float16 or bfloat16; see models.parse_dtype).
        Tensors in and out stay float32 whatever it is."""
        dtype = models.parse_dtype(dtype, device)
        model_dir = models.resolve_model_dir(model_dir)
        return cls(
            prior=models.load_prior(model_dir, device, dtype),
            scheduler=models.load_scheduler(model_dir, "prior_scheduler"),
            device=device,
        )

    def _check(self, text_embeds, text_encoder_hidden_states, text_mask, generators, do_cfg) -> int:
        n = check_generators(generators)
        rows = 2 * n if do_cfg else n  # guidance doubles the batch: [unconditional; conditional]
        check_count(generators, text_embeds, "text_embeds", 2 if do_cfg else 1)
        check_tensor(text_embeds, "text_embeds", [rows, self.text_embed_dim])
        check_tensor(
            text_encoder_hidden_states, "text_encoder_hidden_states", [rows, self.num_tokens, self.hidden_dim]
        )
        check_tensor(text_mask, "text_mask", [rows, self.num_tokens], dtype=torch.bool)
        return n

    @torch.no_grad()
    def sample(
        self,
        text_embeds: torch.Tensor,
        text_encoder_hidden_states: torch.Tensor,
        text_mask: torch.Tensor,
        generators: list[torch.Generator],
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        do_classifier_free_guidance: bool = True,
        num_candidates: int = 1,
        step_callback: Callable[[int, int], None] | None = None,
        sampler: str = DEFAULT_SAMPLER,
        eta: float = 0.0,
    ) -> PriorOutput:
        """Samples one image embedding per generator.

        text_embeds [B, D], text_encoder_hidden_states [B, L, H], text_mask bool [B, L]: the encoder's output,
        B = 2n with guidance (rows [0, n) unconditional), else n. num_candidates k > 1 reranks: k embeddings
        are drawn per image and the one with the highest dot product with the image's text embedding is kept.
        step_callback(step, total) runs after every step (step = steps done, 1..total); it may raise to stop.
        sampler: a registered sampler's name (unclip.sampling); eta: its stochasticity where it has one
        (ddim).
        """
        check_callback(step_callback)
        task = self.start(
            text_embeds,
            text_encoder_hidden_states,
            text_mask,
            generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            do_classifier_free_guidance=do_classifier_free_guidance,
            num_candidates=num_candidates,
            sampler=sampler,
            eta=eta,
        )
        return denoise(self, task, step_callback)

    # ---- the denoising loop in steps (unclip.batching.stages): start, step until done, finish --------------

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
        sampler: str = DEFAULT_SAMPLER,
        eta: float = 0.0,
    ) -> Task[PriorCondition]:
        """``sample``'s checks, conditioning and initial noise: one request, ready to step."""
        do_cfg, num_inference_steps, guidance_scale, stepper, eta = checked_guided_sampling(
            self.samplers, do_classifier_free_guidance, num_inference_steps, guidance_scale, sampler, eta
        )
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int):
            raise ValueError(f"num_candidates must be an integer, got {type(num_candidates).__name__}")
        most = LIMITS["prior_candidates"].high
        if not 0 <= num_candidates <= most:
            raise ValueError(f"num_candidates must be in 0..{most} (0 or 1: no rerank), got {num_candidates}")
        if num_candidates > 1 and self.text_embed_dim != self.embedding_dim:
            raise ValueError("num_candidates > 1 needs text and image embeddings of the same size (rerank)")
        n = self._check(text_embeds, text_encoder_hidden_states, text_mask, generators, do_cfg)
        k = max(1, num_candidates)
        device = self.device

        # 1. Conditioning for n * k rows: candidate j of image i is row i * k + j (k = 1: inputs unchanged).
        text_embeds = text_embeds.to(device)
        text_encoder_hidden_states = text_encoder_hidden_states.to(device)
        text_mask = text_mask.to(device)
        if k > 1:
            text_embeds = text_embeds.repeat_interleave(k, dim=0)
            text_encoder_hidden_states = text_encoder_hidden_states.repeat_interleave(k, dim=0)
            text_mask = text_mask.repeat_interleave(k, dim=0)
        # Row r draws from its candidate's generator. Candidate 0 of image i draws from the image's generator
        # in exactly the order k = 1 does (initial noise, then one draw per step); candidate j >= 1 draws from
        # its own generator derived from the image generator's state at entry and j (derive_generator), which
        # leaves the image's generator untouched. So the image's generator ends where k = 1 leaves it (the
        # decoder's draws do not depend on k), and candidate 0 is the k = 1 sample: reranking never scores
        # lower.
        row_generators = [
            generator if j == 0 else derive_generator(generator, j)
            for generator in generators
            for j in range(k)
        ]

        # 2. Timesteps
        timesteps = timesteps_for(stepper, num_inference_steps)

        # 3. Initial latents: per-image noise [n * k, D].
        latents = randn_per_image((n * k, self.embedding_dim), row_generators, device, text_embeds.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        return Task(
            stage=self.name,
            rows=n * k,
            latents=latents,
            timesteps=timesteps,
            generators=row_generators,
            image_generators=list(generators),
            cond=PriorCondition(
                do_cfg=do_cfg,
                guidance_scale=guidance_scale,
                num_candidates=k,
                text_embeds=text_embeds,
                text_encoder_hidden_states=text_encoder_hidden_states,
                text_mask=text_mask,
            ),
            sampler=stepper,
            sampler_state=stepper.init_state(num_inference_steps, eta),
        )

    def key(self, task: Task[PriorCondition]) -> tuple:
        """Tasks with equal keys share a forward pass: guidance on or off (any samplers and step counts)."""
        return (task.cond.do_cfg,)

    @torch.no_grad()
    def step(self, tasks: list[Task[PriorCondition]]) -> int:
        """4. One denoising step of every task (same key), each at its own timestep, in one forward pass.
        Returns the rows the forward pass held (before guidance doubles them)."""
        latents = torch.cat([task.latents for task in tasks])  # [B, D]
        latent_model_input, t = model_input(tasks, latents, self.device)
        predicted_image_embedding = self.prior(
            latent_model_input,
            timestep=t,
            proj_embedding=conditioning(tasks, "text_embeds"),
            encoder_hidden_states=conditioning(tasks, "text_encoder_hidden_states"),
            attention_mask=conditioning(tasks, "text_mask"),
        ).predicted_image_embedding

        if tasks[0].cond.do_cfg:
            predicted_uncond, predicted_text = predicted_image_embedding.chunk(2)
            predicted_image_embedding = guided(tasks, predicted_uncond, predicted_text, self.device)

        # x_t -> x_t-1, each task with its own sampler, each row with its own generator
        sampler_step(self.scheduler, tasks, predicted_image_embedding, latents)
        return latents.shape[0]

    @torch.no_grad()
    def finish(self, task: Task[PriorCondition]) -> PriorOutput:
        """5. The image embeddings, reranked (DALL-E 2 §2.2) when k > 1 candidates were drawn per image."""
        k = task.cond.num_candidates
        image_embeds = self.prior.post_process_latents(task.latents)  # [n * k, D]

        # keep the candidate with the highest dot product with the (conditional) text embedding
        if k > 1:
            n = task.rows // k
            text_embeds = task.cond.text_embeds
            cond_text_embeds = text_embeds[n * k :] if task.cond.do_cfg else text_embeds  # [n * k, D]
            scores = (image_embeds * cond_text_embeds).sum(dim=-1).view(n, k)
            best = scores.argmax(dim=1)  # [n]
            image_embeds = image_embeds.view(n, k, -1)[torch.arange(n, device=image_embeds.device), best]

        return PriorOutput(image_embeds=image_embeds.float().cpu(), generators=task.image_generators)

    def warmup(self) -> None:
        """A 2-step sample with zero conditioning, so the first request does not pay for lazy init."""
        rows = 2
        self.sample(
            torch.zeros(rows, self.text_embed_dim),
            torch.zeros(rows, self.num_tokens, self.hidden_dim),
            torch.ones(rows, self.num_tokens, dtype=torch.bool),
            [torch.Generator("cpu").manual_seed(0)],
            num_inference_steps=2,
        )
