"""The engine chain equals diffusers' reference pipelines built from the same component objects.

Reference: ``UnCLIPPipeline(...)(prompt=[p] * n, generator=[Generator().manual_seed(s + i) ...],
output_type="np")``
and ``UnCLIPImageVariationPipeline`` likewise; within 1e-4 (max abs, pixels in [0, 1]).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline

from unclip.rng import generators_from_seed

TOLERANCE = 1e-4
STEPS = 2  # per stage, as conftest's chain runs them
PROMPT = "a red circle on a blue square"


@pytest.fixture(scope="module")
def reference(engines) -> UnCLIPPipeline:
    upsampler = engines.upsamplers[0]
    pipe = UnCLIPPipeline(
        prior=engines.prior.prior,
        decoder=engines.decoder.decoder,
        text_encoder=engines.encoder.text_encoder,
        tokenizer=engines.encoder.tokenizer,
        text_proj=engines.decoder.text_proj,
        super_res_first=upsampler.first,
        super_res_last=upsampler.last,
        prior_scheduler=engines.prior.scheduler,
        decoder_scheduler=engines.decoder.scheduler,
        super_res_scheduler=upsampler.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def variation_reference(engines) -> UnCLIPImageVariationPipeline:
    upsampler = engines.upsamplers[0]
    pipe = UnCLIPImageVariationPipeline(
        decoder=engines.decoder.decoder,
        text_encoder=engines.encoder.text_encoder,
        tokenizer=engines.encoder.tokenizer,
        text_proj=engines.decoder.text_proj,
        feature_extractor=engines.encoder.feature_extractor,
        image_encoder=engines.encoder.image_encoder,
        super_res_first=upsampler.first,
        super_res_last=upsampler.last,
        decoder_scheduler=engines.decoder.scheduler,
        super_res_scheduler=upsampler.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe, n: int, seed: int, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(
        prompt=[PROMPT] * n,
        generator=generators,
        prior_num_inference_steps=STEPS,
        decoder_num_inference_steps=STEPS,
        super_res_num_inference_steps=STEPS,
        output_type="np",
        **kwargs,
    ).images


@pytest.mark.parametrize(
    ("n", "seed", "guidance"),
    [
        (3, 7, {}),  # Karlo's default guidance (prior 4.0, decoder 8.0)
        (1, 11, {}),
        (2, 5, {"prior_guidance_scale": 1.0, "decoder_guidance_scale": 8.0}),  # prior off, decoder on
        (2, 5, {"prior_guidance_scale": 4.0, "decoder_guidance_scale": 0.0}),  # prior on, decoder off
        (2, 3, {"prior_guidance_scale": 1.0, "decoder_guidance_scale": 1.0}),  # guidance off everywhere
    ],
)
def test_text_to_image_equals_reference(engines, reference, chain, n, seed, guidance):
    expected = reference_images(reference, n, seed, **guidance)
    out = chain.run_text_to_image(engines, [PROMPT] * n, seed, **guidance)
    actual = chain.to_numpy_images(out["images"])
    assert actual.shape == expected.shape == (n, 64, 64, 3)
    assert np.abs(actual - expected).max() <= TOLERANCE
    # Not a vacuous match: the images differ between seeds.
    assert n == 1 or np.abs(actual[0] - actual[1]).max() > 0.1


def test_variation_equals_reference(engines, variation_reference, chain):
    n, seed = 3, 21
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    expected = variation_reference(
        image=[image] * n,
        generator=generators,
        decoder_num_inference_steps=STEPS,
        super_res_num_inference_steps=STEPS,
        output_type="np",
    ).images

    # The variation chain: "" prompts (guidance on, as decoder_guidance_scale 8.0 > 1), CLIP image embeddings.
    text = engines.encoder.encode_text([""] * n, do_classifier_free_guidance=True)
    image_embeds = engines.encoder.encode_image([image] * n)
    decoded = engines.decoder.decode(
        image_embeds,
        text.text_embeds,
        text.text_encoder_hidden_states,
        text.text_mask,
        generators_from_seed(seed, n),
        num_inference_steps=STEPS,
    )
    upsampled = engines.upsamplers[0].upsample(
        decoded.images, chain.over_the_wire(decoded.generators), num_inference_steps=STEPS
    )
    actual = chain.to_numpy_images(upsampled.images)
    assert actual.shape == expected.shape == (n, 64, 64, 3)
    assert np.abs(actual - expected).max() <= TOLERANCE


def test_batch_drift_against_single_image(engines, chain):
    """Image i in a batch of n versus image i requested alone (seed s + i, n = 1).

    Each single-image run equals the reference called with n = 1 (checked above). Between batch and alone only
    float rounding differs (kernels vary with batch size, guidance amplifies it). Measured here on the tiny
    model, seeds 40..42, 2 steps per stage, CPU, 1 thread, torch 2.13: max abs pixel difference 6e-8 (pixels
    in [0, 1]), far below one 8-bit level; the same test passed on an H200 (torch 2.11, CUDA). Larger models
    and more steps may drift more (not measured here). The bound asserted is one 8-bit level (1/255).
    """
    n, seed = 3, 40
    batch = chain.to_numpy_images(chain.run_text_to_image(engines, [PROMPT] * n, seed)["images"])
    drift = 0.0
    for i in range(n):
        alone = chain.to_numpy_images(chain.run_text_to_image(engines, [PROMPT], seed + i)["images"])
        drift = max(drift, float(np.abs(batch[i] - alone[0]).max()))
    print(f"batch-vs-alone drift (max abs, pixels in [0, 1]): {drift:.3g}")
    assert drift < 1 / 255
