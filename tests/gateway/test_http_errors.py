"""Bad input over HTTP gets a 4xx in OpenAI's error shape naming the param, never a 500; and the service
routes (/v1/models, /healthz, /readyz, /metrics, /docs) answer."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from tests.gateway.conftest import running_gateway
from tests.gateway.test_openai_sdk import png_file


@pytest.fixture(scope="module")
def http(gateway, api_key):
    with httpx.Client(base_url=gateway, headers={"authorization": f"Bearer {api_key}"}, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


JSON_CASES = [
    ({"n": 1}, "prompt", "missing_required_parameter"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": "a dot", "n": "2"}, "n", "invalid_type"),
    ({"prompt": "a dot", "n": 2.5}, "n", "invalid_type"),
    ({"prompt": "a dot", "n": 11}, "n", "invalid_value"),
    ({"prompt": "a dot", "n": 0}, "n", "invalid_value"),
    ({"prompt": "a dot", "size": 64}, "size", "invalid_type"),
    ({"prompt": "a dot", "response_format": "png"}, "response_format", None),
    ({"prompt": "a dot", "seed": "seven"}, "seed", "invalid_type"),
    ({"prompt": "a dot", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "a dot", "seed": 2**64}, "seed", "invalid_value"),
    ({"prompt": "a dot", "decoder_num_inference_steps": 2**40}, "decoder_num_inference_steps", None),
    ({"prompt": "a dot", "prior_guidance_scale": "high"}, "prior_guidance_scale", "invalid_type"),
    ({"prompt": "a dot", "colour": "red"}, "colour", "unknown_parameter"),
    ({"prompt": "x" * 1001}, "prompt", "invalid_value"),
    ({"prompt": "a dot", "stream": True, "n": 2}, "n", None),
]


@pytest.mark.parametrize(
    ("body", "param", "code"), JSON_CASES, ids=[c[1] + "-" + str(c[2]) for c in JSON_CASES]
)
def test_bad_json_fields(http, body, param, code):
    assert_error(http.post("/v1/images/generations", json=body), 400, param, code)


def test_malformed_and_non_object_json(http):
    headers = {"content-type": "application/json"}
    assert_error(http.post("/v1/images/generations", content=b"{not json", headers=headers), 400, None)
    assert_error(http.post("/v1/images/generations", content=b"[1, 2]", headers=headers), 400, None)
    assert_error(http.post("/v1/images/generations", content=b"\xff\xfe", headers=headers), 400, None)


def test_bad_uploads(http):
    # A text file as the image: the orchestrator names the field.
    files = {"image": ("notes.png", b"this is not a picture", "image/png")}
    assert_error(http.post("/v1/images/variations", files=files), 400, "image")
    # No image at all; the image sent as a text field; a form that is not multipart.
    assert_error(http.post("/v1/images/variations", files={"n": (None, "1")}), 400, "image")
    assert_error(http.post("/v1/images/variations", files={"extra": ("a", b"b")}), 400, "extra")
    assert_error(
        http.post("/v1/images/edits", files={"image": (None, "abc"), "prompt": (None, "a")}),
        400,
        "image",
    )
    assert_error(http.post("/v1/images/variations", json={"image": "abc"}), 400, None)
    # A non-square image, and a mask of the wrong size.
    edit = {"image": ("a.png", png_file(64), "image/png"), "mask": ("m.png", png_file(32), "image/png")}
    assert_error(http.post("/v1/images/edits", data={"prompt": "a star"}, files=edit), 400, "mask")
    # Form values of the wrong type, and n=11.
    image = {"image": ("a.png", png_file(32), "image/png")}
    assert_error(http.post("/v1/images/variations", data={"n": "two"}, files=image), 400, "n", "invalid_type")
    assert_error(http.post("/v1/images/variations", data={"n": "11"}, files=image), 400, "n", "invalid_value")
    assert_error(http.post("/v1/images/variations", data={"shade": "1"}, files=image), 400, "shade")


def test_a_50_mb_upload_is_refused_before_it_is_read(http):
    files = {"image": ("big.png", b"\0" * (50 * 1024 * 1024), "image/png")}
    error = assert_error(http.post("/v1/images/edits", data={"prompt": "a"}, files=files), 413, None)
    assert error["code"] == "request_too_large"
    # A 5 MB image inside the body limit is over the per-image limit (OpenAI: less than 4 MB).
    files = {"image": ("big.png", b"\0" * (5 * 1024 * 1024), "image/png")}
    assert_error(http.post("/v1/images/variations", files=files), 400, "image", "invalid_value")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/images/nothing"), 404, None)
    assert_error(http.get("/v1/images/generations"), 405, None)


def test_service_routes(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and "dall-e-2" in [m["id"] for m in models["data"]]
    metrics = http.get("/metrics").text
    assert 'unclip_gateway_requests_total{endpoint="generations",status="400"}' in metrics
    assert http.get("/docs").status_code == 200
    schema = http.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/images/variations"} <= set(schema["paths"])
    body = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"
    ]
    assert body["required"] == ["image", "prompt"] and "mask" in body["properties"]


def test_orchestrator_down_is_503(stack, tmp_path):
    with running_gateway("127.0.0.1:9", stack.env, tmp_path / "gateway.log", probe="/healthz") as url:
        response = httpx.post(url + "/v1/images/generations", json={"prompt": "a dot"}, timeout=30)
        assert_error(response, 503, None, "service_unavailable")
        assert httpx.get(url + "/readyz", timeout=30).status_code == 503
