"""EditStream through the shared stack: accepted, the stages' events and denoising steps, a preview after
the decoder and the first upsampler, then the edit the unary Edit makes with the same seed; bad input and a
refused prompt end the call before "accepted"."""

from __future__ import annotations

import io

import grpc
import numpy as np
import PIL.Image
import pytest

from services.safety.refusal import parse_refusal
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

FAST = pb.SamplingParams(
    prior_num_inference_steps=2, decoder_num_inference_steps=3, super_res_num_inference_steps=[2]
)


@pytest.fixture(scope="module")
def image_service(stack):
    return orchestrator_pb2_grpc.ImageServiceStub(stack.channel("orchestrator"))


def png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def image_and_mask(size: int = 64) -> tuple[bytes, bytes]:
    """A random picture and a mask with a transparent square hole (regenerate there)."""
    original = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    alpha = np.full((size, size), 255, dtype=np.uint8)
    alpha[size // 4 : size // 2, size // 4 : size // 2] = 0
    return png(original, "RGB"), png(np.dstack([original, alpha]), "RGBA")


def pixels(data: bytes) -> np.ndarray:
    """Decoded pixels (the PNGs differ in their provenance: request id, time, signature)."""
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


def test_edit_stream_reports_progress_and_answers_the_unary_edit(image_service):
    image, mask = image_and_mask()
    request = pb.EditRequest(
        image=image, mask=mask, prompt="a red circle", n=1, seed=21, params=FAST, deterministic=True
    )
    events = list(image_service.EditStream(request, timeout=300))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "result" and kinds.count("result") == 1, kinds

    started = [e.stage_started.stage for e in events if e.HasField("stage_started")]
    finished = [e.stage_finished.stage for e in events if e.HasField("stage_finished")]
    # The prompt and image checks ran before "accepted"; their events follow it, before any model stage.
    assert started == finished and started[:4] == ["safety", "safety", "encoder", "prior"], started
    assert started.index("decoder") < started.index("super_res") < started.index("super_res_2")
    steps: dict[str, list[tuple[int, int]]] = {}
    for event in events:
        if event.HasField("step"):
            steps.setdefault(event.step.stage, []).append((event.step.step, event.step.total))
    assert steps["prior"] == [(1, 2), (2, 2)] and steps["decoder"] == [(1, 3), (2, 3), (3, 3)]
    assert steps["super_res"] == [(1, 2), (2, 2)] and steps["super_res_2"] == [(1, 2), (2, 2)]

    # A preview after the decoder and after the first upsampler (the last one's output is the result).
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [(p.stage, p.size, p.index) for p in previews] == [("decoder", 32, 0), ("super_res", 64, 0)]
    assert [pixels(p.png).shape for p in previews] == [(32, 32, 3), (64, 64, 3)]
    decoder_done = kinds.index("stage_finished", started.index("decoder"))
    assert kinds.index("preview") > decoder_done

    result = events[-1].result
    assert result.seed == 21 and result.size == 128 and [i.seed for i in result.images] == [21]
    assert result.usage.images == 1 and result.usage.stage_seconds["decoder"] > 0
    unary = image_service.Edit(request, timeout=300)
    assert np.array_equal(pixels(result.images[0].png), pixels(unary.images[0].png))


def test_edit_stream_refuses_bad_input_and_refused_prompts_before_accepting(image_service):
    image, mask = image_and_mask()
    wrong_mask = image_and_mask(32)[1]
    cases = {
        "mask": pb.EditRequest(image=image, mask=wrong_mask, prompt="a red circle", params=FAST),
        "image": pb.EditRequest(image=b"\x89PNG broken", prompt="a red circle", params=FAST),
        "prompt": pb.EditRequest(image=image, mask=mask, prompt="", params=FAST),
        "refused": pb.EditRequest(image=image, mask=mask, prompt="a massacre", params=FAST),
    }
    for name, request in cases.items():
        received = []
        with pytest.raises(grpc.RpcError) as caught:
            for event in image_service.EditStream(request, timeout=120):
                received.append(event)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, caught.value)
        assert received == [], (name, received)
        refusal = parse_refusal(caught.value)
        if name == "refused":
            assert refusal is not None and refusal.stage == "prompt", caught.value.details()
        else:
            assert refusal is None and caught.value.details().startswith(name), caught.value.details()


def test_edit_stream_needs_the_edit_scope(stack):
    from unclip.access import keys
    from unclip.access.client import with_key
    from unclip.runtime.server import create_channel

    key = keys.create(stack.running.keys_file, "edit-stream-generate-only", scopes=["generate"])
    image, mask = image_and_mask()
    request = pb.EditRequest(image=image, mask=mask, prompt="a red circle", params=FAST)
    try:
        with with_key(create_channel(stack.address), key) as channel:
            stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.EditStream(request, timeout=60))
    finally:
        keys.revoke(stack.running.keys_file, "edit-stream-generate-only")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'edit'" in caught.value.details()
