"""The engines on a CUDA device (UNCLIP_DEVICE=cuda): same contract, CPU generators, CPU outputs.

Skipped where no CUDA GPU is present (CI); run on a GPU machine with ``pytest -q tests/unit/test_cuda.py``.
Last run: NVIDIA H200, torch 2.11.0+cu130, all passed (with test_parity.py and test_engines.py there too).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

from services.decoder.engine import DecoderEngine, InpaintInput, UpsamplerEngine
from services.encoder.engine import EncoderEngine
from services.prior.engine import PriorEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = "a red circle on a blue square"


@pytest.fixture(autouse=True)
def full_float32():
    """Parity in full float32: cuDNN convolutions default to TF32 on Ampere and later (~1e-3 relative
    error, different per batch shape), and the chain batches differently from the pipeline; a random tiny
    model amplifies such differences into flipped pixels (max |diff| 0.998 seen on an H200 with TF32 on)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _engines(model_dir, stages, dtype=None):
    on_cuda = dict(device="cuda", dtype=dtype)
    return SimpleNamespace(
        encoder=EncoderEngine.from_pretrained(model_dir, **on_cuda),
        prior=PriorEngine.from_pretrained(model_dir, **on_cuda),
        decoder=DecoderEngine.from_pretrained(model_dir, **on_cuda),
        upsamplers=[UpsamplerEngine.from_pretrained(model_dir, stage, **on_cuda) for stage in stages],
    )


@pytest.fixture(scope="module")
def cuda_engines(tiny_model_dir):
    return _engines(tiny_model_dir, ["super_res"])


def test_cuda_chain_equals_the_reference_on_cuda(cuda_engines, chain):
    upsampler = cuda_engines.upsamplers[0]
    pipe = UnCLIPPipeline(
        prior=cuda_engines.prior.prior,
        decoder=cuda_engines.decoder.decoder,
        text_encoder=cuda_engines.encoder.text_encoder,
        tokenizer=cuda_engines.encoder.tokenizer,
        text_proj=cuda_engines.decoder.text_proj,
        super_res_first=upsampler.first,
        super_res_last=upsampler.last,
        prior_scheduler=cuda_engines.prior.scheduler,
        decoder_scheduler=cuda_engines.decoder.scheduler,
        super_res_scheduler=upsampler.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    for n, seed in ((3, 7), (1, 11)):
        expected = pipe(
            prompt=[PROMPT] * n,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(n)],
            prior_num_inference_steps=chain.STEPS,
            decoder_num_inference_steps=chain.STEPS,
            super_res_num_inference_steps=chain.STEPS,
            output_type="np",
        ).images
        out = chain.run_text_to_image(cuda_engines, [PROMPT] * n, seed)
        assert out["images"].device.type == "cpu"
        actual = chain.to_numpy_images(out["images"])
        off = np.abs(actual - expected)
        # CUDA kernels differ per batch shape (~1e-7) and a random tiny model amplifies that in a few values
        # (H200, TF32 off: max 5.4e-3, under 0.005 % of 36,864 values off by > 1e-3); CPU parity: 1e-4
        share = float((off > 1e-4).mean())
        assert share <= 1e-3 and off.max() <= 1e-2, f"max |diff| {off.max()}, {share:.3%} off by > 1e-4"


def test_cuda_edit_and_rerank(cuda_engines, chain):
    size = 64
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([x * 0.8, y * 0.5, x * y]).unsqueeze(0).repeat(2, 1, 1, 1)
    mask = torch.zeros(2, 1, size, size)
    mask[..., : size // 2] = 1.0
    out = chain.run_text_to_image(
        cuda_engines, [PROMPT] * 2, 5, inpaint=InpaintInput(image, mask), num_candidates=4
    )
    final, original = chain.to_numpy_images(out["images"]), chain.to_numpy_images(image)
    known = mask[:, 0].bool().numpy()
    assert np.abs(np.round(final * 255) - np.round(original * 255))[known].max() <= 2
    assert np.abs(final - original)[~known].mean() > 0.1


def test_cuda_cascade(cascade_model_dir, chain):
    cascade = _engines(cascade_model_dir, ["super_res", "super_res_2"])
    out = chain.run_text_to_image(cascade, [PROMPT] * 2, 3)
    assert out["images"].shape == (2, 3, 128, 128)
    assert bool(torch.isfinite(out["images"]).all())


def test_cuda_float16_modules_answer_as_their_float32_twins(tiny_model_dir, chain):
    """UNCLIP_DTYPE=float16: every half-precision module behind its float32 interface (models.LowPrecision)
    answers what its float32 twin does up to float16 rounding, on the inputs a float32 chain gave that twin
    (one forward pass each); the float16 chain's images are finite and the same for the same seed. Whole
    chains are not compared: a random tiny model amplifies rounding across steps into flipped pixels (1.0
    apart on the CPU in float16)."""
    full = _engines(tiny_model_dir, ["super_res"])
    half = _engines(tiny_model_dir, ["super_res"], dtype="float16")
    pairs = {
        "text_encoder": (full.encoder.text_encoder, half.encoder.text_encoder),
        "prior": (full.prior.prior, half.prior.prior),
        "decoder": (full.decoder.decoder, half.decoder.decoder),
        "super_res_first": (full.upsamplers[0].first, half.upsamplers[0].first),
    }
    seen: dict = {}

    def keep(name):  # the first call's inputs and output (a hook must return None: not to replace them)
        def hook(_module, args, kwargs, output) -> None:
            seen.setdefault(name, (args, kwargs, output))

        return hook

    for name, (module, _) in pairs.items():
        module.register_forward_hook(keep(name), with_kwargs=True)
    chain.run_text_to_image(full, [PROMPT] * 2, 7)
    assert set(seen) == set(pairs)
    for name, (args, kwargs, output) in seen.items():
        answer = pairs[name][1](*args, **kwargs)[0]
        expected = output[0]
        assert pairs[name][1].module.dtype == torch.float16 and answer.dtype == torch.float32
        error = float((answer - expected).abs().max() / expected.abs().max())
        assert error <= 1e-2, f"{name}: float16 vs float32 relative error {error}"
    images = chain.run_text_to_image(half, [PROMPT] * 2, 7)["images"]
    assert images.shape == (2, 3, 64, 64) and bool(torch.isfinite(images).all())
    assert torch.equal(images, chain.run_text_to_image(half, [PROMPT] * 2, 7)["images"])
