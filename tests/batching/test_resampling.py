"""Edits' resampling hook (RePaint-style jumps back up in noise) in the image stages' one denoising loop.

An edit walks ``KnownRegion.schedule(plain timesteps)``. A transition from t to a larger next entry re-noises
the sample (``KnownRegion.renoise``, the image's own generators) instead of calling the model; every other
transition is a model step, a scheduler step and the paste of the known region. Counters count every entry;
the upsampler's ``last`` UNet runs on the final entry only. Here a test-only KnownRegion with one jump shows
that path runs, stays reproducible by seed, keeps re-noising tasks out of the batch's forward pass, and gives
the same images through the engine and through the step batcher.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.decoder.engine import InpaintInput
from services.decoder.inpaint import KnownRegion, known_mask
from unclip.batching.batcher import BatcherConfig, StepBatcher
from unclip.batching.stages import stage_for, timesteps_for
from unclip.rng import generators_from_seed

STEPS = 4  # plain timesteps [999, 666, 333, 0]
WALK = [999, 666, 333, 666, 333, 0]  # what JumpingKnownRegion makes of them: one jump, 333 -> 666
BATCH_DRIFT = 1e-3  # as tests/batching/test_step_batching.py (decoder, guidance on)


class JumpingKnownRegion(KnownRegion):
    """Walks back up once: after the third entry, the second and third again (RePaint with one jump)."""

    renoised: list[tuple[int, int]] = []  # (from_t, to_t) of every renoise call, across instances

    def schedule(self, timesteps: list[int]) -> list[int]:
        return [*timesteps[:3], *timesteps[1:3], *timesteps[3:]]

    def renoise(self, latents, scheduler, from_t, to_t, generators):
        JumpingKnownRegion.renoised.append((from_t, to_t))
        return super().renoise(latents, scheduler, from_t, to_t, generators)


@pytest.fixture
def jumping(engines, monkeypatch):
    """The decoder and upsampler engines walking JumpingKnownRegion's schedule for edits."""
    monkeypatch.setattr(engines.decoder, "known_region", JumpingKnownRegion)
    monkeypatch.setattr(engines.upsampler, "known_region", JumpingKnownRegion)
    JumpingKnownRegion.renoised = []
    return JumpingKnownRegion


