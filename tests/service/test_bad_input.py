"""Every bad input gets INVALID_ARGUMENT whose message starts with the field's name, through the orchestrator
and directly at each stage; afterwards every process still says SERVING."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import FAST, assert_every_process_serving, assert_invalid, image_bytes, stage_requests
from unclip.rng import generators_from_seed
from unclip.runtime.tensors import encode_generators, from_proto, to_proto
from unclip.v1 import (
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    orchestrator_pb2_grpc,
    prior_pb2_grpc,
    tensor_pb2,
)
from unclip.v1 import orchestrator_pb2 as pb


@pytest.fixture(scope="module")
def channels(stack):
    opened = {name: stack.channel(name) for name in stack.addresses}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module", autouse=True)
def still_serving_afterwards(stack):
    yield
    assert_every_process_serving(stack)


# ---- through the orchestrator ------------------------------------------------------------------------------


GENERATE_CASES = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="x" * 1001), "prompt"),
    (dict(n=11), "n"),
    (dict(n=-1), "n"),
    (dict(size=129), "size"),
    (dict(size=-3), "size"),
    (dict(seed=2**63), "seed"),
    (dict(output_format=7), "output_format"),
    (dict(params=pb.SamplingParams(prior_num_inference_steps=1)), "params.prior_num_inference_steps"),
    (dict(params=pb.SamplingParams(decoder_num_inference_steps=1001)), "params.decoder_num_inference_steps"),
    (
        dict(params=pb.SamplingParams(super_res_num_inference_steps=[7, 1])),
        "params.super_res_num_inference_steps",
    ),
    (
        dict(params=pb.SamplingParams(super_res_num_inference_steps=[7, 7, 7])),
        "params.super_res_num_inference_steps",
    ),
    (dict(params=pb.SamplingParams(prior_guidance_scale=-1.0)), "params.prior_guidance_scale"),
    (dict(params=pb.SamplingParams(prior_guidance_scale=math.nan)), "params.prior_guidance_scale"),
    (dict(params=pb.SamplingParams(decoder_guidance_scale=math.inf)), "params.decoder_guidance_scale"),
    (dict(params=pb.SamplingParams(prior_num_candidates=0)), "params.prior_num_candidates"),
]


@pytest.mark.parametrize(("fields", "field"), GENERATE_CASES, ids=[f for _, f in GENERATE_CASES])
def test_generate_rejects(channels, fields, field):
    request = pb.GenerateRequest(prompt="a red circle", seed=1, params=FAST)
    for name, value in fields.items():
        if name == "params":
            request.params.MergeFrom(value)
        else:
            setattr(request, name, value)
    assert_invalid(orchestrator_pb2_grpc.ImageServiceStub(channels["orchestrator"]).Generate, request, field)


def test_too_large_size_lists_the_sizes_the_cascade_makes(channels):
    stub = orchestrator_pb2_grpc.ImageServiceStub(channels["orchestrator"])
    assert_invalid(stub.Generate, pb.GenerateRequest(prompt="a", size=1024), "size", "32, 64, 128")


def test_variation_and_edit_reject(channels):
    stub = orchestrator_pb2_grpc.ImageServiceStub(channels["orchestrator"])
    assert_invalid(stub.CreateVariation, pb.VariationRequest(), "image is required")
    assert_invalid(stub.CreateVariation, pb.VariationRequest(image=b"not an image at all"), "image")
    assert_invalid(stub.CreateVariation, pb.VariationRequest(image=image_bytes(64, 48)), "image", "square")
    assert_invalid(
        stub.CreateVariation, pb.VariationRequest(image=image_bytes(64, 64), n=0, size=999), "size"
    )
    bad_decoder_steps = pb.SamplingParams(decoder_num_inference_steps=1)
    assert_invalid(
        stub.CreateVariation,
        pb.VariationRequest(image=image_bytes(64, 64), params=bad_decoder_steps),
        "params.decoder_num_inference_steps",
    )

    rgba = image_bytes(64, 64, "RGBA", alpha_hole=True)
    good = dict(image=rgba, prompt="a blue square", params=FAST)
    assert_invalid(stub.Edit, pb.EditRequest(**{**good, "prompt": ""}), "prompt")
    assert_invalid(stub.Edit, pb.EditRequest(**{**good, "image": b"\x89PNG broken"}), "image")
    assert_invalid(
        stub.Edit,
        pb.EditRequest(**{**good, "image": image_bytes(64, 32, "RGBA", alpha_hole=True)}),
        "image",
        "square",
    )
    assert_invalid(stub.Edit, pb.EditRequest(**{**good, "image": image_bytes(64, 64)}), "mask", "alpha")
    assert_invalid(
        stub.Edit, pb.EditRequest(**good, mask=image_bytes(32, 32, "RGBA", alpha_hole=True)), "mask", "size"
    )
    assert_invalid(stub.Edit, pb.EditRequest(**good, mask=image_bytes(64, 64)), "mask", "alpha")
    assert_invalid(stub.Edit, pb.EditRequest(**good, mask=b"garbage"), "mask")
    assert_invalid(
        stub.Edit, pb.EditRequest(**{**good, "image": image_bytes(64, 64, "RGBA")}), "image", "transparent"
    )


# ---- directly at each stage --------------------------------------------------------------------------------


def corrupt(tensor: tensor_pb2.Tensor, **changes) -> tensor_pb2.Tensor:
    copy = tensor_pb2.Tensor()
    copy.CopyFrom(tensor)
    for name, value in changes.items():
        if name == "shape":
            del copy.shape[:]
            copy.shape.extend(value)
        else:
            setattr(copy, name, value)
    return copy


def with_nan(tensor: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    values = from_proto(tensor, "t").clone()
    values.view(-1)[0] = float("nan")
    return to_proto(values)


def mutated(request, **fields):
    copy = type(request)()
    copy.CopyFrom(request)
    for name, value in fields.items():
        target, _, leaf = name.rpartition(".")
        owner = getattr(copy, target) if target else copy
        if value is None:
            owner.ClearField(leaf)
        elif isinstance(value, tensor_pb2.Tensor | decoder_pb2.InpaintInput):
            getattr(owner, leaf).CopyFrom(value)
        elif leaf == "generators":
            del owner.generators[:]
            owner.generators.extend(value)
        else:
            setattr(owner, leaf, value)
    return copy


def test_encoder_rejects(channels):
    stub = encoder_pb2_grpc.EncoderStub(channels["encoder"])
    assert_invalid(stub.EncodeText, encoder_pb2.EncodeTextRequest(), "prompts")
    assert_invalid(stub.EncodeText, encoder_pb2.EncodeTextRequest(prompts=["a"] * 11), "prompts")
    assert_invalid(stub.EncodeText, encoder_pb2.EncodeTextRequest(prompts=["ok", "x" * 1001]), "prompts[1]")
    assert_invalid(stub.EncodeImage, encoder_pb2.EncodeImageRequest(), "images")
    assert_invalid(stub.EncodeImage, encoder_pb2.EncodeImageRequest(images=[b"junk"]), "images[0]")
    assert_invalid(
        stub.EncodeImage,
        encoder_pb2.EncodeImageRequest(images=[image_bytes(8, 8), image_bytes(8, 4)]),
        "images[1]",
    )


def test_prior_and_decoder_reject(channels):
    # Made (and so proven valid) by the stack's encoder and prior.
    prior_request, decode_request = stage_requests(channels.__getitem__, ["a", "a"])
    text, generators = prior_request, prior_request.generators  # the encoder's outputs, as sent
    prior = prior_pb2_grpc.PriorStub(channels["prior"])
    cases = [
        (dict(num_inference_steps=1), "num_inference_steps"),
        (dict(guidance_scale=math.nan), "guidance_scale"),
        (dict(guidance_scale=-0.5), "guidance_scale"),
        (dict(num_candidates=100), "num_candidates"),
        (dict(text_embeds=None), "text_embeds"),
        (dict(text_embeds=corrupt(text.text_embeds, dtype=tensor_pb2.DATA_TYPE_FLOAT16)), "text_embeds"),
        (dict(text_embeds=corrupt(text.text_embeds, shape=[3, 32])), "text_embeds"),
        (dict(text_embeds=corrupt(text.text_embeds, data=b"\0" * 8)), "text_embeds"),
        (dict(text_embeds=corrupt(text.text_embeds, dtype=99)), "text_embeds"),
        (dict(text_embeds=to_proto(torch.zeros(4, 16))), "text_embeds"),  # wrong embedding size
        (
            dict(text_encoder_hidden_states=with_nan(text.text_encoder_hidden_states)),
            "text_encoder_hidden_states",
        ),
        (dict(text_mask=to_proto(from_proto(text.text_mask, "m").float())), "text_mask"),
        (dict(generators=generators[:1]), "generators"),
        (dict(generators=[tensor_pb2.GeneratorState(state=b"short")] * 2), "generators[0]"),
    ]
    for fields, field in cases:
        assert_invalid(prior.Sample, mutated(prior_request, **fields), field)

    image_embeds = decode_request.image_embeds
    decoder = decoder_pb2_grpc.DecoderStub(channels["decoder"])
    decoder.Decode(decode_request)  # the valid request works
    image = to_proto(torch.zeros(2, 3, 32, 32))

    def ones(size: int) -> tensor_pb2.Tensor:
        return to_proto(torch.ones(2, 1, size, size))

    cases = [
        (dict(num_inference_steps=1001), "num_inference_steps"),
        (dict(guidance_scale=math.inf), "guidance_scale"),
        (dict(image_embeds=None), "image_embeds"),
        (dict(image_embeds=with_nan(image_embeds)), "image_embeds"),
        (dict(image_embeds=to_proto(torch.zeros(2, 16))), "image_embeds"),  # wrong embedding size
        (dict(text_mask=None), "text_mask"),
        (dict(do_classifier_free_guidance=False), "text_embeds"),  # 2n rows without guidance
        (dict(generators=[]), "generators"),
        (dict(inpaint=decoder_pb2.InpaintInput(image=image)), "inpaint.mask"),
        (dict(inpaint=decoder_pb2.InpaintInput(image=image, mask=ones(16))), "inpaint.mask"),
        (dict(inpaint=decoder_pb2.InpaintInput(image=with_nan(image), mask=ones(32))), "inpaint.image"),
    ]  # fmt: skip
    for fields, field in cases:
        assert_invalid(decoder.Decode, mutated(decode_request, **fields), field)


@pytest.mark.parametrize(("stage", "size"), [("super_res", 32), ("super_res_2", 64)])
def test_upsampler_rejects(channels, stage, size):
    stub = decoder_pb2_grpc.UpsamplerStub(channels[stage])
    info = stub.GetStageInfo(decoder_pb2.StageInfoRequest())
    assert (info.stage, info.input_size, info.output_size) == (stage, size, size * 2)
    request = decoder_pb2.UpsampleRequest(
        images=to_proto(torch.zeros(1, 3, size, size)),
        generators=encode_generators(generators_from_seed(0, 1)),
        num_inference_steps=2,
    )
    stub.Upsample(request)  # the valid request works
    cases = [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(images=None), "images"),
        (dict(images=to_proto(torch.zeros(1, 3, size + 1, size + 1))), "images"),
        (dict(images=to_proto(torch.zeros(1, 3, size, size, dtype=torch.float16))), "images"),
        (dict(images=with_nan(request.images)), "images"),
        (dict(images=to_proto(torch.zeros(11, 3, size, size))), "images"),
        (dict(generators=[]), "generators"),
    ]
    for fields, field in cases:
        assert_invalid(stub.Upsample, mutated(request, **fields), field)
