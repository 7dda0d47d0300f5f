"""Classifier-free guidance as the guided stages (prior, decoder) run it, written once.

``start``: what a stage checks before anything else: the sampler and its eta (every stage, the upsampler
too), and for the guided stages the guidance flag, the step count and the guidance scale, in that order, so
that a request with several bad fields is refused naming the same field at every stage.

``step``: the forward pass's inputs for a group of tasks (with guidance every row twice, [uncond of all; cond
of all], as UnCLIPPipeline batches them) and the guided output, each task at its own scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from unclip.batching.stages import Task, cat_halves, guidance_scale_rows, timestep_rows
from unclip.checks import check_flag, check_guidance, check_steps
from unclip.sampling import Sampler, check_eta, check_sampler


def checked_sampler(samplers: dict[str, Sampler], name: str, eta: float, edit: bool = False) -> Sampler:
    """The registered sampler ``name`` (checked, and its eta); for an edit, one that can walk its known
    region."""
    sampler = samplers[check_sampler(name)]
    check_eta(eta)
    if edit and not sampler.supports_edits:
        editable = ", ".join(n for n, s in samplers.items() if s.supports_edits)
        raise ValueError(f"sampler {sampler.name!r} cannot run edits (inpaint); edits use {editable}")
    return sampler


class GuidedSampling(NamedTuple):
    do_cfg: bool  # classifier-free guidance: rows [uncond of all; cond of all] in the forward pass
    num_inference_steps: int
    guidance_scale: float
    sampler: Sampler
    eta: float  # 0 (deterministic) .. 1


def checked_guided_sampling(
    samplers: dict[str, Sampler],
    do_classifier_free_guidance: bool,
    num_inference_steps: int,
    guidance_scale: float,
    sampler: str,
    eta: float,
    edit: bool = False,
) -> GuidedSampling:
    """A guided stage's sampling options, checked (ValueError naming the field)."""
    do_cfg = check_flag(do_classifier_free_guidance, "do_classifier_free_guidance")
    num_inference_steps = check_steps(num_inference_steps)
    guidance_scale = check_guidance(guidance_scale)
    stepper = checked_sampler(samplers, sampler, eta, edit)
    return GuidedSampling(do_cfg, num_inference_steps, guidance_scale, stepper, check_eta(eta))


def model_input(
    tasks: list[Task], latents: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass's sample and per-row timesteps for ``latents`` (the tasks' rows, in order): with
    guidance each twice, [uncond of all; cond of all]."""
    t = timestep_rows(tasks, device)
    if tasks[0].cond.do_cfg:
        return torch.cat([latents] * 2), torch.cat([t] * 2)
    return latents, t


def conditioning(tasks: list[Task], name: str) -> torch.Tensor:
    """The tasks' conditioning tensor ``name`` (``task.cond.<name>``, [uncond; cond] rows with guidance) in
    the forward pass's row order."""
    tensors = [getattr(task.cond, name) for task in tasks]
    return cat_halves(tensors, [task.rows for task in tasks], tasks[0].cond.do_cfg)


def guided(tasks: list[Task], uncond: torch.Tensor, cond: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uncond + scale * (cond - uncond), each task at its own guidance scale (diffusers' arithmetic)."""
    return uncond + guidance_scale_rows(tasks, uncond.dim(), device) * (cond - uncond)
