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


def _engines(model_dir, stages):
    return SimpleNamespace(
        encoder=EncoderEngine.from_pretrained(model_dir, device="cuda"),
        prior=PriorEngine.from_pretrained(model_dir, device="cuda"),
        decoder=DecoderEngine.from_pretrained(model_dir, device="cuda"),
        upsamplers=[UpsamplerEngine.from_pretrained(model_dir, stage, device="cuda") for stage in stages],
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
        assert np.abs(actual - expected).max() <= 1e-4


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
