"""Valid requests for every method, captured from the real chain (encoder -> prior -> decoder -> upsamplers,
safety) at warm-up: the fuzzer mutates these, so most mutants get past the first checks."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import Message

from unclip.fuzz.contracts import HEALTH, REFLECTION, Method
from unclip.fuzz.mutations import _image, hostile_images


def capture_seeds(methods: list[Method], channel_for: Callable[[str], grpc.Channel]) -> None:
    """Fills each method's seeds with valid requests, made by running the chain once stage by stage."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from unclip.rng import generators_from_seed
    from unclip.runtime.tensors import encode_generators
    from unclip.v1 import (
        decoder_pb2,
        decoder_pb2_grpc,
        encoder_pb2,
        encoder_pb2_grpc,
        hold_pb2,
        orchestrator_pb2,
        prior_pb2,
        prior_pb2_grpc,
        safety_pb2,
    )

    processes = {m.process for m in methods}
    png = _image("RGB", "PNG")
    rgba = hostile_images()[11]
    fast = orchestrator_pb2.SamplingParams(
        prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
    )
    seeds: dict[str, list[Message]] = {
        "/unclip.v1.ImageService/Generate": [
            orchestrator_pb2.GenerateRequest(prompt="a blue square", n=1, size=48, seed=2, params=fast),
            orchestrator_pb2.GenerateRequest(prompt="a red circle", n=2, size=32, seed=1, params=fast),
        ],
        "/unclip.v1.ImageService/CreateVariation": [
            orchestrator_pb2.VariationRequest(image=png, n=1, size=32, seed=1, params=fast)
        ],
        "/unclip.v1.ImageService/Edit": [
            orchestrator_pb2.EditRequest(image=rgba, prompt="a star", n=1, size=32, seed=1, params=fast)
        ],
        "/unclip.v1.Encoder/EncodeImage": [encoder_pb2.EncodeImageRequest(images=[png])],
        f"/{HEALTH}/Check": [health_pb2.HealthCheckRequest(service="")],
        f"/{HEALTH}/Watch": [health_pb2.HealthCheckRequest(service="")],
        f"/{REFLECTION}/ServerReflectionInfo": [reflection_pb2.ServerReflectionRequest(list_services="")],
    }
    seeds["/unclip.v1.ImageService/GenerateStream"] = seeds["/unclip.v1.ImageService/Generate"]
    seeds["/unclip.v1.ImageService/EditStream"] = seeds["/unclip.v1.ImageService/Edit"]
    # A short lease: fuzzing the pause of batch rows must not hold them long (fuzz traffic is interactive).
    seeds["/unclip.v1.BatchHold/Hold"] = [hold_pb2.HoldRequest(holder="fuzz", sequence=1, seconds=0.5)]
    context = safety_pb2.RequestContext(request_id="fuzz-seed", user="fuzz")
    seeds["/unclip.v1.Safety/CheckPrompt"] = [
        safety_pb2.CheckPromptRequest(prompt="a red circle", context=context)
    ]
    text_request = encoder_pb2.EncodeTextRequest(prompts=["a red circle"], do_classifier_free_guidance=True)
    seeds["/unclip.v1.Encoder/EncodeText"] = [text_request]
    if {"encoder", "prior", "decoder"} <= processes:
        text = encoder_pb2_grpc.EncoderStub(channel_for("encoder")).EncodeText(text_request, timeout=60)
        prior_request = prior_pb2.PriorRequest(
            text_embeds=text.text_embeds,
            text_encoder_hidden_states=text.text_encoder_hidden_states,
            text_mask=text.text_mask,
            generators=encode_generators(generators_from_seed(0, 1)),
            num_inference_steps=2,
            guidance_scale=4.0,
            do_classifier_free_guidance=True,
        )
        prior = prior_pb2_grpc.PriorStub(channel_for("prior")).Sample(prior_request, timeout=60)
        decode_request = decoder_pb2.DecodeRequest(
            image_embeds=prior.image_embeds,
            text_embeds=text.text_embeds,
            text_encoder_hidden_states=text.text_encoder_hidden_states,
            text_mask=text.text_mask,
            generators=prior.generators,
            num_inference_steps=2,
            guidance_scale=8.0,
            do_classifier_free_guidance=True,
        )
        decoded = decoder_pb2_grpc.DecoderStub(channel_for("decoder")).Decode(decode_request, timeout=60)
        seeds["/unclip.v1.Prior/Sample"] = seeds["/unclip.v1.Prior/SampleStream"] = [prior_request]
        seeds["/unclip.v1.Decoder/Decode"] = seeds["/unclip.v1.Decoder/DecodeStream"] = [decode_request]
        seeds["/unclip.v1.Safety/CheckImages"] = [
            safety_pb2.CheckImagesRequest(
                images=decoded.images, stage=safety_pb2.CHECK_STAGE_DECODER_OUTPUT, context=context
            )
        ]
        images, generators = decoded.images, decoded.generators
        for stage in ("super_res", "super_res_2"):
            if stage not in processes:
                break
            request = decoder_pb2.UpsampleRequest(images=images, generators=generators, num_inference_steps=2)
            out = decoder_pb2_grpc.UpsamplerStub(channel_for(stage)).Upsample(request, timeout=60)
            seeds[f"{stage}:/unclip.v1.Upsampler/Upsample"] = [request]
            seeds[f"{stage}:/unclip.v1.Upsampler/UpsampleStream"] = [request]
            images, generators = out.images, out.generators
    for method in methods:
        method.seeds = seeds.get(f"{method.process}:{method.path}") or seeds.get(method.path) or []
