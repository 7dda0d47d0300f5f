"""``dpmsolver++``: DPM-Solver++ 2M (Lu et al. 2022), diffusers' ``DPMSolverMultistepScheduler`` over rows at
different steps of different grids.

The configuration, derived from the stage's ``UnCLIPScheduler`` (``dpmsolver_config``):
- ``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``,
  ``lower_order_final=True``, ``final_sigmas_type="zero"`` (diffusers' defaults: a first-order last step
  that lands on x0, and first-order last two steps below 15 steps);
- betas: the stage's own schedule; ``lambda_min_clipped=-5.1``: for the cosine schedule
  (``squaredcos_cap_v2``) log-SNR falls to about -10 at t = 999, where the data-prediction update divides by
  a vanishing alpha; diffusers recommends clipping it for cosine schedules, which starts the grid at t = 995;
- ``timestep_spacing="trailing"`` (as ``ddim``); deterministic: no noise after the initial one;
- ``prediction_type``: the stage's. The decoder's learned variance is dropped before the update (diffusers
  does that only for ``epsilon``; the bundled decoder predicts ``sample``: here the stage guides and the
  sampler steps the first 3 channels for every prediction type, as ``UnCLIPPipeline`` guides them);
- clipping: ``thresholding=True, sample_max_value=1.0`` when the stage clips x0 to [-1, 1] (diffusers'
  dynamic thresholding with s clamped to [1, 1] is exactly that clamp); other clip ranges (the prior's 5.0)
  are not clipped (diffusers divides by s above 1, which is not UnCLIP's clamp).

Per-task state: the previous data prediction (x0) and how many steps it took; the grids (timesteps and sigmas)
come from diffusers' own ``set_timesteps``, cached per step count.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler

from unclip.sampling.base import Sampler, SamplerTask, mean_channels, per_row, register

LAMBDA_MIN_CLIPPED = -5.1  # diffusers' recommendation for the cosine schedule


def dpmsolver_config(unclip_config: Any) -> dict[str, Any]:
    """``DPMSolverMultistepScheduler(**dpmsolver_config(stage_scheduler.config))``: the configuration this
    sampler implements."""
    clamps_to_one = bool(unclip_config.clip_sample) and float(unclip_config.clip_sample_range) == 1.0
    return dict(
        num_train_timesteps=unclip_config.num_train_timesteps,
        beta_schedule=unclip_config.beta_schedule,
        prediction_type=unclip_config.prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        lambda_min_clipped=LAMBDA_MIN_CLIPPED,
        timestep_spacing="trailing",
        thresholding=clamps_to_one,
        sample_max_value=1.0,
        dynamic_thresholding_ratio=0.995,
    )


@dataclass
class DPMSolverState:
    num_inference_steps: int  # picks the grid
    previous_x0: torch.Tensor | None = None  # the data prediction of the previous step (2nd order needs it)
    lower_order_nums: int = 0  # steps taken, up to the solver order (diffusers' counter)


@dataclass(frozen=True)
class _Grid:
    timesteps: tuple[int, ...]
    sigmas: torch.Tensor  # float32 [n + 1], the last one 0


@register
class DPMSolverPlusPlusSampler(Sampler):
    name = "dpmsolver++"

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.config = dpmsolver_config(scheduler.config)
        self._reference = DPMSolverMultistepScheduler(**self.config)
        self._grid = lru_cache(maxsize=64)(self._compute_grid)

    def _compute_grid(self, num_inference_steps: int) -> _Grid:
        scheduler = copy.deepcopy(self._reference)
        scheduler.set_timesteps(num_inference_steps)
        return _Grid(tuple(int(t) for t in scheduler.timesteps), scheduler.sigmas.clone())

    def timesteps(self, num_inference_steps: int) -> list[int]:
        return list(self._grid(num_inference_steps).timesteps)

    def init_state(self, num_inference_steps: int, eta: float = 0.0) -> DPMSolverState:
        return DPMSolverState(num_inference_steps=num_inference_steps)

    @staticmethod
    def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def step(
        self, model_output: torch.Tensor, sample: torch.Tensor, tasks: Sequence[SamplerTask]
    ) -> torch.Tensor:
        model_output = mean_channels(model_output, sample)
        x0 = self._data_prediction(model_output, sample, tasks)
        sample = sample.to(torch.float32)
        out, start = [], 0
        # Per task (its rows share one step index): the coefficients are 0-dim tensors, as diffusers computes
        # them; the tensor arithmetic is the same expression on the task's rows.
        for task in tasks:
            rows = slice(start, start + task.rows)
            start += task.rows
            out.append(self._update(task, x0[rows], sample[rows]))
        return torch.cat(out).to(model_output.dtype)

    def _data_prediction(self, model_output, sample, tasks) -> torch.Tensor:
        prediction_type = self.config["prediction_type"]
        if prediction_type == "sample":
            x0 = model_output
        else:
            sigmas = torch.stack(
                [self._grid(task.sampler_state.num_inference_steps).sigmas[task.steps_done] for task in tasks]
            )
            counts = torch.tensor([task.rows for task in tasks])
            alpha_t, sigma_t = self._alpha_sigma(sigmas.repeat_interleave(counts))
            alpha_t, sigma_t = per_row(alpha_t, sample), per_row(sigma_t, sample)
            if prediction_type == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif prediction_type == "v_prediction":
                x0 = alpha_t * sample - sigma_t * model_output
            else:
                raise ValueError(f"prediction_type {prediction_type!r} is not supported by DPM-Solver++")
        if self.config["thresholding"]:  # sample_max_value 1: s is clamped to 1, i.e. clamp to [-1, 1]
            x0 = x0.clamp(-1.0, 1.0)
        return x0

    def _update(self, task: SamplerTask, x0: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        state: DPMSolverState = task.sampler_state
        grid = self._grid(state.num_inference_steps)
        i, n = task.steps_done, len(grid.timesteps)
        lower_order_final = i == n - 1  # final_sigmas_type "zero" (and lower_order_final below 15 steps)
        lower_order_second = i == n - 2 and n < 15
        alpha_t, sigma_t = self._alpha_sigma(grid.sigmas[i + 1])
        alpha_s0, sigma_s0 = self._alpha_sigma(grid.sigmas[i])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        if state.lower_order_nums < 1 or lower_order_final:
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:  # 2nd order, midpoint (solver_order 2: also at lower_order_second)
            del lower_order_second  # with solver_order 2 the second-to-last step is 2nd order anyway
            alpha_s1, sigma_s1 = self._alpha_sigma(grid.sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            h_0 = lambda_s0 - lambda_s1
            r0 = h_0 / h
            d0, d1 = x0, (1.0 / r0) * (x0 - state.previous_x0)
            x_t = (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        state.previous_x0 = x0
        state.lower_order_nums = min(state.lower_order_nums + 1, 2)
        return x_t
