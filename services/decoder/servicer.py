"""Decoder and Upsampler servicers: proto <-> tensors around DecoderEngine / UpsamplerEngine.

One service code serves every image stage; `--stage` picks which (decoder, super_res, super_res_2).
"""

from __future__ import annotations

import grpc
import torch

from services.decoder.invert import invert
from services.stage_methods import unary_and_stream
from unclip.batching.batcher import BatcherConfig
from unclip.limits import LIMITS, default
from unclip.rng import MAX_IMAGES
from unclip.runtime.errors import grpc_errors
from unclip.runtime.slots import EngineSlot, last_compute_seconds
from unclip.runtime.tensors import (
    decode_generators,
    decode_text_condition,
    encode_generators,
    from_field,
    to_proto,
)
from unclip.runtime.validation import check_guidance, check_steps
from unclip.sampling import check_eta, check_sampler
from unclip.v1 import decoder_pb2, decoder_pb2_grpc

# What each stage reports as its default step count (unclip.limits.DEFAULTS: Karlo's).
DEFAULT_STEPS = {
    "decoder": default("decoder_num_inference_steps"),
    "super_res": default("super_res_num_inference_steps"),
    "super_res_2": default("super_res_num_inference_steps"),
}


def decode_inpaint(request, n: int, output_size: int):
    """The optional InpaintInput: image float32 [n, 3, S, S] in [-1, 1], mask float32 [n, 1, S, S] in {0,
    1}; S at most unclip.limits "inpaint_scale" times the stage's `output_size` (the orchestrator sends the
    edit's requested size, at most the cascade's last size)."""
    if not request.HasField("inpaint"):
        return None
    from services.decoder.engine import InpaintInput

    inpaint = request.inpaint
    largest = int(LIMITS["inpaint_scale"].high) * output_size
    # The size limit is checked on the declared shape first, so a refused image is never copied out of
    # the message (decoding copies it and scans it for NaN: two more buffers the size of the request).
    declared = list(inpaint.image.shape) if inpaint.HasField("image") else []
    if len(declared) == 4 and max(declared[-2:]) > largest:
        height, width = declared[-2:]
        raise ValueError(
            f"inpaint.image is {height}x{width}, over {largest}x{largest} "
            f"({LIMITS['inpaint_scale'].high} x this stage's output size {output_size})"
        )
    image = from_field(
        inpaint, "image", prefix="inpaint.", dtype=torch.float32, shape=[n, 3, None, None], finite=True
    )
    size = image.shape[-1]
    if image.shape[-2] != size or size < 1:
        raise ValueError(f"inpaint.image must be square, got {list(image.shape)}")
    mask = from_field(
        inpaint, "mask", prefix="inpaint.", dtype=torch.float32, shape=[n, 1, size, size], finite=True
    )
    if bool(((mask < 0) | (mask > 1)).any()):
        raise ValueError("inpaint.mask must hold values in [0, 1] (1 = keep, 0 = regenerate)")
    return InpaintInput(image=image, mask=mask)


def stage_info(stage: str, engine, model_id: str) -> decoder_pb2.StageInfo:
    return decoder_pb2.StageInfo(
        stage=stage,
        input_size=getattr(engine, "input_size", 0),
        output_size=engine.output_size,
        default_num_inference_steps=DEFAULT_STEPS[stage],
        model_id=model_id,
    )


class _Stage:
    name = "decoder"

    def __init__(self, stage: str, model_id: str, metrics=None, config: BatcherConfig | None = None) -> None:
        self.stage = stage
        self.model_id = model_id
        self.slot = EngineSlot(stage, metrics, config)  # __main__ attaches the engine once loaded

    @grpc_errors
    def GetStageInfo(self, request: decoder_pb2.StageInfoRequest, context: grpc.ServicerContext):
        return stage_info(self.stage, self.slot.get(), self.model_id)