def edit_input(n: int, size: int) -> InpaintInput:
    """A smooth image; the left half known (1), the right half regenerated (0)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([x * 0.8, y * 0.5, (x * y) * 0.9]).unsqueeze(0).repeat(n, 1, 1, 1)
    mask = torch.zeros(n, 1, size, size)
    mask[..., : size // 2] = 1.0
    return InpaintInput(image=image.contiguous(), mask=mask)


def decode_kwargs(engines, n: int, seed: int, steps: int = STEPS, inpaint: InpaintInput | None = None):
    cond = engines.encoder.encode_text(["a red circle"] * n, True)
    torch.manual_seed(seed)
    return dict(
        image_embeds=torch.randn(n, engines.decoder.image_embed_dim),
        text_embeds=cond.text_embeds,
        text_encoder_hidden_states=cond.text_encoder_hidden_states,
        text_mask=cond.text_mask,
        generators=generators_from_seed(seed, n),
        num_inference_steps=steps,
        inpaint=inpaint,
    )


def fresh(kwargs):
    """The same request with fresh generators (the engines advance them)."""
    out = dict(kwargs)
    out["generators"] = [torch.Generator().set_state(g.get_state()) for g in kwargs["generators"]]
    return out


class ForwardCounter:
    """Records the batch size of every forward call of the given modules (a forward hook), by name."""

    def __init__(self, **modules):
        self.calls: list[tuple[str, int]] = []
        self._handles = [
            module.register_forward_hook(self._hook(name), with_kwargs=True)
            for name, module in modules.items()
        ]

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            sample = kwargs["sample"] if "sample" in kwargs else args[0]
            self.calls.append((name, sample.shape[0]))

        return hook

    def close(self):
        for handle in self._handles:
            handle.remove()


def test_decoder_edit_renoises_at_the_jump_and_is_reproducible(engines, jumping, monkeypatch):
    edit = edit_input(2, 64)
    kwargs = decode_kwargs(engines, 2, seed=5, inpaint=edit)
    steps = []
    counter = ForwardCounter(decoder=engines.decoder.decoder)
    try:
        out = engines.decoder.decode(**fresh(kwargs), step_callback=lambda i, total: steps.append((i, total)))
    finally:
        counter.close()

    # Every entry counts as a step; the jump is a re-noise, not a model call.
    assert steps == [(i, len(WALK)) for i in range(1, len(WALK) + 1)]
    assert jumping.renoised == [(333, 666)]
    assert counter.calls == [("decoder", 4)] * (len(WALK) - 1)  # 2 images, guidance doubles them

    # Reproducible by seed: the re-noise draws from the images' own generators.
    again = engines.decoder.decode(**fresh(kwargs))
    assert torch.equal(out.images, again.images)
    for g_out, g_again in zip(out.generators, again.generators, strict=True):
        assert torch.equal(g_out.get_state(), g_again.get_state())

    # The re-noised walk really differs from the plain one, and still keeps the known region.
    plain_kwargs = fresh(kwargs)
    monkeypatch.setattr(engines.decoder, "known_region", KnownRegion)
    plain = engines.decoder.decode(**plain_kwargs)
    unknown = ~known_mask(edit.mask, 32).expand(-1, 3, -1, -1)
    assert (out.images - plain.images)[unknown].abs().max() > 1e-2
    known = ~unknown
    resized = torch.nn.functional.interpolate(edit.image, size=(32, 32), mode="bicubic", antialias=True)
    assert torch.allclose(out.images[known], resized.clamp(-1, 1)[known], atol=1e-6)


def test_upsampler_edit_uses_last_on_the_final_entry_only(engines, jumping):
    upsampler = engines.upsampler
    torch.manual_seed(0)
    size = upsampler.input_size
    images = torch.rand(1, 3, size, size) * 2 - 1
    edit = edit_input(1, upsampler.output_size)
    counter = ForwardCounter(first=upsampler.first, last=upsampler.last)
    try:
        out = upsampler.upsample(images, generators_from_seed(3, 1), num_inference_steps=STEPS, inpaint=edit)
        again = upsampler.upsample(
            images, generators_from_seed(3, 1), num_inference_steps=STEPS, inpaint=edit
        )
    finally:
        counter.close()
    assert jumping.renoised == [(333, 666)] * 2
    walk = [("first", 1)] * (len(WALK) - 2) + [("last", 1)]  # 5 model calls: the last one on the final entry
    assert counter.calls == walk * 2
    assert torch.equal(out.images, again.images)


def test_step_batcher_keeps_renoising_tasks_out_of_the_forward_pass_and_matches_the_engine(engines, jumping):
    stage = stage_for(engines.decoder)
    companion = decode_kwargs(engines, 1, seed=7, steps=6)  # plain generation, 6 steps
    edit = decode_kwargs(engines, 2, seed=8, inpaint=edit_input(2, 32))  # 6 entries, a jump at the third
    alone = [engines.decoder.decode(**fresh(kwargs)) for kwargs in (companion, edit)]

    # Both join at the first step (the batch fills at 3 images), then walk side by side.
    counter = ForwardCounter(decoder=engines.decoder.decoder)
    batcher = StepBatcher(stage, BatcherConfig(max_batch_size=3, max_queue_delay_s=1.0))
    try:
        tasks = [stage.start(**fresh(kwargs)) for kwargs in (companion, edit)]
        tickets = [batcher.submit(task) for task in tasks]
        batched = [ticket.result(timeout=120) for ticket in tickets]
        assert tasks[1].steps_done == len(WALK) and jumping.renoised == [(333, 666)] * 2  # alone, batched
    finally:
        batcher.close()
        counter.close()
    # Third iteration: the edit re-noises, so the forward pass holds the companion's rows only (x2 guidance).
    assert [rows for _, rows in counter.calls] == [6, 6, 2, 6, 6, 6]
    for out, ref in zip(batched, alone, strict=True):
        assert (out.images - ref.images).abs().max().item() <= BATCH_DRIFT
        for g_out, g_ref in zip(out.generators, ref.generators, strict=True):
            assert torch.equal(g_out.get_state(), g_ref.get_state())

    # Deterministic: the step-batched path is the engine's call, bit for bit.
    batcher = StepBatcher(stage, BatcherConfig(max_queue_delay_s=0.0, deterministic=True))
    try:
        exact = batcher.submit(stage.start(**fresh(edit))).result(timeout=120)
    finally:
        batcher.close()
    assert torch.equal(exact.images, alone[1].images)


def test_engines_walk_inpaints_schedules(engines, monkeypatch):
    """Without a test double: the decoder's edits walk KnownRegion's schedule (the plain one by default, since
    resampling measured no gain; a RePaint walk, longer and counted in progress, when a deployment opts in),
    the upsampler's UpsamplerKnownRegion's plain one."""
    steps = 12
    edit = edit_input(1, 64)
    plain = timesteps_for(engines.decoder.scheduler, steps)
    assert KnownRegion.at_size(edit, 32, torch.device("cpu")).schedule(plain) == plain  # off by default

    @dataclasses.dataclass
    class Resampling(KnownRegion):
        resample_jumps: int = 2

    monkeypatch.setattr(engines.decoder, "known_region", Resampling)
    decoder_walk = Resampling.at_size(edit, 32, torch.device("cpu")).schedule(plain)
    assert len(decoder_walk) > steps  # jumps back up: the walk re-visits entries
    totals = set()
    engines.decoder.decode(
        **decode_kwargs(engines, 1, seed=9, steps=steps, inpaint=edit),
        step_callback=lambda i, total: totals.add(total),
    )
    assert totals == {len(decoder_walk)}

    totals.clear()
    size = engines.upsampler.input_size
    engines.upsampler.upsample(
        torch.zeros(1, 3, size, size),
        generators_from_seed(9, 1),
        num_inference_steps=STEPS,
        inpaint=edit,
        step_callback=lambda i, total: totals.add(total),
    )
    assert totals == {STEPS}
