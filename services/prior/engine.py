"""The prior stage: CLIP text embedding -> CLIP image embedding, torch only.

One denoising loop, step for step as ``UnCLIPPipeline.__call__``'s prior section: the same batch composition
([unconditional; conditional] rows with guidance), the same per-image generator draws (initial noise, then one
draw per step inside ``UnCLIPScheduler.step``), the same guidance math and ``post_process_latents``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from unclip import models
from unclip.checks import (
    check_callback,
    check_count,
    check_flag,
    check_generators,
    check_guidance,
    check_steps,
    check_tensor,
)
from unclip.rng import derive_generator, randn_per_image

# The most candidates the rerank may draw per image (each candidate costs a full prior sample).
MAX_CANDIDATES = 16


@dataclass
class PriorOutput:
    image_embeds: torch.Tensor  # float32 [n, D] CLIP image embeddings (after post_process_latents)
    generators: list[torch.Generator]  # the n per-image generators, advanced past the prior's draws


class PriorEngine:
    """PriorTransformer + its UnCLIPScheduler."""

    def __init__(self, prior, scheduler, device="cpu"):
        self.prior = prior
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.embedding_dim: int = prior.config.embedding_dim  # D of the image embedding it samples
        self.text_embed_dim: int = prior.embedding_proj.in_features  # D of the text embedding it reads
        self.hidden_dim: int = prior.encoder_hidden_states_proj.in_features  # H of the text hidden states
        self.num_tokens: int = prior.config.num_embeddings  # L: the tokenizer's model_max_length

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
    ) -> PriorEngine:
        """`dtype`: the weights' precision (float32, float16 or bfloat16; see models.LowPrecision). Tensors in
        and out stay float32 whatever it is."""
        dtype = models.parse_dtype(dtype)
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
    ) -> PriorOutput:
        """Samples one image embedding per generator.

        text_embeds [B, D], text_encoder_hidden_states [B, L, H], text_mask bool [B, L]: the encoder's output,
        B = 2n with guidance (rows [0, n) unconditional), else n. num_candidates k > 1 reranks: k embeddings
        are
        drawn per image and the one with the highest dot product with the image's text embedding is kept.
        step_callback(step, total) runs after every step (step = steps done, 1..total); it may raise to stop.
        """
        do_cfg = check_flag(do_classifier_free_guidance, "do_classifier_free_guidance")
        num_inference_steps = check_steps(num_inference_steps)
        guidance_scale = check_guidance(guidance_scale)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int):
            raise ValueError(f"num_candidates must be an integer, got {type(num_candidates).__name__}")
        if not 0 <= num_candidates <= MAX_CANDIDATES:
            raise ValueError(
                f"num_candidates must be in 0..{MAX_CANDIDATES} (0 or 1: no rerank), got {num_candidates}"
            )
        if num_candidates > 1 and self.text_embed_dim != self.embedding_dim:
            raise ValueError("num_candidates > 1 needs text and image embeddings of the same size (rerank)")
        check_callback(step_callback)
        n = self._check(text_embeds, text_encoder_hidden_states, text_mask, generators, do_cfg)
        k = max(1, num_candidates)
        device = self.device

        # 1. Conditioning for n * k rows: candidate j of image i is row i * k + j (k = 1: the inputs
        # unchanged).
        text_embeds = text_embeds.to(device)
        text_encoder_hidden_states = text_encoder_hidden_states.to(device)
        text_mask = text_mask.to(device)
        if k > 1:
            text_embeds = text_embeds.repeat_interleave(k, dim=0)
            text_encoder_hidden_states = text_encoder_hidden_states.repeat_interleave(k, dim=0)
            text_mask = text_mask.repeat_interleave(k, dim=0)
        # Row r draws from its candidate's generator. Candidate 0 of image i draws from the image's
        # generator in
        # exactly the order k = 1 does (initial noise, then one draw per step); candidate j >= 1 draws from
        # its
        # own generator derived from the image generator's state at entry and j (derive_generator), which
        # leaves
        # the image's generator untouched. So the image's generator ends where k = 1 leaves it (the decoder's
        # draws do not depend on k), and candidate 0 is the k = 1 sample: reranking never scores lower.
        row_generators = [
            generator if j == 0 else derive_generator(generator, j)
            for generator in generators
            for j in range(k)
        ]

        # 2. Timesteps (a private scheduler copy: set_timesteps mutates it, and requests may run
        # concurrently).
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps

        # 3. Initial latents: per-image noise [n * k, D].
        dtype = text_embeds.dtype
        latents = randn_per_image((n * k, self.embedding_dim), row_generators, device, dtype)
        latents = latents * scheduler.init_noise_sigma

        # 4. Denoising loop.
        for i, t in enumerate(timesteps):
            # expand the latents if we are doing classifier free guidance
            latent_model_input = torch.cat([latents] * 2) if do_cfg else latents

            predicted_image_embedding = self.prior(
                latent_model_input,
                timestep=t,
                proj_embedding=text_embeds,
                encoder_hidden_states=text_encoder_hidden_states,
                attention_mask=text_mask,
            ).predicted_image_embedding

            if do_cfg:
                predicted_uncond, predicted_text = predicted_image_embedding.chunk(2)
                predicted_image_embedding = predicted_uncond + guidance_scale * (
                    predicted_text - predicted_uncond
                )

            prev_timestep = None if i + 1 == timesteps.shape[0] else timesteps[i + 1]

            latents = scheduler.step(
                predicted_image_embedding,
                timestep=t,
                sample=latents,
                generator=row_generators,
                prev_timestep=prev_timestep,
            ).prev_sample

            if step_callback is not None:
                step_callback(i + 1, len(timesteps))

        image_embeds = self.prior.post_process_latents(latents)  # [n * k, D]

        # 5. Rerank (DALL-E 2 §2.2): keep the candidate with the highest dot product with the text embedding.
        if k > 1:
            cond_text_embeds = text_embeds[n * k :] if do_cfg else text_embeds  # [n * k, D]
            scores = (image_embeds * cond_text_embeds).sum(dim=-1).view(n, k)
            best = scores.argmax(dim=1)  # [n]
            image_embeds = image_embeds.view(n, k, -1)[torch.arange(n, device=device), best]

        return PriorOutput(image_embeds=image_embeds.float().cpu(), generators=list(generators))

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
