"""The multi-process stack (each stage its own process, gRPC on loopback) equals diffusers' reference
pipelines built from the same components, within 1e-4 (max abs, pixels in [0, 1]); the two-upsampler cascade;
edits."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline

from unclip.runtime.images import downscale
from unclip.runtime.tensors import from_proto
from unclip.v1 import orchestrator_pb2 as pb

TOLERANCE = 1e-4


def watermarked(stack, pixels: np.ndarray, seeds: list[int]) -> np.ndarray:
    """[S, S, 3] in [0, 1] -> [len(seeds), S, S, 3] with the stack's watermark for each seed."""
    from unclip.provenance.watermark import Watermark, payload_for

    mark = Watermark((stack.log_dir / "provenance" / "watermark-test.key").read_bytes())
    marked = [mark.embed(pixels.astype(np.float64), payload_for("unclip", seed)) for seed in seeds]
    return np.stack(marked).astype(np.float32)


STEPS = 2
PROMPT = "a red circle on a blue square"
FLOAT32 = pb.OUTPUT_FORMAT_FLOAT32


def params(**overrides) -> pb.SamplingParams:
    fields = dict(
        prior_num_inference_steps=STEPS,
        decoder_num_inference_steps=STEPS,
        super_res_num_inference_steps=[STEPS],
    )
    fields.update(overrides)
    return pb.SamplingParams(**fields)


def pixels(response: pb.ImagesResponse) -> np.ndarray:
    """[n, S, S, 3] float32 in [0, 1], in request order."""
    return np.stack([from_proto(image.pixels, "pixels").numpy() for image in response.images])


@pytest.fixture(scope="module")
def reference(stack_engines) -> UnCLIPPipeline:
    encoder, prior, decoder, upsampler = stack_engines
    pipe = UnCLIPPipeline(
        prior=prior.prior,
        decoder=decoder.decoder,
        text_encoder=encoder.text_encoder,
        tokenizer=encoder.tokenizer,
        text_proj=decoder.text_proj,
        super_res_first=upsampler.first,
        super_res_last=upsampler.last,
        prior_scheduler=prior.scheduler,
        decoder_scheduler=decoder.scheduler,
        super_res_scheduler=upsampler.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe: UnCLIPPipeline, n: int, seed: int, **guidance) -> np.ndarray:
    return pipe(
        prompt=[PROMPT] * n,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        prior_num_inference_steps=STEPS,
        decoder_num_inference_steps=STEPS,
        super_res_num_inference_steps=STEPS,
        output_type="np",
        **guidance,
    ).images


