"""Fixtures for the engine tests: tiny random models in the Karlo layout, built once per session in a tmp dir,
the engines loaded from them, and ``chain`` (the engine chain as the orchestrator runs it, plus helpers).

Helpers are handed out as a fixture rather than imported, so the tests do not depend on how pytest puts
test folders on sys.path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the CI machine's cores are shared; also keeps float rounding stable between runs

from services.decoder.engine import DecoderEngine, InpaintInput, UpsamplerEngine  # noqa: E402
from services.encoder.engine import EncoderEngine  # noqa: E402
from services.prior.engine import PriorEngine  # noqa: E402
from unclip.rng import generator_from_bytes, generator_to_bytes, generators_from_seed  # noqa: E402
from unclip.tiny import make_tiny_model  # noqa: E402

STEPS = 2  # denoising steps per stage in every test (the smallest UnCLIPScheduler allows)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model with one upsampler stage and the image encoder (text-to-image and variations)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def cascade_model_dir(tmp_path_factory) -> Path:
    """A tiny model with two upsampler stages (32 -> 64 -> 128 px) and no image encoder."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny2") / "model", super_res_stages=2, variation=False)


@dataclass
class Engines:
    encoder: EncoderEngine
    prior: PriorEngine
    decoder: DecoderEngine
    upsamplers: list[UpsamplerEngine]


@pytest.fixture(scope="session")
def engines(tiny_model_dir) -> Engines:
    return Engines(
        encoder=EncoderEngine.from_pretrained(tiny_model_dir),
        prior=PriorEngine.from_pretrained(tiny_model_dir),
        decoder=DecoderEngine.from_pretrained(tiny_model_dir),
        upsamplers=[UpsamplerEngine.from_pretrained(tiny_model_dir, "super_res")],
    )


@pytest.fixture(scope="session")
def cascade_engines(cascade_model_dir) -> Engines:
    return Engines(
        encoder=EncoderEngine.from_pretrained(cascade_model_dir),
        prior=PriorEngine.from_pretrained(cascade_model_dir),
        decoder=DecoderEngine.from_pretrained(cascade_model_dir),
        upsamplers=[
            UpsamplerEngine.from_pretrained(cascade_model_dir, stage)
            for stage in ("super_res", "super_res_2")
        ],
    )


def over_the_wire(generators: list[torch.Generator]) -> list[torch.Generator]:
    """What a stage boundary does to generators: state -> bytes -> a fresh generator."""
    return [generator_from_bytes(generator_to_bytes(g)) for g in generators]


def to_numpy_images(images: torch.Tensor) -> np.ndarray:
    """[n, 3, s, s] in [-1, 1] -> [n, s, s, 3] in [0, 1], as the reference's output_type="np"."""
    return (images * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


def run_text_to_image(
    engines: Engines,
    prompts: list[str],
    seed: int,
    *,
    prior_guidance_scale: float = 4.0,
    decoder_guidance_scale: float = 8.0,
    num_candidates: int = 1,
    inpaint: InpaintInput | None = None,
    steps: int = STEPS,
) -> dict[str, torch.Tensor]:
    """The engine chain as the orchestrator runs it, generators crossing each stage boundary as bytes.

    Returns every stage's output ("image_embeds", "decoder", then one entry per upsampler stage).
    """
    do_cfg = (
        prior_guidance_scale > 1.0 or decoder_guidance_scale > 1.0
    )  # once for all stages, as the reference
    generators = generators_from_seed(seed, len(prompts))
    text = engines.encoder.encode_text(prompts, do_cfg)
    prior = engines.prior.sample(
        text.text_embeds,
        text.text_encoder_hidden_states,
        text.text_mask,
        over_the_wire(generators),
        num_inference_steps=steps,
        guidance_scale=prior_guidance_scale,
        do_classifier_free_guidance=do_cfg,
        num_candidates=num_candidates,
    )
    out = {"image_embeds": prior.image_embeds}
    decoded = engines.decoder.decode(
        prior.image_embeds,
        text.text_embeds,
        text.text_encoder_hidden_states,
        text.text_mask,
        over_the_wire(prior.generators),
        num_inference_steps=steps,
        guidance_scale=decoder_guidance_scale,
        do_classifier_free_guidance=do_cfg,
        inpaint=inpaint,
    )
    out["decoder"] = decoded.images
    images, generators = decoded.images, decoded.generators
    for upsampler in engines.upsamplers:
        upsampled = upsampler.upsample(
            images, over_the_wire(generators), num_inference_steps=steps, inpaint=inpaint
        )
        images, generators = upsampled.images, upsampled.generators
        out[upsampler.stage] = images
    out["images"] = images
    return out


@pytest.fixture(scope="session")
def chain() -> SimpleNamespace:
    return SimpleNamespace(
        STEPS=STEPS,
        run_text_to_image=run_text_to_image,
        over_the_wire=over_the_wire,
        to_numpy_images=to_numpy_images,
    )
