"""Edits: the RePaint resampling schedule of KnownRegion, and the in-process edit loop that measures it."""

import random
from pathlib import Path

import pytest
import torch

from services.decoder.inpaint import InpaintInput, KnownRegion, UpsamplerKnownRegion
from training.edits import edit_cases, inpaint, score_edits
from training.evaluate import load_components

MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-toy"
PLAIN = [960, 920, 880, 840, 800, 760, 720, 680, 640, 600, 560, 520, 480]  # descending, as set_timesteps


def region(**schedule) -> KnownRegion:
    edit = InpaintInput(image=torch.zeros(1, 3, 8, 8), mask=torch.ones(1, 1, 8, 8))
    return KnownRegion.at_size(edit, 8, torch.device("cpu"), **schedule)


def test_schedule_jumps_back_and_walks_each_stretch_again():
    walk = region(jump_length=3, resample_jumps=2, resample_until=0.5).schedule(PLAIN)
    # Jumps start from entries 3 and 6 (6 = 0.5 * 12): each stretch walked 1 + 2 times.
    stretch1 = PLAIN[0:4]
    stretch2 = PLAIN[3:7]
    assert walk == stretch1 + stretch1 + stretch1 + stretch2[1:] + stretch2 + stretch2 + PLAIN[7:]
    ups = [(a, b) for a, b in zip(walk, walk[1:], strict=False) if b > a]
    assert ups == [(840, 960), (840, 960), (720, 840), (720, 840)]
    assert walk[-1] == PLAIN[-1]  # the final step (and the paste of the original) is unchanged
    # every model step goes down between neighbours of the plain schedule, as plain sampling does
    downs = {(a, b) for a, b in zip(walk, walk[1:], strict=False) if b < a}
    assert downs == set(zip(PLAIN, PLAIN[1:], strict=False))


@pytest.mark.parametrize("schedule", [dict(jump_length=0), dict(resample_jumps=0)])
def test_no_resampling_is_the_plain_schedule(schedule):
    assert region(**schedule).schedule(PLAIN) == PLAIN


def test_plain_by_default_and_upsamplers_always_plain():
    # Off by default (no gain measured on the toy model, see inpaint.py); the upsamplers never resample.
    edit = InpaintInput(image=torch.zeros(1, 3, 8, 8), mask=torch.ones(1, 1, 8, 8))
    assert region().schedule(PLAIN) == PLAIN
    upsampler = UpsamplerKnownRegion.at_size(edit, 8, torch.device("cpu"), resample_jumps=2)
    assert upsampler.jump_length == 0 and upsampler.schedule(PLAIN) == PLAIN


def test_renoise_is_forward_diffusion_with_each_images_generator():
    from diffusers import UnCLIPScheduler

    sched = UnCLIPScheduler(beta_schedule="squaredcos_cap_v2")
    x = torch.full((2, 3, 4, 4), 0.5)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    y = KnownRegion.renoise(x, sched, 100, 900, gens)
    again = KnownRegion.renoise(x, sched, 100, 900, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(y, again) and not torch.equal(y[0], y[1])
    ratio = sched.alphas_cumprod[900] / sched.alphas_cumprod[100]
    noise = (y - ratio.sqrt() * x) / (1 - ratio).sqrt()
    assert abs(noise.std().item() - 1) < 0.3  # the added part is unit Gaussian noise
    with pytest.raises(ValueError, match="to_t"):
        KnownRegion.renoise(x, sched, 900, 100, gens)


def test_in_process_edit_keeps_the_known_half_and_is_reproducible_by_seed():
    torch.set_num_threads(1)
    c = load_components(MODEL)
    attrs, wants, prompts, sources, mask = edit_cases(1, random.Random(0), 0)
    schedule = dict(jump_length=2, resample_jumps=1, resample_until=1.0)

    def edit(seed):
        return inpaint(
            c,
            prompts[0],
            sources,
            mask,
            torch.Generator().manual_seed(seed),
            steps=4,
            super_res_steps=2,
            schedule=schedule,
        )

    a, b, other = edit(5), edit(5), edit(6)
    assert a.shape == (1, 3, 128, 128)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert torch.allclose(a[..., :64], sources[..., :64], atol=1e-6)  # the known half is the original


class RecordingStack:
    """Answers Edit like the stack's client (evaluate.Stack.edit) and records each call's overrides."""

    name = "recording"

    def __init__(self):
        self.overrides = []

    def edit(self, images, masks, prompts, n, seed, **overrides):
        self.overrides.append(overrides)
        return [[im] for im in images]  # the sources back: the right half has no new object


@pytest.mark.parametrize("scale, sent", [(None, {}), (4.0, {"decoder_guidance_scale": 4.0})])
def test_score_edits_sends_the_decoder_guidance_only_when_given(scale, sent):
    backend = RecordingStack()
    result = score_edits(backend, str(MODEL), 3, random.Random(0), 0, decoder_guidance_scale=scale)
    assert backend.overrides == [sent]
    assert result["prompted_object_in_region"] == 0.0  # the unchanged sources show no prompted object
    assert result["decoder_guidance_scale"] == (scale or "default")


def test_decoder_guidance_changes_the_in_process_edit_only_in_the_regenerated_half():
    torch.set_num_threads(1)
    c = load_components(MODEL)
    attrs, wants, prompts, sources, mask = edit_cases(1, random.Random(0), 0)

    def edit(scale):
        gen = torch.Generator().manual_seed(3)
        return inpaint(
            c, prompts[0], sources, mask, gen, steps=3, decoder_guidance_scale=scale, upsample=False
        )

    four, eight = edit(4.0), edit(8.0)
    assert not torch.allclose(four[..., 16:], eight[..., 16:])  # the regenerated half follows the guidance
    assert torch.equal(four[..., :16], eight[..., :16])  # the known half is the original in both