class DecoderServicer(_Stage, decoder_pb2_grpc.DecoderServicer):
    def _decode(self, request, context, on_accepted=None, on_step=None) -> decoder_pb2.ImagesOutput:
        engine = self.slot.get()
        cfg = request.do_classifier_free_guidance
        image_embeds = from_field(
            request, "image_embeds", dtype=torch.float32, shape=[None, None], finite=True
        )
        n = image_embeds.shape[0]
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"image_embeds must have n rows, n in 1..{MAX_IMAGES}, got {n}")
        _, text_embeds, hidden, mask = decode_text_condition(request, n, cfg)
        check_steps(request.num_inference_steps, "num_inference_steps")
        check_guidance(request.guidance_scale, "guidance_scale")
        sampler, eta = check_sampler(request.sampler, "sampler"), check_eta(request.eta, "eta")
        generators = decode_generators(request.generators, n)
        inpaint = decode_inpaint(request, n, engine.output_size)
        latents = None
        if request.HasField("latents"):
            if inpaint is not None:
                raise ValueError("latents cannot be given with inpaint (an edit starts from noise)")
            size = engine.output_size
            latents = from_field(
                request, "latents", dtype=torch.float32, shape=[n, 3, size, size], finite=True
            )
        output = self.slot.run(
            "Decode",
            n,
            lambda: self.slot.stage.start(
                image_embeds,
                text_embeds,
                hidden,
                mask,
                generators,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                do_classifier_free_guidance=cfg,
                inpaint=inpaint,
                sampler=sampler,
                eta=eta,
                latents=latents,
            ),
            context,
            on_step=on_step,
            on_accepted=on_accepted,
        )
        return decoder_pb2.ImagesOutput(
            images=to_proto(output.images),
            generators=encode_generators(output.generators),
            compute_seconds=last_compute_seconds(),
        )

    # the unary call and its streaming twin (progress events, then the same output)
    Decode, DecodeStream = unary_and_stream(_decode, decoder_pb2.ImagesEvent, "Decode")

    @grpc_errors
    def Invert(self, request: decoder_pb2.InvertRequest, context: grpc.ServicerContext):
        """DDIM inversion (services.decoder.invert), on the request's thread: it is not a denoising task the
        step batcher could share, and it is asked for rarely (text diffs, inverted interpolations)."""
        engine = self.slot.get()
        cfg = request.do_classifier_free_guidance
        size = engine.output_size
        images = from_field(request, "images", dtype=torch.float32, shape=[None, 3, size, size], finite=True)
        n = images.shape[0]
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"images must have n rows, n in 1..{MAX_IMAGES}, got {n}")
        image_embeds = from_field(request, "image_embeds", dtype=torch.float32, shape=[n, None], finite=True)
        _, text_embeds, hidden, mask = decode_text_condition(request, n, cfg)
        check_steps(request.num_inference_steps, "num_inference_steps")
        check_guidance(request.guidance_scale, "guidance_scale")
        latents = invert(
            engine,
            images,
            request.num_inference_steps,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            text_encoder_hidden_states=hidden,
            text_mask=mask,
            guidance_scale=request.guidance_scale,
            do_classifier_free_guidance=cfg,
        )
        return decoder_pb2.InvertOutput(latents=to_proto(latents))


class UpsamplerServicer(_Stage, decoder_pb2_grpc.UpsamplerServicer):
    def _upsample(self, request, context, on_accepted=None, on_step=None) -> decoder_pb2.ImagesOutput:
        engine = self.slot.get()
        size = engine.input_size
        images = from_field(request, "images", dtype=torch.float32, shape=[None, 3, size, size], finite=True)
        n = images.shape[0]
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"images must hold n images, n in 1..{MAX_IMAGES}, got {n}")
        check_steps(request.num_inference_steps, "num_inference_steps")
        sampler, eta = check_sampler(request.sampler, "sampler"), check_eta(request.eta, "eta")
        generators = decode_generators(request.generators, n)
        inpaint = decode_inpaint(request, n, engine.output_size)
        output = self.slot.run(
            "Upsample",
            n,
            lambda: self.slot.stage.start(
                images,
                generators,
                num_inference_steps=request.num_inference_steps,
                inpaint=inpaint,
                sampler=sampler,
                eta=eta,
            ),
            context,
            on_step=on_step,
            on_accepted=on_accepted,
        )
        return decoder_pb2.ImagesOutput(
            images=to_proto(output.images),
            generators=encode_generators(output.generators),
            compute_seconds=last_compute_seconds(),
        )

    # the unary call and its streaming twin (progress events, then the same output)
    Upsample, UpsampleStream = unary_and_stream(_upsample, decoder_pb2.ImagesEvent, "Upsample")
