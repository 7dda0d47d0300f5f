"""The ``Sampler`` contract: how a denoising stage turns a model output into the next sample.

diffusers separates the scheduler from the pipeline; a serving stage needs one more thing from it: one step
over a batch whose rows sit at different timesteps (step-level batching puts requests that joined at
different moments, or asked for other step counts, in one forward pass). A ``Sampler`` is therefore
stateless across requests and keeps what a multistep method remembers in a per-task state object
(``init_state``), which the stage stores on its task.

Rules every sampler follows (the stages and the batcher rely on them):
- ``timesteps(n)`` is the grid a request with n steps walks, highest first; the stage passes each entry to
  the model as its ``timestep``.
- ``step`` advances every row by one entry of its own task's grid and returns the new sample; row r of
  ``sample`` belongs to the task that ``tasks`` lists at that position (tasks own ``rows`` consecutive rows).
- Noise is drawn only from each row's own generator (``task.generators``), one draw of the row's shape, in
  the order the matching diffusers scheduler draws it, so a request's pictures do not depend on its company.
- A task's state is touched only by ``step`` on that task's rows: two tasks never share state.
- A model output with twice the sample's channels carries a learned variance (UnCLIP's decoder); a sampler
  that does not use it steps the first half only, as ``UnCLIPPipeline`` guides the first 3 channels.

A new sampler is one subclass plus ``@register``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch


class SamplerTask(Protocol):
    """What a sampler reads of a stage's task (``unclip.batching.stages.Task`` has all of it)."""

    rows: int  # consecutive rows of the batch that belong to the task
    generators: list[torch.Generator]  # one per row
    steps_done: int  # index of the current entry of its grid
    sampler_state: Any  # what init_state returned; updated in place by step

    @property
    def timestep(self) -> int: ...  # the current entry

    @property
    def prev_timestep(self) -> int | None: ...  # the next entry, None at the last one

    @property
    def total(self) -> int: ...  # entries in its grid


class Sampler(ABC):
    """One sampling method for one stage, built from the stage's training schedule (its ``UnCLIPScheduler``:
    betas, prediction type, clipping, variance type)."""

    name: ClassVar[str]  # the public name (SamplingParams.*_sampler, --sampler)
    deterministic_at_zero_eta: ClassVar[bool] = False  # True: with eta 0 no noise is drawn after the start
    supports_edits: ClassVar[bool] = False  # True: RePaint's known-region walk works with this sampler

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler  # the stage's UnCLIPScheduler (read only; never set_timesteps on it)

    @abstractmethod
    def timesteps(self, num_inference_steps: int) -> list[int]:
        """The grid of a request with ``num_inference_steps`` steps, highest first."""

    def init_state(self, num_inference_steps: int, eta: float = 0.0) -> Any:
        """Per-task state (None when the method keeps none). ``eta``: the stochasticity where the method has
        one (DDIM), else ignored."""
        return None

    @abstractmethod
    def step(
        self, model_output: torch.Tensor, sample: torch.Tensor, tasks: Sequence[SamplerTask]
    ) -> torch.Tensor:
        """x_t -> x_t-1 for every row, each at its own task's current entry (see the module rules)."""


def rows_of(tasks: Sequence[SamplerTask], values: Callable[[SamplerTask], Any]) -> list[Any]:
    """One value per row: ``values(task)`` repeated over the task's rows."""
    return [values(task) for task in tasks for _ in range(task.rows)]


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] on ``like``'s device, broadcasting against ``like`` [B, ...]."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1))).to(like.device)


def mean_channels(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The model's prediction without a learned variance: the first half of the channels when the output
    has twice the sample's (UnCLIP's decoder), else the output as is."""
    if model_output.dim() > 1 and model_output.shape[1] == 2 * sample.shape[1]:
        return model_output[:, : sample.shape[1]]
    return model_output


def draw_noise(tasks: Sequence[SamplerTask], row_shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """[B, *row_shape]: one draw per row from that row's own generator (diffusers' randn_tensor with a list
    of generators draws the same way)."""
    generators = [g for task in tasks for g in task.generators]
    noise = [torch.randn((1, *row_shape), generator=g, device="cpu", dtype=dtype) for g in generators]
    return torch.cat(noise).to(device)


# ---- registry ----------------------------------------------------------------------------------------------

SAMPLERS: dict[str, type[Sampler]] = {}
DEFAULT_SAMPLER = "unclip"  # today's sampler: what an unset field means


def register(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: makes the sampler available by its ``name`` everywhere (stages, API, CLI)."""
    SAMPLERS[cls.name] = cls
    return cls


def sampler_names() -> list[str]:
    """Registered names, the default first."""
    return sorted(SAMPLERS, key=lambda name: (name != DEFAULT_SAMPLER, name))


def check_sampler(name: str, field: str = "sampler") -> str:
    """``name`` ('' = the default) if it is a registered sampler; else ValueError naming ``field``."""
    name = name or DEFAULT_SAMPLER
    if name not in SAMPLERS:
        raise ValueError(f"{field} must be one of {', '.join(sampler_names())}, got {name!r}")
    return name


def check_eta(value: float, field: str = "eta") -> float:
    """DDIM's eta: 0 (deterministic) .. 1 (DDPM-like noise)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{field} must be a number in 0..1, got {value!r}")
    return float(value)


def build_samplers(scheduler: Any) -> dict[str, Sampler]:
    """Every registered sampler for one stage, built from its training schedule."""
    return {name: cls(scheduler) for name, cls in SAMPLERS.items()}
