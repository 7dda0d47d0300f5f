"""``ddim``: DDIM (Song et al. 2021), diffusers' ``DDIMScheduler.step`` over rows at different timesteps.

The configuration, derived from the stage's ``UnCLIPScheduler`` (``ddim_config``):
- betas: the stage's own schedule (``squaredcos_cap_v2`` for Karlo and the bundled model);
- ``timestep_spacing="trailing"``: the grid starts at t = 999 (pure noise, where UnCLIP's models start) and
  an inverse walk (``invert_step``) over the same grid reversed lands on the same timesteps, which is what
  DDIM inversion needs (DDIMInverseScheduler rejects UnCLIP's ``linspace`` grid);
- ``clip_sample`` / ``clip_sample_range``: the stage's (the predicted x0 is clamped as UnCLIP clamps it);
- ``set_alpha_to_one=True``: the last step lands on x0;
- ``prediction_type``: the stage's (``epsilon`` or ``sample``); the decoder's learned variance is dropped
  (DDIM has no use for it);
- ``use_clipped_model_output=False`` (diffusers' default).
As diffusers, the step goes from t to ``t - 1000 // n`` (with trailing spacing and n dividing 1000 that is the
next grid entry; otherwise it can be one off, as in diffusers).

eta (per request, 0..1): 0 is deterministic (no draw after the initial noise); above 0 each step draws one
noise of the row's shape from the row's generator, at every step including the last (as diffusers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unclip.sampling.base import Sampler, SamplerTask, draw_noise, mean_channels, per_row, register


def ddim_config(unclip_config: Any) -> dict[str, Any]:
    """``DDIMScheduler(**ddim_config(stage_scheduler.config))``: the configuration this sampler implements."""
    return dict(
        num_train_timesteps=unclip_config.num_train_timesteps,
        beta_schedule=unclip_config.beta_schedule,
        clip_sample=unclip_config.clip_sample,
        clip_sample_range=unclip_config.clip_sample_range,
        prediction_type=unclip_config.prediction_type,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )


@dataclass
class DDIMState:
    num_inference_steps: int  # the task's step count (the step size is 1000 // it, as diffusers)
    eta: float  # 0: deterministic


@register
class DDIMSampler(Sampler):
    name = "ddim"
    deterministic_at_zero_eta = True

    def __init__(self, scheduler):
        super().__init__(scheduler)
        config = scheduler.config
        self.num_train_timesteps: int = config.num_train_timesteps
        self.prediction_type: str = config.prediction_type
        self.clip_range: float | None = config.clip_sample_range if config.clip_sample else None
        self.alphas_cumprod = scheduler.alphas_cumprod.cpu()  # float32 [1000], as DDIMScheduler's
        self.final_alpha_cumprod = torch.tensor(1.0)  # set_alpha_to_one

    def timesteps(self, num_inference_steps: int) -> list[int]:
        step_ratio = self.num_train_timesteps / num_inference_steps  # DDIMScheduler "trailing"
        grid = np.round(np.arange(self.num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
        return [int(t) for t in grid]

    def init_state(self, num_inference_steps: int, eta: float = 0.0) -> DDIMState:
        return DDIMState(num_inference_steps=num_inference_steps, eta=float(eta))

    def _alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(
        self, model_output: torch.Tensor, sample: torch.Tensor, tasks: Sequence[SamplerTask]
    ) -> torch.Tensor:
        model_output = mean_channels(model_output, sample)
        t_rows, prev_rows, eta_rows = [], [], []
        for task in tasks:
            state: DDIMState = task.sampler_state
            prev = task.timestep - self.num_train_timesteps // state.num_inference_steps
            t_rows += [task.timestep] * task.rows
            prev_rows += [prev] * task.rows
            eta_rows += [state.eta] * task.rows
        # Per-row scalars, each the 0-dim value DDIMScheduler.step computes (same float32 operations).
        alpha_prod_t = torch.stack([self._alpha(t) for t in t_rows])
        alpha_prod_t_prev = torch.stack([self._alpha(p) for p in prev_rows])
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        def rows(values: torch.Tensor) -> torch.Tensor:
            return per_row(values, sample)

        pred_x0, pred_eps = self.predict(model_output, sample, alpha_prod_t, beta_prod_t)
        if self.clip_range is not None:
            pred_x0 = pred_x0.clamp(-self.clip_range, self.clip_range)
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = torch.tensor(eta_rows, dtype=torch.float32) * variance ** (0.5)
        direction = rows((1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)) * pred_eps
        prev_sample = rows(alpha_prod_t_prev ** (0.5)) * pred_x0 + direction

        noisy = [i for i, task in enumerate(tasks) if task.sampler_state.eta > 0]
        if not noisy:
            return prev_sample
        # eta > 0: one draw per row of those tasks, from the row's generator (even at the last step).
        noisy_tasks = [tasks[i] for i in noisy]
        noise = draw_noise(noisy_tasks, tuple(sample.shape[1:]), sample.device, model_output.dtype)
        starts = np.cumsum([0] + [task.rows for task in tasks])
        index = torch.tensor(
            [r for i in noisy for r in range(starts[i], starts[i + 1])], device=sample.device
        )
        return prev_sample.index_add(0, index, rows(std_dev_t)[index] * noise)

    def predict(self, model_output, sample, alpha_prod_t, beta_prod_t) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x0, predicted noise) from the model's output, per its prediction type."""
        a, b = per_row(alpha_prod_t, sample), per_row(beta_prod_t, sample)
        if self.prediction_type == "epsilon":
            return (sample - b ** (0.5) * model_output) / a ** (0.5), model_output
        if self.prediction_type == "sample":
            return model_output, (sample - a ** (0.5) * model_output) / b ** (0.5)
        if self.prediction_type == "v_prediction":
            return a**0.5 * sample - b**0.5 * model_output, a**0.5 * model_output + b**0.5 * sample
        raise ValueError(f"prediction_type {self.prediction_type!r} is not supported by DDIM")

    # ---- inversion (the seam for DDIM inversion: image -> noise, e.g. to interpolate between images) -------

    def inversion_timesteps(self, num_inference_steps: int) -> list[int]:
        """The forward grid reversed: the timesteps an inversion walks from the image up to t = 999."""
        return self.timesteps(num_inference_steps)[::-1]

    def invert_step(
        self, model_output: torch.Tensor, sample: torch.Tensor, timestep: int, next_timestep: int
    ) -> torch.Tensor:
        """x_t -> x_next (next_timestep > timestep), deterministic (eta 0): the DDIM update run backwards,
        as diffusers' DDIMInverseScheduler with the same betas, trailing grid and prediction type (without
        clipping: inversion must not alter the image's own x0)."""
        model_output = mean_channels(model_output, sample)
        alpha_prod_t = self._alpha(timestep).reshape(1)
        alpha_prod_next = self._alpha(next_timestep)
        pred_x0, pred_eps = self.predict(model_output, sample, alpha_prod_t, 1 - alpha_prod_t)
        return alpha_prod_next ** (0.5) * pred_x0 + (1 - alpha_prod_next) ** (0.5) * pred_eps
