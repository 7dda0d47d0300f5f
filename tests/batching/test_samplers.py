"""Samplers under step-level batching, with the real engines on a tiny model.

- Requests with different samplers and step counts share every forward pass (the model does not care how its
  output is used) and each gives the image it gives alone, within the batch drift of test_step_batching;
  their generators end in the same state; a multistep sampler's history never leaks between tasks.
- DDIM's inversion seam undoes a DDIM step given the same noise prediction.
- The thread policy reads the pod's CPU limit (cgroup v1 and v2).
"""

from __future__ import annotations

import pytest
import torch
from test_step_batching import BATCH_DRIFT, decode_kwargs, fresh, text

from unclip.batching.stages import stage_for
from unclip.rng import generators_from_seed
from unclip.runtime.threads import ThreadPolicy, cgroup_cpu_limit, cpu_budget

MIXED = [("unclip", 4, 1), ("ddim", 3, 2), ("dpmsolver++", 5, 3), ("dpmsolver++", 3, 4), ("ddim", 4, 5)]


def test_decoder_requests_with_different_samplers_share_forward_passes(engines):
    stage = stage_for(engines.decoder)
    requests = [dict(decode_kwargs(engines, 1, seed, steps), sampler=name) for name, steps, seed in MIXED]
    alone = [engines.decoder.decode(**fresh(kwargs)) for kwargs in requests]

    tasks = [stage.start(**fresh(kwargs)) for kwargs in requests]
    passes = 0
    while active := [task for task in tasks if not task.done]:
        assert len({stage.key(task) for task in active}) == 1  # samplers and step counts do not split it
        stage.step(active)
        passes += 1
    assert passes == max(steps for _, steps, _ in MIXED)  # every iteration one forward pass for all
    for task, expected in zip(tasks, alone, strict=True):
        got = stage.finish(task)
        assert (got.images - expected.images).abs().max().item() <= BATCH_DRIFT
        for g, h in zip(got.generators, expected.generators, strict=True):
            assert torch.equal(g.get_state(), h.get_state())
    # not vacuous: the samplers give different pictures for the same seed
    same_seed = [
        engines.decoder.decode(**fresh(dict(requests[0], sampler=name))) for name in ("ddim", "dpmsolver++")
    ]
    assert (same_seed[0].images - same_seed[1].images).abs().max().item() > 1e-2


def test_prior_dpmsolver_states_stay_per_task(engines):
    """Two DPM-Solver++ tasks stepped together (other step counts, other seeds) equal each alone: the
    second-order update reads only its own task's previous prediction."""
    stage = stage_for(engines.prior)
    cond = text(engines, 2)
    requests = [
        dict(
            text_embeds=cond.text_embeds,
            text_encoder_hidden_states=cond.text_encoder_hidden_states,
            text_mask=cond.text_mask,
            generators=generators_from_seed(seed, 2),
            num_inference_steps=steps,
            sampler="dpmsolver++",
        )
        for seed, steps in ((3, 6), (9, 4))
    ]
    alone = [engines.prior.sample(**fresh(kwargs)).image_embeds for kwargs in requests]
    tasks = [stage.start(**fresh(kwargs)) for kwargs in requests]
    while active := [task for task in tasks if not task.done]:
        stage.step(active)
    for task, expected in zip(tasks, alone, strict=True):
        assert (stage.finish(task).image_embeds - expected).abs().max().item() <= BATCH_DRIFT


def test_unknown_sampler_and_edits_with_another_sampler_are_refused(engines):
    kwargs = decode_kwargs(engines, 1, 0, 3)
    with pytest.raises(ValueError, match="^sampler must be one of unclip, ddim, dpmsolver\\+\\+"):
        engines.decoder.start(**kwargs, sampler="euler")
    with pytest.raises(ValueError, match="^eta must be"):
        engines.decoder.start(**kwargs, sampler="ddim", eta=1.5)
    from services.decoder.engine import InpaintInput

    inpaint = InpaintInput(image=torch.zeros(1, 3, 32, 32), mask=torch.ones(1, 1, 32, 32))
    with pytest.raises(ValueError, match="^sampler 'ddim' cannot run edits"):
        engines.decoder.start(**kwargs, sampler="ddim", inpaint=inpaint)


def test_ddim_invert_step_undoes_a_step(engines):
    sampler = engines.decoder.samplers["ddim"]
    grid = sampler.timesteps(10)
    assert grid[0] == 999 and sampler.inversion_timesteps(10) == grid[::-1]
    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 3, 8, 8), 0.1 * torch.randn(2, 3, 8, 8)

    class Row:  # one task of 2 rows at grid entry 3
        rows, generators, steps_done = 2, [], 3
        sampler_state = sampler.init_state(10, eta=0.0)
        timestep, prev_timestep, total = grid[3], grid[4], 10

    sampler.clip_range, saved = None, sampler.clip_range  # inversion does not clip: compare unclipped
    try:
        x_prev = sampler.step(eps, x_t, [Row()])
    finally:
        sampler.clip_range = saved
    back = sampler.invert_step(eps, x_prev, grid[4], grid[3])
    assert (back - x_t).abs().max().item() < 1e-4


def test_thread_budget_follows_the_cgroup_cpu_limit(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert cpu_budget(tmp_path) == min(2, len(__import__("os").sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 1.0 and cpu_budget(v1) == 1
    assert ThreadPolicy(pinned=3).threads_now() == 3
    assert 1 <= ThreadPolicy(pinned=0, budget=4).threads_now() <= 4
    with pytest.raises(ValueError, match="torch-threads"):
        ThreadPolicy(pinned=-1)
