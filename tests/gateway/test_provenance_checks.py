"""POST /v1/content_provenance_checks through the SDK's own `content_provenance_checks.create`: an image the
gateway made is intact (our C2PA manifest, trusted), one with a pixel changed is altered (the manifest's hash
breaks), an image never made here is not ours; bad input is a 400 naming `file`."""

from __future__ import annotations

import base64
import io

import httpx2 as httpx
import numpy as np
import openai
import PIL.Image
import pytest

from tests.gateway.conftest import FAST
from tests.provenance.test_provenance import change_one_pixel


@pytest.fixture(scope="module")
def made(client) -> bytes:
    """A 128 px image from the gateway (128 is the smallest size the stack watermarks)."""
    result = client.images.generate(
        prompt="a red circle", size="128x128", response_format="b64_json", extra_body={"seed": 13, **FAST}
    )
    return base64.b64decode(result.data[0].b64_json)


def check(client, data: bytes):
    return client.content_provenance_checks.create(file=("image.png", data, "image/png"))


def test_an_image_made_here_is_intact(client, made, stack):
    answer = check(client, made)
    assert answer.object == "content_provenance_check" and answer.created_at > 0
    [c2pa] = answer.results
    assert (c2pa.type, c2pa.outcome, c2pa.validation_state) == ("c2pa", "detected", "trusted")
    assert c2pa.model == stack.model_dir.name
    extra = answer.model_extra
    assert extra["unclip_verdict"] == "intact" and extra["unclip_summary"].startswith("intact: ")
    # The watermark was looked for (whether a 128 px image of the tiny model holds it is the detector's
    # business: tests/provenance measures its rate); the manifest alone decides "intact".
    assert extra["unclip_watermark"]["checked"] and extra["unclip_watermark"]["score"] != 0
    assert extra["unclip_manifest_failures"] == []


def test_a_changed_pixel_is_altered(client, made):
    answer = check(client, change_one_pixel(made))
    [c2pa] = answer.results
    assert (c2pa.outcome, c2pa.validation_state) == ("detected", "invalid")
    assert c2pa.model is None  # the metadata is no longer covered by a valid manifest
    extra = answer.model_extra
    assert extra["unclip_verdict"] == "altered"
    assert "assertion.dataHash.mismatch" in extra["unclip_manifest_failures"]


def test_an_image_never_made_here_is_not_ours(client):
    noise = np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(noise).save(buffer, format="PNG")
    answer = check(client, buffer.getvalue())
    [c2pa] = answer.results
    assert (c2pa.outcome, c2pa.validation_state) == ("not_detected", "not_present")
    extra = answer.model_extra
    assert extra["unclip_verdict"] == "not_ours"
    assert extra["unclip_watermark"]["checked"] and not extra["unclip_watermark"]["found"]


def test_bad_input_is_a_400_naming_file(client, gateway, api_key):
    with pytest.raises(openai.BadRequestError) as caught:
        check(client, b"not an image")
    assert caught.value.param == "file" and caught.value.code == "invalid_value"
    headers = {"authorization": f"Bearer {api_key}"}
    url = gateway + "/v1/content_provenance_checks"
    other = httpx.post(url, files={"image": ("a.png", b"x")}, headers=headers)  # the field is `file`
    assert other.status_code == 400 and other.json()["error"]["param"] == "image"
    no_form = httpx.post(url, json={"file": "x"}, headers=headers)
    assert no_form.status_code == 400 and no_form.json()["error"]["type"] == "invalid_request_error"
    # Without a key the orchestrator refuses, as for every other route.
    anonymous = httpx.post(url, files={"file": ("a.png", b"x")})
    assert anonymous.status_code == 401
