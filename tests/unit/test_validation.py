"""Bad input to each engine is a ValueError whose message starts with the offending field's name."""

from __future__ import annotations

import math

import PIL.Image
import pytest
import torch

from services.decoder.engine import InpaintInput
from services.encoder.engine import EncoderEngine, load_image
from unclip.rng import generators_from_seed

PROMPT = "a green triangle"


@pytest.fixture(scope="module")
def text(engines):
    """Valid conditioning for n = 2 with guidance: B = 4 rows."""
    return engines.encoder.encode_text([PROMPT] * 2, do_classifier_free_guidance=True)


def _prior_call(engines, text, **overrides):
    kwargs = dict(
        text_embeds=text.text_embeds,
        text_encoder_hidden_states=text.text_encoder_hidden_states,
        text_mask=text.text_mask,
        generators=generators_from_seed(0, 2),
        num_inference_steps=2,
        guidance_scale=4.0,
        do_classifier_free_guidance=True,
        num_candidates=1,
    )
    kwargs.update(overrides)
    return engines.prior.sample(**kwargs)


def _decoder_call(engines, text, **overrides):
    kwargs = dict(
        image_embeds=torch.zeros(2, 32),
        text_embeds=text.text_embeds,
        text_encoder_hidden_states=text.text_encoder_hidden_states,
        text_mask=text.text_mask,
        generators=generators_from_seed(0, 2),
        num_inference_steps=2,
        guidance_scale=8.0,
        do_classifier_free_guidance=True,
    )
    kwargs.update(overrides)
    return engines.decoder.decode(**kwargs)


def _upsampler_call(engines, **overrides):
    kwargs = dict(
        images=torch.zeros(2, 3, 32, 32), generators=generators_from_seed(0, 2), num_inference_steps=2
    )
    kwargs.update(overrides)
    return engines.upsamplers[0].upsample(**kwargs)


def _with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = math.nan
    return tensor


def _inpaint(size=32, mask_size=None, n=2, image=None):
    mask_size = mask_size or size
    return InpaintInput(
        image=torch.zeros(n, 3, size, size) if image is None else image,
        mask=torch.ones(n, 1, mask_size, mask_size),
    )


PRIOR_CASES = [
    ("num_inference_steps", {"num_inference_steps": 1}),
    ("num_inference_steps", {"num_inference_steps": 1001}),
    ("guidance_scale", {"guidance_scale": -1.0}),
    ("guidance_scale", {"guidance_scale": math.nan}),
    ("guidance_scale", {"guidance_scale": math.inf}),
    ("num_candidates", {"num_candidates": -1}),
    ("num_candidates", {"num_candidates": 17}),
    ("do_classifier_free_guidance", {"do_classifier_free_guidance": "yes"}),
    ("generators", {"generators": []}),
    ("generators", {"generators": generators_from_seed(0, 3)}),  # 3 generators, conditioning for 2 images
    ("generators", {"generators": [torch.Generator(), "not a generator"]}),
    ("step_callback", {"step_callback": 42}),
]


