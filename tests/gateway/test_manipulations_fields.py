"""The manipulations' HTTP fields without a server: both encodings parse to the same request, the
orchestrator's nested field names become the HTTP ones, and the answer's body carries frames in order."""

from __future__ import annotations

import base64

import pytest

from services.gateway import manipulation
from services.gateway.core import ApiError, RpcFailure, Served
from services.gateway.manipulation import INTERPOLATION, TEXT_DIFF, ManipulationFields
from unclip.v1 import orchestrator_pb2 as pb

SERVED = Served(model_name="tiny", sizes=(32, 64, 128))


def test_json_and_form_fields_make_the_same_request():
    png = b"\x89PNG fake bytes"
    as_json = ManipulationFields.parse(
        INTERPOLATION,
        {
            "start_image": "data:image/png;base64," + base64.b64encode(png).decode(),
            "end_prompt": "a blue square",
            "frames": 3,
            "noise": "fixed",
            "size": "64x64",
            "seed": 9,
            "animation": "webp",
            "super_res_num_inference_steps": [2],
            "decoder_sampler": "ddim",
            "ddim_eta": 0.0,
        },
    )
    as_form = ManipulationFields.parse(
        INTERPOLATION,
        {
            "end_prompt": "a blue square",
            "frames": "3",
            "noise": "fixed",
            "size": "64x64",
            "seed": "9",
            "animation": "webp",
            "super_res_num_inference_steps": ["2"],
            "decoder_sampler": "ddim",
            "ddim_eta": "0",
        },
        form=True,
    )
    as_form.add_files({"start_image": png})
    first, second = (manipulation.to_interpolate(f, SERVED) for f in (as_json, as_form))
    assert first == second
    assert first.start.image == png and first.end.prompt == "a blue square"
    assert (first.frames, first.size, first.seed) == (3, 64, 9)
    assert first.animation == pb.ANIMATION_FORMAT_WEBP and first.params.decoder_sampler == "ddim"


def test_defaults_and_text_diff():
    fields = ManipulationFields.parse(
        TEXT_DIFF, {"image": base64.b64encode(b"x").decode(), "from_caption": "a", "to_caption": "b"}
    )
    request = manipulation.to_text_diff(fields, SERVED)
    assert (request.frames, request.size, request.max_theta) == (8, 128, 0.0)  # 0: the orchestrator's 0.5
    assert not request.HasField("seed") and request.animation == pb.ANIMATION_FORMAT_NONE


@pytest.mark.parametrize(
    ("kind", "values", "param"),
    [
        (INTERPOLATION, {"image": "abc"}, "image"),  # a text diff's field
        (TEXT_DIFF, {"noise": "fixed"}, "noise"),  # an interpolation's field
        (TEXT_DIFF, {"max_theta": 0}, "max_theta"),
        (INTERPOLATION, {"start_image": 5}, "start_image"),
        (INTERPOLATION, {"start_image": "%%%"}, "start_image"),
        (INTERPOLATION, {"seed": -1}, "seed"),
        (INTERPOLATION, {"frames": 2**40}, "frames"),
    ],
)
def test_bad_fields_name_the_param(kind, values, param):
    with pytest.raises(ApiError) as caught:
        ManipulationFields.parse(kind, values)
    assert caught.value.status == 400 and caught.value.param == param


def test_an_oversized_base64_image_names_its_field():
    big = base64.b64encode(b"\0" * 2048).decode()
    with pytest.raises(ApiError) as caught:
        ManipulationFields.parse(INTERPOLATION, {"end_image": big}, max_image_bytes=1024)
    assert caught.value.param == "end_image"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("start.image could not be decoded", "start_image"),
        ("end is required: an image or a prompt", "end_prompt"),
        ("params.decoder_sampler must be 'ddim'", "decoder_sampler"),
        ("frames must be in 2..32, got 1", "frames"),
    ],
)
def test_orchestrator_errors_name_the_http_field(message, param):
    error = manipulation.http_error(RpcFailure("INVALID_ARGUMENT", message, {}))
    assert (error.status, error.param) == (400, param)


def test_body_frames_in_order_with_links():
    frames = pb.ImagesResponse(seed=4, size=32, withheld=1, withheld_categories=["violence"])
    for k in range(2):
        frames.images.add(png=b"png%d" % k, seed=4, index=k)
    response = pb.InterpolateResponse(
        frames=frames, thetas=[0.0, 1.0], animation=b"GIF89a", animation_format=pb.ANIMATION_FORMAT_GIF
    )
    inline = manipulation.frames_body(response, None)
    assert [base64.b64decode(item["b64_json"]) for item in inline["data"]] == [b"png0", b"png1"]
    assert inline["animation"] == {"format": "gif", "b64_json": base64.b64encode(b"GIF89a").decode()}
    assert (inline["seed"], inline["size"], inline["withheld"]) == (4, "32x32", 1)
    linked = manipulation.frames_body(response, ["u0", "u1"], "a.gif")
    assert [item["url"] for item in linked["data"]] == ["u0", "u1"] and linked["animation"]["url"] == "a.gif"
    assert [item["theta"] for item in linked["data"]] == [0.0, 1.0]
