"""stream=true: the SDK's streaming API reads partial images (after the decoder and the first upsampler),
then the completed image, for generations and edits; refusals and bad input are 400s before the stream
starts; `unclip up`'s gateway."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx2 as httpx
import numpy as np
import openai
import PIL.Image
import pytest

from tests.gateway.conftest import FAST


def pixels_of(b64: str) -> bytes:
    """The decoded RGB pixels (the PNGs differ in their provenance: request id, time, signature)."""
    return PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def size_of(b64: str) -> tuple[int, int]:
    image = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.size


def test_stream_partial_images_then_completed(client):
    stream = client.images.generate(
        prompt="a red circle", stream=True, partial_images=2, extra_body={"seed": 11, **FAST}
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert [size_of(event.b64_json) for event in events] == [(32, 32), (64, 64), (128, 128)]
    assert events[-1].size == "128x128" and events[-1].model_extra["seed"] == 11
    # The completed image is the one the same request makes without streaming.
    plain = client.images.generate(
        prompt="a red circle", response_format="b64_json", extra_body={"seed": 11, **FAST}
    )
    assert pixels_of(events[-1].b64_json) == pixels_of(plain.data[0].b64_json)

    one = client.images.generate(
        prompt="a red circle", size="64x64", stream=True, partial_images=1, extra_body=FAST
    )
    one = list(one)
    assert [event.type for event in one] == ["image_generation.partial_image", "image_generation.completed"]
    assert [size_of(event.b64_json) for event in one] == [(32, 32), (64, 64)]


def test_stream_failures_come_before_the_stream(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a massacre", stream=True, extra_body=FAST)
    assert caught.value.code == "content_policy_violation"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", stream=True, n=2, extra_body=FAST)
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(
            prompt="a red circle", stream=True, extra_body={"decoder_num_inference_steps": 1}
        )
    assert caught.value.param == "decoder_num_inference_steps"


def edit_files(size: int = 64) -> tuple[tuple[str, bytes, str], tuple[str, bytes, str]]:
    """A random picture and its mask with a transparent square hole, as the SDK's file tuples."""
    original = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    alpha = np.full((size, size), 255, dtype=np.uint8)
    alpha[: size // 2, : size // 2] = 0
    files = []
    for name, array, mode in (("photo", original, "RGB"), ("mask", np.dstack([original, alpha]), "RGBA")):
        buffer = io.BytesIO()
        PIL.Image.fromarray(array, mode).save(buffer, format="PNG")
        files.append((f"{name}.png", buffer.getvalue(), "image/png"))
    return files[0], files[1]


def test_edit_stream_partial_images_then_completed(client):
    image, mask = edit_files()
    stream = client.images.edit(
        image=image,
        mask=mask,
        prompt="a yellow star",
        stream=True,
        partial_images=2,
        extra_body={"seed": 5, **FAST},
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert [size_of(event.b64_json) for event in events] == [(32, 32), (64, 64), (128, 128)]
    assert events[-1].size == "128x128" and events[-1].model_extra["seed"] == 5
    assert events[-1].model_extra["unclip_usage"]["images"] == 1
    # The completed image is the one the same edit makes without streaming.
    plain = client.images.edit(
        image=image,
        mask=mask,
        prompt="a yellow star",
        response_format="b64_json",
        extra_body={"seed": 5, **FAST},
    )
    assert pixels_of(events[-1].b64_json) == pixels_of(plain.data[0].b64_json)

    # Refusals and bad input are 400s naming the field, before any event.
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=image, mask=mask, prompt="a massacre", stream=True, extra_body=FAST)
    assert caught.value.code == "content_policy_violation"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=image, mask=mask, prompt="a star", n=2, stream=True, extra_body=FAST)
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=image, mask=edit_files(32)[1], prompt="a star", stream=True, extra_body=FAST)
    assert caught.value.param == "mask"


def test_progress_events_for_the_page(gateway, api_key):
    body = {"prompt": "a blue square", "stream": True, "size": "64x64", "unclip_progress": True, **FAST}
    headers = {"authorization": f"Bearer {api_key}"}
    events = []
    with httpx.stream(
        "POST", gateway + "/v1/images/generations", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "image_generation.completed" and "image_generation.partial_image" in kinds
    steps = [(e["stage"], e["step"], e["total"]) for e in events if e.get("event") == "step"]
    assert ("decoder", 2, 2) in steps and ("prior", 2, 2) in steps


def test_unclip_up_starts_the_gateway(stack, tmp_path, api_key):
    from unclip.stack import Stack

    # Only the gateway of this Stack starts (in front of the shared orchestrator): no keys or certificates of
    # its own to mint, where the Stack has access control.
    no_access = {"auth": False, "tls": False} if "auth" in Stack.__dataclass_fields__ else {}
    own = Stack(model=str(stack.model_dir), log_dir=tmp_path, http_port=0, grace_seconds=5, **no_access)
    try:
        own._start_gateway(stack.address, "tiny", own._env(), time.monotonic() + 60)
        assert own.http_url.startswith("http://127.0.0.1:")
        assert own.state().extra["http_url"] == own.http_url
        models = httpx.get(own.http_url + "/v1/models", headers={"authorization": f"Bearer {api_key}"}).json()
        assert [m["id"] for m in models["data"]][-1] == "dall-e-2"
        assert httpx.get(own.http_url + "/readyz").status_code == 200
    finally:
        own.stop()
    assert not own.processes[0].alive()