@pytest.mark.parametrize(("field", "overrides"), PRIOR_CASES)
def test_prior_rejects(engines, text, field, overrides):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        _prior_call(engines, text, **overrides)


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("text_embeds", lambda t: t.text_embeds[:, :16]),
        ("text_embeds", lambda t: t.text_embeds.double()),
        ("text_embeds", lambda t: _with_nan(t.text_embeds)),
        ("text_embeds", lambda t: t.text_embeds[:3]),  # not 2n rows
        ("text_encoder_hidden_states", lambda t: t.text_encoder_hidden_states[:, :10]),
        ("text_encoder_hidden_states", lambda t: _with_nan(t.text_encoder_hidden_states)),
        ("text_encoder_hidden_states", lambda t: t.text_encoder_hidden_states.clone().fill_(math.inf)),
        ("text_mask", lambda t: t.text_mask.float()),
        ("text_mask", lambda t: t.text_mask[:, :5]),
    ],
)
def test_prior_rejects_bad_tensors(engines, text, field, make):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        _prior_call(engines, text, **{field: make(text)})


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("num_inference_steps", {"num_inference_steps": 0}),
        ("guidance_scale", {"guidance_scale": -0.5}),
        ("image_embeds", {"image_embeds": torch.zeros(2, 31)}),
        ("image_embeds", {"image_embeds": torch.full((2, 32), math.nan)}),
        ("image_embeds", {"image_embeds": torch.zeros(2, 32, dtype=torch.float16)}),
        ("generators", {"generators": generators_from_seed(0, 1)}),  # image_embeds has 2 rows
        ("text_embeds", {"do_classifier_free_guidance": False}),  # 4 rows where 2 are expected
        ("text_mask", {"text_mask": torch.ones(4, 76, dtype=torch.bool)}),
        ("inpaint.image", {"inpaint": _inpaint(image=torch.zeros(2, 3, 32, 30))}),
        ("inpaint.image", {"inpaint": _inpaint(image=torch.full((2, 3, 32, 32), 2.0))}),  # outside [-1, 1]
        ("inpaint.image", {"inpaint": _inpaint(n=1)}),
        ("inpaint.mask", {"inpaint": _inpaint(size=32, mask_size=16)}),
        ("inpaint", {"inpaint": {"image": torch.zeros(2, 3, 32, 32)}}),
    ],
)
def test_decoder_rejects(engines, text, field, overrides):
    with pytest.raises(ValueError, match=rf"^{field}(\b|\.)"):
        _decoder_call(engines, text, **overrides)


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("num_inference_steps", {"num_inference_steps": 1}),
        ("images", {"images": torch.zeros(2, 3, 64, 64)}),  # not the decoder's 32 px
        ("images", {"images": torch.zeros(2, 4, 32, 32)}),
        ("images", {"images": torch.zeros(2, 3, 32, 32, dtype=torch.float64)}),
        ("images", {"images": _with_nan(torch.zeros(2, 3, 32, 32))}),
        ("images", {"images": torch.full((2, 3, 32, 32), 1.5)}),
        ("generators", {"generators": generators_from_seed(0, 3)}),
        (
            "inpaint.mask",
            {"inpaint": InpaintInput(torch.zeros(2, 3, 64, 64), torch.full((2, 1, 64, 64), 2.0))},
        ),
    ],
)
def test_upsampler_rejects(engines, field, overrides):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        _upsampler_call(engines, **overrides)


@pytest.mark.parametrize(
    ("field", "prompts"),
    [
        ("prompts", []),
        ("prompts", [PROMPT] * 11),
        ("prompts", "a bare string"),
        (r"prompts\[1\]", [PROMPT, None]),
        (r"prompts\[0\]", ["x" * 1001]),
    ],
)
def test_encoder_rejects_prompts(engines, field, prompts):
    with pytest.raises(ValueError, match=rf"^{field}"):
        engines.encoder.encode_text(prompts, do_classifier_free_guidance=True)


def test_encoder_rejects_images(engines, cascade_model_dir):
    with pytest.raises(ValueError, match=r"^images\[0\] must be square"):
        engines.encoder.encode_image([PIL.Image.new("RGB", (32, 24))])
    with pytest.raises(ValueError, match=r"^images must"):
        engines.encoder.encode_image([])
    with pytest.raises(ValueError, match=r"^images\[0\] is not an image file"):
        load_image(b"not an image", "images[0]")
    # A model without image_encoder/ cannot make variations.
    encoder = EncoderEngine.from_pretrained(cascade_model_dir)
    assert not encoder.has_image_encoder
    with pytest.raises(ValueError, match=r"^images .*no image_encoder"):
        encoder.encode_image([PIL.Image.new("RGB", (32, 32))])


def test_encoder_reports_truncation_per_prompt(engines):
    long_prompt = " ".join(["horse"] * 100)  # 599 characters, 102 tokens with BOS and EOS
    output = engines.encoder.encode_text([PROMPT, long_prompt], do_classifier_free_guidance=False)
    assert output.truncated == [False, True]
    assert output.text_encoder_hidden_states.shape == (2, engines.encoder.max_tokens, 32)
    assert output.text_mask[1].all() and not output.text_mask[0].all()