@pytest.mark.parametrize(
    ("n", "seed", "guidance"),
    [
        (3, 7, {}),  # Karlo's default guidance (prior 4.0, decoder 8.0)
        (1, 8, {}),  # image 1 of the n=3 request, alone
        (2, 5, {"prior_guidance_scale": 1.0, "decoder_guidance_scale": 8.0}),  # prior off, decoder on
        (2, 5, {"prior_guidance_scale": 4.0, "decoder_guidance_scale": 0.0}),  # prior on, decoder off
    ],
)
def test_generate_equals_unclip_pipeline(image_service, reference, n, seed, guidance):
    response = image_service.Generate(
        pb.GenerateRequest(
            prompt=PROMPT, n=n, size=64, seed=seed, params=params(**guidance), output_format=FLOAT32
        )
    )
    assert [(image.index, image.seed) for image in response.images] == [(i, seed + i) for i in range(n)]
    assert response.seed == seed and response.size == 64
    got = pixels(response)
    expected = reference_images(reference, n, seed, **guidance)
    assert got.shape == expected.shape == (n, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOLERANCE
    # The PNG is the same picture, rounded to 8 bits.
    png = np.asarray(PIL.Image.open(io.BytesIO(response.images[0].png)), dtype=np.float32) / 255
    assert np.abs(png - got[0]).max() <= 0.5 / 255 + 1e-6


def test_seed_is_drawn_when_absent_and_reproduces(image_service):
    drawn = image_service.Generate(
        pb.GenerateRequest(prompt=PROMPT, size=32, params=params(), output_format=FLOAT32)
    )
    again = image_service.Generate(
        pb.GenerateRequest(prompt=PROMPT, size=32, seed=drawn.seed, params=params(), output_format=FLOAT32)
    )
    assert drawn.images[0].seed == drawn.seed == again.seed
    assert np.array_equal(pixels(drawn), pixels(again))


def test_batch_drift_is_small(image_service):
    """Image i of a batch vs image i alone: same noise, only float rounding differs (kernels vary by
    batch)."""

    def generate(n: int, seed: int) -> np.ndarray:
        request = pb.GenerateRequest(prompt=PROMPT, n=n, size=64, seed=seed, params=params())
        request.output_format = FLOAT32
        return pixels(image_service.Generate(request))

    batch, alone = generate(3, 40), generate(1, 41)
    drift = float(np.abs(batch[1] - alone[0]).max())
    print(f"batch-vs-alone drift (max abs, tiny model, 2 steps/stage): {drift:.2e}")
    assert drift <= 1e-3


def test_variation_equals_unclip_image_variation_pipeline(image_service, stack_engines):
    encoder, _, decoder, upsampler = stack_engines
    pipe = UnCLIPImageVariationPipeline(
        decoder=decoder.decoder,
        text_encoder=encoder.text_encoder,
        tokenizer=encoder.tokenizer,
        text_proj=decoder.text_proj,
        feature_extractor=encoder.feature_extractor,
        image_encoder=encoder.image_encoder,
        super_res_first=upsampler.first,
        super_res_last=upsampler.last,
        decoder_scheduler=decoder.scheduler,
        super_res_scheduler=upsampler.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    n, seed = 2, 3
    response = image_service.CreateVariation(
        pb.VariationRequest(
            image=buffer.getvalue(), n=n, size=64, seed=seed, params=params(), output_format=FLOAT32
        )
    )
    expected = pipe(
        image=[image] * n,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
        decoder_num_inference_steps=STEPS,
        super_res_num_inference_steps=STEPS,
        output_type="np",
    ).images
    assert np.abs(pixels(response) - expected).max() <= TOLERANCE


def test_two_upsampler_cascade(stack, image_service):
    capabilities = image_service.GetCapabilities(pb.CapabilitiesRequest())
    assert list(capabilities.sizes) == [32, 64, 128]
    assert list(capabilities.defaults.super_res_num_inference_steps) == [7, 7]

    full = image_service.Generate(
        pb.GenerateRequest(prompt=PROMPT, n=2, seed=9, params=params(), output_format=FLOAT32)
    )
    assert full.size == 128
    assert pixels(full).shape == (2, 128, 128, 3)
    assert PIL.Image.open(io.BytesIO(full.images[0].png)).size == (128, 128)

    # A size between stage sizes is an antialiased downscale of the next larger stage's output.
    between = image_service.Generate(
        pb.GenerateRequest(prompt=PROMPT, n=2, size=96, seed=9, params=params(), output_format=FLOAT32)
    )
    large = torch.from_numpy(pixels(full)).permute(0, 3, 1, 2) * 2 - 1
    expected = (downscale(large, 96) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    # The 128 px images carry the watermark, the 96 px ones do not (it is embedded from 128 px up): they
    # differ by at most the downscaled mark (antialiased bicubic: under 1.3x the mark's largest value).
    mark = np.abs(watermarked(stack, np.full((128, 128, 3), 0.5), [9, 10]) - 0.5).max()
    assert np.abs(pixels(between) - expected).max() <= TOLERANCE + 1.3 * mark

    # The decoder's own size runs no upsampler; per-stage steps may differ.
    small = image_service.Generate(pb.GenerateRequest(prompt=PROMPT, size=32, seed=9, params=params()))
    assert PIL.Image.open(io.BytesIO(small.images[0].png)).size == (32, 32)
    two = image_service.Generate(
        pb.GenerateRequest(prompt=PROMPT, seed=9, params=params(super_res_num_inference_steps=[2, 3]))
    )
    assert two.size == 128


@pytest.mark.parametrize("size", [64, 96, 128])  # 96: between stages, downscaled from 128
def test_edit_keeps_unmasked_pixels_and_changes_the_masked_region(stack, image_service, size):
    rng = np.random.default_rng(size)
    original = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    alpha = np.full((size, size), 255, dtype=np.uint8)
    hole = slice(size // 4, size // 2)
    alpha[hole, hole] = 0  # fully transparent: regenerate
    mask = PIL.Image.fromarray(np.dstack([original, alpha]), "RGBA")
    image_png, mask_png = io.BytesIO(), io.BytesIO()
    PIL.Image.fromarray(original).save(image_png, format="PNG")
    mask.save(mask_png, format="PNG")

    response = image_service.Edit(
        pb.EditRequest(image=image_png.getvalue(), mask=mask_png.getvalue(), prompt=PROMPT, n=2, size=size,
                       seed=1, params=params(), output_format=FLOAT32)
    )  # fmt: skip
    got = pixels(response)
    want = original.astype(np.float32) / 255
    if size >= 128:  # the stack watermarks 128 px and up (unclip/provenance): so is the reference
        want = watermarked(stack, want, [1, 2])
    known = alpha > 0
    assert got.shape == (2, size, size, 3)
    assert np.abs(got - want)[:, known].max() <= 2 / 255
    assert np.abs(got - want)[:, ~known].mean() > 0.05

    # Without a mask the image's own alpha marks the region: the same request, the same pixels.
    by_alpha = image_service.Edit(
        pb.EditRequest(image=mask_png.getvalue(), prompt=PROMPT, n=2, size=size, seed=1, params=params(),
                       output_format=FLOAT32)
    )  # fmt: skip
    assert np.abs(pixels(by_alpha) - got).max() <= TOLERANCE
