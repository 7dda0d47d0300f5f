"""The official `openai` SDK, unmodified, against the gateway in front of the shared stack: generations
(b64_json and url), edits with image + mask, variations, refusals and bad sizes; the images equal the gRPC
door's for the same seed."""

from __future__ import annotations

import base64
import io

import httpx2 as httpx
import numpy as np
import openai
import PIL.Image
import pytest

from tests.gateway.conftest import FAST
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc


def decode(data: bytes) -> np.ndarray:
    image = PIL.Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(int)


def png_file(size: int, seed: int = 0, hole: bool = False) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    array[..., 3] = 255
    if hole:  # fully transparent = regenerate
        array[: size // 2, : size // 2, 3] = 0
    buffer = io.BytesIO()
    PIL.Image.fromarray(array, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_b64_json_equals_the_grpc_door(client, stack):
    seed = 1234
    result = client.images.generate(
        prompt="a red circle on a blue background",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": seed, **FAST},
    )
    assert len(result.data) == 2 and result.created > 0
    via_http = [decode(base64.b64decode(item.b64_json)) for item in result.data]
    assert all(image.shape == (64, 64, 3) for image in via_http)
    assert [item.model_extra["seed"] for item in result.data] == [seed, seed + 1]

    stub = orchestrator_pb2_grpc.ImageServiceStub(stack.channel())
    direct = stub.Generate(
        pb.GenerateRequest(
            prompt="a red circle on a blue background",
            n=2,
            size=64,
            seed=seed,
            params=pb.SamplingParams(
                prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
            ),
        ),
        timeout=120,
    )
    for http_image, grpc_image in zip(via_http, direct.images, strict=True):
        assert np.abs(http_image - decode(grpc_image.png)).max() <= 2


def test_generate_url_downloads_a_png_of_the_asked_size(client):
    result = client.images.generate(prompt="a green square", size="128x128", extra_body=FAST)
    url = result.data[0].url
    assert url.startswith("http://127.0.0.1:") and "signature=" in url and result.data[0].b64_json is None
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert decode(got.content).shape == (128, 128, 3)
    # A link whose expiry or signature was changed does not work.
    tampered = url.replace("expires=", "expires=9")
    assert httpx.get(tampered, timeout=30).status_code == 404


def test_absent_size_is_the_largest_and_n_defaults_to_one(client):
    result = client.images.generate(prompt="a blue star", response_format="b64_json", extra_body=FAST)
    assert len(result.data) == 1
    assert decode(base64.b64decode(result.data[0].b64_json)).shape == (128, 128, 3)


def test_edit_with_image_and_mask_files(client):
    original = png_file(64, seed=3)
    mask = png_file(64, seed=3, hole=True)
    result = client.images.edit(
        image=("photo.png", original, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="a yellow star",
        n=1,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, **FAST},
    )
    edited = decode(base64.b64decode(result.data[0].b64_json))
    before = decode(original)
    keep = np.ones((64, 64), bool)
    keep[:32, :32] = False
    assert edited.shape == (64, 64, 3)
    assert np.abs(edited - before)[keep].max() <= 2  # the kept region is the original's
    assert np.abs(edited - before)[~keep].mean() > 10  # the transparent region was regenerated
    assert result.data[0].model_extra["seed"] == 5


def test_create_variation(client):
    result = client.images.create_variation(
        image=("photo.png", png_file(64, seed=4), "image/png"),
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 9, "decoder_num_inference_steps": 2, "super_res_num_inference_steps": [2]},
    )
    images = [decode(base64.b64decode(item.b64_json)) for item in result.data]
    assert [image.shape for image in images] == [(32, 32, 3)] * 2
    assert np.abs(images[0] - images[1]).mean() > 0  # seeds 9 and 10 differ


def test_refused_prompt_is_a_content_policy_violation(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a massacre in the city", extra_body=FAST)
    assert caught.value.code == "content_policy_violation"
    assert caught.value.status_code == 400 and "violence" in caught.value.message


def test_bad_size_names_the_param_and_the_sizes(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", size="1024x1024")
    assert caught.value.param == "size"
    assert "'32x32', '64x64', '128x128'" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", size="64x32")
    assert caught.value.param == "size"


def test_samplers_per_stage_as_extra_fields_equal_the_grpc_door(client, stack):
    samplers = {"prior_sampler": "ddim", "decoder_sampler": "dpmsolver++", "super_res_sampler": "ddim"}
    result = client.images.generate(
        prompt="a yellow star",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 77, **FAST, **samplers, "ddim_eta": 0.5},
    )
    stub = orchestrator_pb2_grpc.ImageServiceStub(stack.channel())
    params = pb.SamplingParams(
        prior_num_inference_steps=2,
        decoder_num_inference_steps=2,
        super_res_num_inference_steps=[2],
        ddim_eta=0.5,
        **samplers,
    )
    direct = stub.Generate(
        pb.GenerateRequest(prompt="a yellow star", size=64, seed=77, params=params), timeout=120
    )
    default = stub.Generate(
        pb.GenerateRequest(prompt="a yellow star", size=64, seed=77, params=pb.SamplingParams(
            prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
        )),
        timeout=120,
    )  # fmt: skip
    via_http = decode(base64.b64decode(result.data[0].b64_json))
    assert np.abs(via_http - decode(direct.images[0].png)).max() <= 2
    assert np.abs(via_http - decode(default.images[0].png)).max() > 2  # the samplers were applied


def test_unknown_sampler_names_the_param(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", extra_body={**FAST, "decoder_sampler": "euler"})
    assert caught.value.param == "decoder_sampler", caught.value.message


def test_bad_sampling_value_names_the_param(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", extra_body={"decoder_num_inference_steps": 1})
    assert caught.value.param == "decoder_num_inference_steps", caught.value.message


def test_model_names(client, gateway):
    assert client.images.generate(prompt="a dot", model="dall-e-2", size="32x32", extra_body=FAST).data
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="a dot", model="dall-e-3", extra_body=FAST)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    served = [model.id for model in client.models.list()]
    assert "dall-e-2" in served and len(served) == 2
    client.images.generate(prompt="a dot", model=served[0], size="32x32", extra_body=FAST)
