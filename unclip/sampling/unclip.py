"""``unclip``: diffusers' ``UnCLIPScheduler`` (Karlo's sampler; the default), row by row in one go.

The grid is ``UnCLIPScheduler.set_timesteps``' (linspace from 999 to 0); each step is ``batched_step``
(``unclip.batching.scheduler``), bit for bit ``UnCLIPScheduler.step`` on each row alone, with the learned
variance of the decoder used as the scheduler uses it. Noise: one draw per row at every entry but the last.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import lru_cache

import torch

from unclip.batching.scheduler import batched_step
from unclip.sampling.base import Sampler, SamplerTask, register, rows_of


@register
class UnCLIPSampler(Sampler):
    name = "unclip"
    supports_edits = True  # edits' known region (RePaint's walk) is written against this scheduler

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self._grid = lru_cache(maxsize=64)(self._compute_grid)

    def _compute_grid(self, num_inference_steps: int) -> tuple[int, ...]:
        scheduler = copy.deepcopy(self.scheduler)  # set_timesteps mutates; the stage's copy stays untouched
        scheduler.set_timesteps(num_inference_steps)
        return tuple(int(t) for t in scheduler.timesteps)

    def timesteps(self, num_inference_steps: int) -> list[int]:
        return list(self._grid(num_inference_steps))

    def step(
        self, model_output: torch.Tensor, sample: torch.Tensor, tasks: Sequence[SamplerTask]
    ) -> torch.Tensor:
        return batched_step(
            self.scheduler,
            model_output,
            rows_of(tasks, lambda task: task.timestep),
            sample,
            rows_of(tasks, lambda task: task.prev_timestep),
            [g for task in tasks for g in task.generators],
        )
