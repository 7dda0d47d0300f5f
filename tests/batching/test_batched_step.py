"""batched_step equals UnCLIPScheduler.step called on each row alone, in every configuration used."""

from __future__ import annotations

import pytest
import torch
from diffusers import UnCLIPScheduler

from unclip.batching.scheduler import batched_step


def reference_rows(scheduler, model_output, timesteps, sample, prevs, seeds):
    """Row by row through diffusers' own step, each with its own generator."""
    out = []
    for r, (t, prev, seed) in enumerate(zip(timesteps, prevs, seeds, strict=True)):
        generator = torch.Generator().manual_seed(seed)
        out.append(
            scheduler.step(
                model_output[r : r + 1], t, sample[r : r + 1], prev_timestep=prev, generator=[generator]
            ).prev_sample
        )
    return torch.cat(out)


def schedules(*steps: int) -> list[list[int]]:
    result = []
    for n in steps:
        s = UnCLIPScheduler()
        s.set_timesteps(n)
        result.append([int(t) for t in s.timesteps])
    return result


@pytest.mark.parametrize(
    ("variance_type", "channels_out", "shape"),
    [
        ("fixed_small_log", 1, (6, 8)),  # the prior: [B, D] embeddings, output = sample shape
        ("learned_range", 2, (6, 3, 8, 8)),  # the decoder: UNet predicts [noise; variance]
        ("fixed_small_log", 1, (6, 3, 8, 8)),  # the upsamplers
    ],
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_rows_at_different_steps_of_different_schedules(variance_type, channels_out, shape, prediction_type):
    scheduler = UnCLIPScheduler(variance_type=variance_type, prediction_type=prediction_type)
    # Six rows: each at its own step of a 2-, 3-, 7- or 25-step schedule, including first and last steps
    # (the last passes prev_timestep=None, as the engines do, and draws no noise).
    two, three, seven, many = schedules(2, 3, 7, 25)
    picks = [(two, 0), (two, 1), (three, 1), (seven, 3), (many, 0), (many, 24)]
    timesteps = [sched[i] for sched, i in picks]
    prevs = [None if i + 1 == len(sched) else sched[i + 1] for sched, i in picks]
    seeds = [11, 12, 13, 14, 15, 16]

    torch.manual_seed(0)
    sample = torch.randn(shape)
    out_shape = (shape[0], shape[1] * channels_out, *shape[2:])
    model_output = torch.randn(out_shape)
    if variance_type == "learned_range":  # predicted variance lives in [-1, 1]
        model_output[:, shape[1] :] = model_output[:, shape[1] :].tanh()

    expected = reference_rows(scheduler, model_output, timesteps, sample, prevs, seeds)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    got = batched_step(scheduler, model_output, timesteps, sample, prevs, generators)
    assert torch.equal(got, expected), (got - expected).abs().max()

    # Each generator advanced exactly as step() advances it: by one draw when t > 0, not at all at t = 0.
    for g, seed, t in zip(generators, seeds, timesteps, strict=True):
        ref = torch.Generator().manual_seed(seed)
        if t > 0:
            torch.randn((1, *sample.shape[1:]), generator=ref)  # step() draws the sample's shape
        assert torch.equal(g.get_state(), ref.get_state())


def test_same_timestep_batch_equals_one_step_call():
    """All rows at the same step: equals one step() over the batch with a list of generators."""
    scheduler = UnCLIPScheduler(variance_type="learned_range")
    (sched,) = schedules(4)
    torch.manual_seed(1)
    sample = torch.randn(3, 3, 8, 8)
    model_output = torch.randn(3, 6, 8, 8).tanh()
    for i, t in enumerate(sched):
        prev = None if i + 1 == len(sched) else sched[i + 1]
        expected = scheduler.step(
            model_output,
            t,
            sample,
            prev_timestep=prev,
            generator=[torch.Generator().manual_seed(s) for s in range(3)],
        ).prev_sample
        got = batched_step(
            scheduler,
            model_output,
            [t] * 3,
            sample,
            [prev] * 3,
            [torch.Generator().manual_seed(s) for s in range(3)],
        )
        assert torch.equal(got, expected)


def test_mismatched_lengths_name_the_problem():
    scheduler = UnCLIPScheduler()
    with pytest.raises(ValueError, match="one timestep, prev_timestep and generator per row"):
        batched_step(
            scheduler, torch.zeros(2, 4), [10], torch.zeros(2, 4), [None, None], [torch.Generator()] * 2
        )
