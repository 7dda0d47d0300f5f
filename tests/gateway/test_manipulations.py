"""The paper's manipulations at the HTTP door: /v1/images/interpolations and /v1/images/text-diffs in front of
the shared stack (tiny model, 2-3 frames, 2 steps per stage). The frames equal the gRPC door's for the same
seed; image ends come as base64 JSON or multipart files; animations and links work; bad input is OpenAI's 4xx
naming the HTTP field."""

from __future__ import annotations

import base64
import io

import httpx2 as httpx
import numpy as np
import PIL.Image
import pytest

from tests.gateway.conftest import FAST
from tests.gateway.test_http_errors import assert_error
from tests.gateway.test_openai_sdk import decode, png_file
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

FAST_PB = pb.SamplingParams(
    prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
)


@pytest.fixture(scope="module")
def http(gateway, api_key):
    headers = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=gateway, headers=headers, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def stub(stack):
    with stack.channel() as channel:
        yield orchestrator_pb2_grpc.ImageServiceStub(channel)


def frames_of(body: dict) -> list[np.ndarray]:
    return [decode(base64.b64decode(item["b64_json"])) for item in body["data"]]


def test_interpolation_between_prompts_equals_the_grpc_door(http, stub):
    body = {
        "start_prompt": "a red circle",
        "end_prompt": "a blue square",
        "frames": 3,
        "size": "64x64",
        "seed": 7,
        "response_format": "b64_json",
        "animation": "gif",
        **FAST,
    }
    response = http.post("/v1/images/interpolations", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["created"] > 0 and answer["seed"] == 7 and answer["size"] == "64x64"
    assert [item["index"] for item in answer["data"]] == [0, 1, 2]
    assert [item["theta"] for item in answer["data"]] == pytest.approx([0, 0.5, 1])
    assert all(item["seed"] == 7 and "url" not in item for item in answer["data"])
    via_http = frames_of(answer)
    assert [frame.shape for frame in via_http] == [(64, 64, 3)] * 3
    assert answer["unclip_usage"]["compute_seconds"] > 0
    animation = PIL.Image.open(io.BytesIO(base64.b64decode(answer["animation"]["b64_json"])))
    assert answer["animation"]["format"] == "gif" and animation.format == "GIF" and animation.n_frames == 3

    direct = stub.Interpolate(
        pb.InterpolateRequest(
            start=pb.InterpolationEnd(prompt="a red circle"),
            end=pb.InterpolationEnd(prompt="a blue square"),
            frames=3,
            size=64,
            seed=7,
            params=FAST_PB,
        ),
        timeout=300,
    )
    assert len(direct.frames.images) == 3
    for http_frame, grpc_image in zip(via_http, direct.frames.images, strict=True):
        assert np.abs(http_frame - decode(grpc_image.png)).max() <= 2
    assert np.abs(via_http[0] - via_http[2]).mean() > 0  # the two ends differ


def test_image_ends_as_multipart_files_equal_base64_json(http):
    images = [png_file(32, seed=1), png_file(32, seed=2)]
    fields = {"frames": "2", "size": "32x32", "seed": "3", "response_format": "b64_json"}
    fields |= {"decoder_num_inference_steps": "2", "super_res_num_inference_steps[]": "2"}
    files = {"start_image": ("a.png", images[0], "image/png"), "end_image": ("b.png", images[1], "image/png")}
    as_files = http.post("/v1/images/interpolations", data=fields, files=files)
    assert as_files.status_code == 200, as_files.text
    as_json = http.post(
        "/v1/images/interpolations",
        json={
            "start_image": base64.b64encode(images[0]).decode(),
            "end_image": "data:image/png;base64," + base64.b64encode(images[1]).decode(),
            "frames": 2,
            "size": "32x32",
            "seed": 3,
            "response_format": "b64_json",
            "decoder_num_inference_steps": 2,
            "super_res_num_inference_steps": [2],
        },
    )
    assert as_json.status_code == 200, as_json.text
    first, second = frames_of(as_files.json()), frames_of(as_json.json())
    assert [frame.shape for frame in first] == [(32, 32, 3)] * 2
    for a, b in zip(first, second, strict=True):
        assert np.abs(a - b).max() <= 2


def test_text_diff_as_links_with_a_webp_animation(http):
    fields = {
        "from_caption": "a red circle",
        "to_caption": "a blue circle",
        "frames": "2",
        "size": "64x64",
        "seed": "4",
        "animation": "webp",
        "decoder_num_inference_steps": "2",
        "super_res_num_inference_steps": "2",
    }
    files = {"image": ("photo.png", png_file(64, seed=5), "image/png")}
    response = http.post("/v1/images/text-diffs", data=fields, files=files)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [item["theta"] for item in answer["data"]] == pytest.approx([0, 0.5])  # max_theta: 0.5
    for item in answer["data"]:
        assert "b64_json" not in item and "signature=" in item["url"]
        got = httpx.get(item["url"], timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert decode(got.content).shape == (64, 64, 3)
    link = answer["animation"]["url"]
    assert answer["animation"]["format"] == "webp" and ".webp?" in link
    got = httpx.get(link, timeout=30)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert PIL.Image.open(io.BytesIO(got.content)).n_frames == 2
    # A link works under its own extension only.
    assert httpx.get(link.replace(".webp?", ".gif?"), timeout=30).status_code == 404


GOOD = {"start_prompt": "a red circle", "end_prompt": "a blue square", "frames": 2, **FAST}
NOT_A_PICTURE = base64.b64encode(b"this is text, not a picture").decode()
BAD_INTERPOLATIONS = [  # (changes to a valid JSON body: None removes the field, the param, the code)
    ({"frames": 1}, "frames", "invalid_value"),
    ({"frames": 33}, "frames", "invalid_value"),
    ({"frames": "3"}, "frames", "invalid_type"),
    ({"noise": "sideways"}, "noise", "invalid_value"),
    ({"noise": "inverted"}, "noise", "invalid_value"),  # prompt ends have no latents to invert
    ({"start_prompt": None}, "start_prompt", "missing_required_parameter"),
    ({"end_prompt": None}, "end_prompt", "missing_required_parameter"),
    ({"start_prompt": ""}, "start_prompt", "invalid_value"),
    ({"end_image": base64.b64encode(png_file(32)).decode()}, "end_image", "invalid_value"),  # and end_prompt
    ({"start_prompt": None, "start_image": "not base64!"}, "start_image", "invalid_value"),
    ({"start_prompt": None, "start_image": NOT_A_PICTURE}, "start_image", "invalid_value"),
    ({"animation": "mp4"}, "animation", "invalid_value"),
    ({"size": "4096x4096"}, "size", "invalid_value"),
    ({"n": 2}, "n", "unknown_parameter"),
    ({"decoder_num_inference_steps": 1}, "decoder_num_inference_steps", "invalid_value"),
    ({"response_format": "png"}, "response_format", None),
]


@pytest.mark.parametrize(
    ("change", "param", "code"),
    BAD_INTERPOLATIONS,
    ids=[f"{param}-{i}" for i, (_, param, _) in enumerate(BAD_INTERPOLATIONS)],
)
def test_bad_interpolations_name_the_param(http, change, param, code):
    body = {key: value for key, value in (GOOD | change).items() if value is not None}
    assert_error(http.post("/v1/images/interpolations", json=body), 400, param, code)


DIFF = {"from_caption": "a red circle", "to_caption": "a blue circle", "frames": "2"}
BAD_DIFFS = [  # (form fields to change, whether to send the image, the param)
    ({"max_theta": "0"}, True, "max_theta"),
    ({"max_theta": "1.5"}, True, "max_theta"),
    ({"to_caption": None}, True, "to_caption"),
    ({"decoder_sampler": "unclip"}, True, "decoder_sampler"),  # inverted starts walk DDIM back
    ({}, False, "image"),
]


@pytest.mark.parametrize(
    ("change", "with_image", "param"), BAD_DIFFS, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD_DIFFS)]
)
def test_bad_text_diffs_name_the_param(http, change, with_image, param):
    fields = {key: value for key, value in (DIFF | change).items() if value is not None}
    files = {name: (None, value) for name, value in fields.items()}  # multipart even without a file
    if with_image:
        files["image"] = ("a.png", png_file(64), "image/png")
    assert_error(http.post("/v1/images/text-diffs", files=files), 400, param)


