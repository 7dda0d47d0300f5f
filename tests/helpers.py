"""What the service, access and provenance tests share: uploads (image bytes), gRPC status checks, and a valid
prior and decoder request made by the shared stack's own encoder and prior.

Imported by name (`from tests.helpers import assert_invalid`); the fixtures (`stack`, `image_service`,
`stack_engines`) are in tests/conftest.py.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import grpc
import numpy as np
import PIL.Image

from unclip.rng import generators_from_seed
from unclip.runtime.server import health_status
from unclip.runtime.tensors import encode_generators
from unclip.v1 import decoder_pb2, encoder_pb2, encoder_pb2_grpc, prior_pb2, prior_pb2_grpc
from unclip.v1 import orchestrator_pb2 as pb

# Two steps per stage: enough to run every stage, little enough for a CPU shared by a test run.
FAST = pb.SamplingParams(
    prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
)


def image_bytes(
    width: int, height: int, mode: str = "RGB", fmt: str = "PNG", alpha_hole: bool = False
) -> bytes:
    """Random pixels (the same on every call) as a `mode` image saved as `fmt`. RGBA is opaque but, with
    `alpha_hole`, for its transparent top-left quarter; a mode Pillow cannot make from RGB is blank."""
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "RGBA":
        alpha = np.full((height, width, 1), 255, dtype=np.uint8)
        if alpha_hole:
            alpha[: height // 2, : width // 2] = 0
        image = PIL.Image.fromarray(np.concatenate([rgb, alpha], axis=2))
    else:
        try:
            image = PIL.Image.fromarray(rgb).convert(mode)
        except ValueError:
            image = PIL.Image.new(mode, (width, height))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status `call()` ends with and its details (OK and "" when it returns)."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def assert_invalid(method: Callable[..., object], request: object, field: str, *also: str) -> None:
    """`method(request)` ends INVALID_ARGUMENT, its message starting with `field` and holding each `also`."""
    code, details = code_of(lambda: method(request, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(field), details
    for text in also:
        assert text in details, details


def assert_every_process_serving(stack) -> None:
    """Every process of the shared stack still answers SERVING (after the tests that tried to break it)."""
    for name in stack.addresses:
        assert health_status(stack.health_address(name)) == "SERVING", name


def stage_requests(
    channel: Callable[[str], grpc.Channel], prompts: list[str]
) -> tuple[prior_pb2.PriorRequest, decoder_pb2.DecodeRequest]:
    """A valid prior request for `prompts` (with guidance, 2 steps) from the stack's encoder, and a valid
    decoder request on what the prior answers to it. `channel(name)` opens a channel to a process."""
    encoder = encoder_pb2_grpc.EncoderStub(channel("encoder"))
    text = encoder.EncodeText(
        encoder_pb2.EncodeTextRequest(prompts=prompts, do_classifier_free_guidance=True), timeout=120
    )
    # What the two requests share: the encoder's output, the image generators, 2 steps with guidance.
    shared = dict(
        text_embeds=text.text_embeds,
        text_encoder_hidden_states=text.text_encoder_hidden_states,
        text_mask=text.text_mask,
        generators=encode_generators(generators_from_seed(0, len(prompts))),
        num_inference_steps=2,
        do_classifier_free_guidance=True,
    )
    prior_request = prior_pb2.PriorRequest(**shared, guidance_scale=4.0)
    prior = prior_pb2_grpc.PriorStub(channel("prior")).Sample(prior_request, timeout=120)
    decode_request = decoder_pb2.DecodeRequest(**shared, image_embeds=prior.image_embeds, guidance_scale=8.0)
    return prior_request, decode_request
