"""DDIM inversion on the decoder: an image -> the starting noise from which the decoder's DDIM walk (eta 0)
draws it again, for the DALL-E 2 paper's text diffs and inverted interpolations (arXiv 2204.06125, §3.2-3.3).

The walk is the `ddim` sampler's grid reversed (`DDIMSampler.inversion_timesteps`: trailing spacing, so the
inverse walk lands on the forward walk's timesteps) with the same conditioning as a decode (the CLIP image
embedding through text_proj, the caption, guidance). At each entry t the model is asked at the target level,
as diffusers' DDIMInverseScheduler does, and `DDIMSampler.invert_step` moves the sample from the level below
(the previous entry) up to t.

The first entry starts from the clean image (alpha = 1), where a model that predicts the sample (the bundled
decoder does) gives no noise direction: there the step takes the noise its own x0 prediction implies at t,
which is what the forward walk's last step will undo. Inversion is an approximation (the model is asked at a
point the forward walk does not visit): decoding the result gives the image back within an error measured in
tests/e2e/test_text_diff.py.
"""

from __future__ import annotations

import torch

from unclip.batching.stages import Task
from unclip.checks import check_tensor

INVERTING_SAMPLER = "ddim"  # the only sampler with an inverse walk


@torch.no_grad()
def invert(engine, images: torch.Tensor, num_inference_steps: int, **condition) -> torch.Tensor:
    """`images` float32 [n, 3, s, s] in [-1, 1] at the decoder's size -> latents [n, 3, s, s].

    `condition`: what `DecoderEngine.start` takes besides the generators and the sampler (image_embeds,
    text_embeds, text_encoder_hidden_states, text_mask, guidance_scale, do_classifier_free_guidance); the
    decode that should reproduce the image uses the same values, `sampler="ddim"`, `eta=0` and these latents.
    """
    n = images.shape[0] if isinstance(images, torch.Tensor) and images.dim() == 4 else 0
    size = engine.output_size
    images = check_tensor(images, "images", [n or None, 3, size, size], value_range=(-1.0, 1.0))
    generators = [torch.Generator().manual_seed(0) for _ in range(n)]  # unused: eta 0 draws nothing
    task: Task = engine.start(
        generators=generators,
        num_inference_steps=num_inference_steps,
        sampler=INVERTING_SAMPLER,
        eta=0.0,
        latents=images,
        **condition,
    )
    sampler = task.sampler
    grid = sampler.inversion_timesteps(num_inference_steps)  # ascending, ends at 999
    task.timesteps = grid
    sample = task.latents
    previous = -1  # the clean image's level (alpha = 1)
    for k, timestep in enumerate(grid):
        task.steps_done = k  # the model is asked at `timestep` (Task.timestep)
        output = engine.model_output([task], sample)
        if previous < 0:
            sample = _first_step(sampler, output, sample, timestep)
        else:
            sample = sampler.invert_step(output, sample, previous, timestep)
        previous = timestep
    return sample.float().cpu()


def _first_step(sampler, output: torch.Tensor, image: torch.Tensor, timestep: int) -> torch.Tensor:
    """Clean image -> level `timestep`: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with eps the noise the model's
    own prediction implies at t (epsilon models: their output; sample models: from their x0)."""
    alpha = sampler.alphas_cumprod[timestep]
    output = output[:, : image.shape[1]]  # drop the learned variance
    if sampler.prediction_type == "epsilon":
        eps = output
    else:
        x0, eps = sampler.predict(output, image, alpha.reshape(1), (1 - alpha).reshape(1))
    return alpha.sqrt() * image + (1 - alpha).sqrt() * eps
