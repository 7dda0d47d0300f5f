"""Compute options of the model stages (unclip.models, unclip.runtime.slots; numbers in BENCHMARKS.md).

- UNCLIP_INFERENCE_MODE (default on): the stage's start/step/finish run under torch.inference_mode, bit-exact
  with the plain engine on a tiny model (decoder and super-res), through the step batcher the services run.
- UNCLIP_CHANNELS_LAST (default on; the tests run with it off, tests/conftest.py): the decoder's and
  upsamplers' UNets load in channels-last format and give images within the drift recorded for it (1.6e-4 on
  the toy model; bound here 1e-3, the step-batching bound).
- A bad value is refused naming the variable.
"""

from __future__ import annotations

import pytest
import torch

from services.decoder.engine import DecoderEngine, UpsamplerEngine
from unclip.batching.batcher import BatcherConfig, StepBatcher
from unclip.rng import generators_from_seed
from unclip.runtime.slots import EngineSlot, InferenceModeStage

CHANNELS_LAST_DRIFT = 1e-3


def decode_args(engines, seed: int = 3):
    text = engines.encoder.encode_text(["a red circle"], True)
    torch.manual_seed(seed)
    embeds = torch.randn(1, engines.decoder.image_embed_dim)
    cond = (text.text_embeds, text.text_encoder_hidden_states, text.text_mask)
    return embeds, cond


def test_inference_mode_is_on_by_default_and_bit_exact(engines, monkeypatch):
    monkeypatch.delenv("UNCLIP_INFERENCE_MODE", raising=False)
    embeds, cond = decode_args(engines)
    expected = engines.decoder.decode(embeds, *cond, generators_from_seed(5, 1), num_inference_steps=6).images

    slot = EngineSlot("decoder", config=BatcherConfig(max_queue_delay_s=0.0))
    slot.attach(engines.decoder)
    try:
        assert isinstance(slot.stage, InferenceModeStage) and slot.stage.name == "decoder"
        task = slot.stage.start(embeds, *cond, generators_from_seed(5, 1), num_inference_steps=6)
        assert task.latents.is_inference()  # made under inference mode, on the request's thread
        images = slot.batcher.run(task).images
    finally:
        slot.batcher.close()
    assert torch.equal(images, expected)


def test_inference_mode_can_be_turned_off(engines, monkeypatch):
    monkeypatch.setenv("UNCLIP_INFERENCE_MODE", "0")
    slot = EngineSlot("super_res")
    slot.attach(engines.upsamplers[0])
    try:
        assert slot.stage is engines.upsamplers[0]
    finally:
        slot.batcher.close()


def test_channels_last_unets_stay_within_the_recorded_drift(engines, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("UNCLIP_CHANNELS_LAST", "1")
    decoder = DecoderEngine.from_pretrained(tiny_model_dir)
    upsampler = UpsamplerEngine.from_pretrained(tiny_model_dir, "super_res")
    weight = next(p for p in decoder.decoder.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert next(p for p in upsampler.first.parameters() if p.dim() == 4).is_contiguous(
        memory_format=torch.channels_last
    )

    embeds, cond = decode_args(engines)
    plain = engines.decoder.decode(embeds, *cond, generators_from_seed(5, 1), num_inference_steps=6).images
    fast = decoder.decode(embeds, *cond, generators_from_seed(5, 1), num_inference_steps=6).images
    assert (fast - plain).abs().max().item() <= CHANNELS_LAST_DRIFT
    plain = engines.upsamplers[0].upsample(plain, generators_from_seed(5, 1), num_inference_steps=7).images
    fast = upsampler.upsample(fast, generators_from_seed(5, 1), num_inference_steps=7).images
    assert (fast - plain).abs().max().item() <= 10 * CHANNELS_LAST_DRIFT  # super-res amplifies (as batching)


def test_channels_last_is_the_services_default(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("UNCLIP_CHANNELS_LAST", raising=False)
    upsampler = UpsamplerEngine.from_pretrained(tiny_model_dir, "super_res")
    kernels = [p for p in upsampler.first.parameters() if p.dim() == 4]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    monkeypatch.setenv("UNCLIP_CHANNELS_LAST", "0")  # diffusers' contiguous layout, as the parity tests run
    upsampler = UpsamplerEngine.from_pretrained(tiny_model_dir, "super_res")
    assert not next(p for p in upsampler.first.parameters() if p.dim() == 4).is_contiguous(
        memory_format=torch.channels_last
    )


def test_a_bad_value_names_the_variable(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("UNCLIP_CHANNELS_LAST", "sometimes")
    with pytest.raises(SystemExit, match="UNCLIP_CHANNELS_LAST"):
        DecoderEngine.from_pretrained(tiny_model_dir)


def test_step_batcher_runs_inference_mode_stages(engines):
    # The batcher's own thread enters inference mode through the wrapper (it is per thread).
    stage = InferenceModeStage(engines.upsamplers[0])
    batcher = StepBatcher(stage, BatcherConfig(max_queue_delay_s=0.0))
    try:
        images = torch.zeros(1, 3, engines.upsamplers[0].input_size, engines.upsamplers[0].input_size)
        out = batcher.run(stage.start(images, generators_from_seed(1, 1), num_inference_steps=3))
        expected = engines.upsamplers[0].upsample(images, generators_from_seed(1, 1), num_inference_steps=3)
        assert torch.equal(out.images, expected.images)
    finally:
        batcher.close()
