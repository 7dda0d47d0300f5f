"""The contract between a denoising stage and the step batcher (``DenoisingStage``), the per-request ``Task``,
and what the stages share to run in steps: forward-pass batching helpers, the sampler step (with edits'
resampling) and ``denoise``, the one-request driver.

Every denoising engine is a ``DenoisingStage``: ``PriorEngine`` (services/prior/engine.py), ``DecoderEngine``
and ``UpsamplerEngine`` (services/decoder/engine.py) each write their denoising loop once, as
``start(**the engine call's arguments) -> Task`` (checks, conditioning, initial noise: what comes before the
loop), ``step(tasks)`` (one iteration of the loop for a group of requests, each at its own step of its own
schedule, in one forward pass), ``finish(task)`` (what comes after the loop) and ``key(task)`` (tasks with
equal keys can share a forward pass). The engine's own call (``sample``, ``decode``, ``upsample``) is
``denoise(engine, engine.start(...), step_callback)``: start, step until done, finish;
``unclip.batching.batcher.StepBatcher`` steps many requests' tasks together instead.

How a step turns the model's output into the next sample is the task's ``Sampler`` (``unclip.sampling``):
``sampler_step`` gives each sampler the rows of its own tasks, so requests with different samplers or step
counts share the forward pass (the model does not care how its output is used) and never share state.

What batching keeps and what it changes:
- every row draws from its own image's generator, in the engine's order (initial noise in ``start``, the
  sampler's draws in its step, the edit's draw right after it), so batching never changes the noise;
- with classifier-free guidance the forward pass holds [unconditional rows of every task; conditional rows of
  every task], the two halves of guidance in one pass, each task with its own guidance scale;
- the float rounding of a forward pass depends on its batch (kernels differ by batch size), so an image
  batched with others can differ from the same image alone by a small drift (measured in tests/batching). A
  task stepped alone is the engine's call, bit for bit (``deterministic``).

This module imports no engine (the engines import it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch

from unclip.sampling import Sampler, UnCLIPSampler

CondT = TypeVar("CondT")


@runtime_checkable
class DenoisingStage(Protocol):
    """What ``StepBatcher`` drives. Rules:

    - ``start`` does everything before the loop (checks: ValueError naming the field; conditioning; timesteps;
      initial noise drawn from each image's generator) and returns a ready ``Task``; it runs in the caller's
      thread, never on the batcher's.
    - ``key(task)`` is hashable; tasks with equal keys may be given to one ``step`` call.
    - ``step(tasks)`` advances every task by exactly one entry of its schedule (``steps_done += 1``), in as
      few forward passes as it can (one), and returns the rows the forward pass held (0: none ran). A task
      stepped alone must give the engine's own call bit for bit.
    - ``finish(task)`` turns a done task into the stage's output; called once, after the last step.
    """

    name: str  # the stage's name (batcher thread, metrics, messages)

    def start(self, *args: Any, **kwargs: Any) -> Task: ...

    def key(self, task: Task) -> Hashable: ...

    def step(self, tasks: list[Task]) -> int: ...

    def finish(self, task: Task) -> Any: ...


@dataclass(eq=False)
class Task(Generic[CondT]):
    """One request's denoising state inside a stage; ``cond`` is the stage's own typed conditioning
    (``PriorCondition``, ``DecoderCondition``, ``UpsamplerCondition``)."""

    stage: str  # "prior", "decoder", "super_res", ...
    rows: int  # samples it adds to a forward pass (images; n * k for a reranking prior), before guidance
    latents: torch.Tensor  # [rows, ...] the current sample
    timesteps: list[int]  # the schedule it walks: the scheduler's, or an edit's with jumps back up
    generators: list[torch.Generator]  # one per row
    image_generators: list[torch.Generator]  # one per image: what the output hands on
    cond: CondT  # stage-specific conditioning and options (guidance, text states, the upscaled image, ...)
    sampler: Sampler  # how its steps use the model's output (unclip.sampling)
    sampler_state: Any = None  # the sampler's per-task state (multistep history, eta); only it touches it
    known: Any = None  # edits: the known region (services.decoder.inpaint.KnownRegion), else None
    steps_done: int = 0  # schedule entries walked: the stage's own step counter (progress, cancellation)

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
        """The next entry of the schedule (diffusers' name: the sample's timestep after this step); None at
        the last entry, as diffusers passes it (the scheduler then uses t - 1 and adds no noise)."""
        i = self.steps_done + 1
        return None if i == len(self.timesteps) else self.timesteps[i]

    @property
    def renoising(self) -> bool:
        """This iteration goes back up in noise (an edit's resampling jump): a re-noise, no model call."""
        prev_timestep = self.prev_timestep
        return prev_timestep is not None and prev_timestep > self.timestep

    @property
    def last(self) -> bool:
        """This iteration is the schedule's final entry."""
        return self.steps_done == len(self.timesteps) - 1


def timesteps_for(sampler: Sampler | Any, num_inference_steps: int, known: Any = None) -> list[int]:
    """The schedule a task walks: the sampler's grid (a bare UnCLIPScheduler: its own), or for an edit
    ``known.schedule`` of it."""
    if not isinstance(sampler, Sampler):
        sampler = UnCLIPSampler(sampler)
    timesteps = sampler.timesteps(num_inference_steps)
    return timesteps if known is None else [int(t) for t in known.schedule(timesteps)]


# ---- one iteration, shared by the stages -----------------------------------------------------------------


def renoise_jumps(scheduler, tasks: list[Task]) -> list[Task]:
    """Walks the tasks whose iteration is a jump back up (``Task.renoising``) by re-noising their sample with
    their own generators, and returns the others: those that need the model, the only ones a forward pass
    may hold."""
    stepped = []
    for task in tasks:
        if task.renoising:
            task.latents = task.known.renoise(
                task.latents, scheduler, task.timestep, task.prev_timestep, task.generators
            )
            task.steps_done += 1
        else:
            stepped.append(task)
    return stepped


def timestep_rows(tasks: list[Task], device: torch.device) -> torch.Tensor:
    """[B] each row's timestep (the model's ``timestep`` argument)."""
    return torch.tensor([task.timestep for task in tasks for _ in range(task.rows)], device=device)


def cat_halves(tensors: list[torch.Tensor], counts: list[int], do_cfg: bool) -> torch.Tensor:
    """Tasks' [2n_i, ...] tensors ([uncond; cond] each) -> [uncond of all; cond of all]; else a plain cat."""
    if not do_cfg:
        return torch.cat(tensors)
    uncond = [t[:n] for t, n in zip(tensors, counts, strict=True)]
    cond = [t[n:] for t, n in zip(tensors, counts, strict=True)]
    return torch.cat(uncond + cond)


def guidance_scale_rows(tasks: list[Task], ndim: int, device: torch.device) -> float | torch.Tensor:
    """One float when the group shares a guidance scale (diffusers' arithmetic), else [B, 1, ...] per row."""
    scales = [task.cond.guidance_scale for task in tasks]
    if all(s == scales[0] for s in scales):
        return scales[0]
    per_row = torch.tensor([s for task, s in zip(tasks, scales, strict=True) for _ in range(task.rows)])
    return per_row.reshape(-1, *([1] * (ndim - 1))).to(device)


def sampler_step(scheduler, tasks: list[Task], model_output: torch.Tensor, latents: torch.Tensor) -> None:
    """x_t -> x_t-1 for every task's rows (each at its own timestep, each with its own sampler), then each
    task's latents set, its edit's known region pasted back (drawn after the step's own draw) and its counter
    advanced. Tasks sharing a sampler are stepped in one call; ``scheduler`` (the stage's UnCLIPScheduler)
    is what edits' known region noises with."""
    groups: dict[int, list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(id(task.sampler), []).append(i)
    if len(groups) == 1:  # one sampler: the whole batch as is
        prev_samples = list(
            tasks[0].sampler.step(model_output, latents, tasks).split([t.rows for t in tasks])
        )
    else:
        starts = [0]
        for task in tasks:
            starts.append(starts[-1] + task.rows)
        prev_samples: list[Any] = [None] * len(tasks)
        for members in groups.values():
            rows = torch.tensor(
                [r for i in members for r in range(starts[i], starts[i + 1])], device=latents.device
            )
            group = [tasks[i] for i in members]
            stepped = group[0].sampler.step(model_output[rows], latents[rows], group)
            for i, part in zip(members, stepped.split([t.rows for t in group]), strict=True):
                prev_samples[i] = part
    for task, rows in zip(tasks, prev_samples, strict=True):
        if task.known is not None:  # edits: the original at the sample's new noise level
            rows = task.known.paste(rows, scheduler, task.prev_timestep, task.generators)
        task.latents = rows
        task.steps_done += 1


scheduler_step = sampler_step  # the name the stages used before samplers were pluggable


# ---- one request, start to finish -------------------------------------------------------------------------


def denoise(
    stage: DenoisingStage, task: Task, step_callback: Callable[[int, int], None] | None = None
) -> Any:
    """The engine's call: ``task`` (from ``stage.start``) stepped alone until done, then ``stage.finish``.

    step_callback(step, total) runs after every step (step = entries walked, 1..total); it may raise to stop.
    """
    while not task.done:
        stage.step([task])
        if step_callback is not None:
            step_callback(task.steps_done, task.total)
    return stage.finish(task)


def stage_for(engine: Any) -> DenoisingStage:
    """The step-wise view of a loaded engine: the engine itself (it implements ``DenoisingStage``)."""
    if isinstance(engine, DenoisingStage) and all(
        callable(getattr(engine, method, None)) for method in ("start", "key", "step", "finish")
    ):
        return engine
    raise ValueError(
        f"engine must be a PriorEngine, DecoderEngine or UpsamplerEngine, got {type(engine).__name__}"
    )