def test_bad_uploads_name_the_file(http):
    text = {"start_image": ("notes.png", b"this is not a picture", "image/png")}
    response = http.post("/v1/images/interpolations", data={"end_prompt": "a dot", "frames": "2"}, files=text)
    assert_error(response, 400, "start_image")
    # The image sent as a text field of the form.
    form = {"start_image": (None, "abc"), "end_prompt": (None, "a dot")}
    assert_error(http.post("/v1/images/interpolations", files=form), 400, "start_image", "invalid_type")
    # A non-image upload to the text diff, and a malformed JSON body.
    files = {"image": ("notes.png", b"plain text", "text/plain")}
    assert_error(http.post("/v1/images/text-diffs", data=DIFF, files=files), 400, "image")
    headers = {"content-type": "application/json"}
    assert_error(http.post("/v1/images/text-diffs", content=b"[1]", headers=headers), 400, None)


@pytest.mark.parametrize("which", ["start_prompt", "end_prompt"])
def test_a_refused_prompt_at_either_end_is_a_content_policy_violation(http, which):
    body = GOOD | {which: "a massacre in the city"}
    error = assert_error(http.post("/v1/images/interpolations", json=body), 400, None)
    assert error["code"] == "content_policy_violation" and "violence" in error["message"]


def test_a_refused_caption_is_a_content_policy_violation(http):
    diff = DIFF | {"to_caption": "a swastika"}
    files = {"image": ("a.png", png_file(64), "image/png")}
    error = assert_error(http.post("/v1/images/text-diffs", data=diff, files=files), 400, None)
    assert error["code"] == "content_policy_violation"


def test_a_wrong_key_is_401(gateway, stack):
    if not stack.env.get("UNCLIP_API_KEY"):
        pytest.skip("the shared stack's orchestrator authenticates nobody")
    headers = {"authorization": "Bearer sk-not-a-key"}
    for path in ("/v1/images/interpolations", "/v1/images/text-diffs"):
        response = httpx.post(gateway + path, json=GOOD, headers=headers, timeout=60)
        assert_error(response, 401, None, "invalid_api_key")


def test_openapi_and_metrics_know_the_endpoints(http):
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/images/interpolations", "/v1/images/text-diffs"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(content)
    form = paths["/v1/images/text-diffs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary"
    assert form["required"] == ["image", "from_caption", "to_caption"]
    metrics = http.get("/metrics").text
    assert 'unclip_gateway_requests_total{endpoint="interpolations",status="400"}' in metrics


def test_the_openai_sdk_posts_them(client):
    import openai

    body = {"start_prompt": "a red circle", "end_prompt": "a blue square", "frames": 2, "size": "32x32"}
    body |= {"seed": 1, "response_format": "b64_json", **FAST}
    answer = client.post("/images/interpolations", body=body, cast_to=object)
    assert [item["index"] for item in answer["data"]] == [0, 1] and answer["size"] == "32x32"
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/images/interpolations", body=body | {"frames": 33}, cast_to=object)
    assert caught.value.param == "frames" and caught.value.status_code == 400
