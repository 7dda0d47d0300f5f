"""Encoder servicer: proto <-> tensors around EncoderEngine, errors mapped (unclip.runtime.errors)."""

from __future__ import annotations

import grpc

from unclip.rng import MAX_IMAGES
from unclip.runtime.errors import grpc_errors
from unclip.runtime.images import decode_image, require_square
from unclip.runtime.slots import EngineSlot
from unclip.runtime.tensors import to_proto
from unclip.runtime.validation import MAX_PROMPT_CHARS  # noqa: E402
from unclip.v1 import encoder_pb2, encoder_pb2_grpc

# Text requests carry n prompts (n <= MAX_IMAGES); an image request n images.
MAX_PROMPTS = MAX_IMAGES


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, metrics=None) -> None:
        self.slot = EngineSlot("encoder", metrics)  # __main__ sets slot.engine once loaded

    @grpc_errors
    def EncodeText(self, request: encoder_pb2.EncodeTextRequest, context: grpc.ServicerContext):
        engine = self.slot.get()
        prompts = list(request.prompts)
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(f"prompts must hold 1..{MAX_PROMPTS} prompts, got {len(prompts)}")
        for i, prompt in enumerate(prompts):
            # "" is allowed here: it is the unconditional prompt of variations.
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompts[{i}] is {len(prompt)} characters, over {MAX_PROMPT_CHARS}")
        with self.slot.call("EncodeText", len(prompts)):
            output = engine.encode_text(
                prompts, do_classifier_free_guidance=request.do_classifier_free_guidance
            )
        return encoder_pb2.EncodeTextResponse(
            text_embeds=to_proto(output.text_embeds),
            text_encoder_hidden_states=to_proto(output.text_encoder_hidden_states),
            text_mask=to_proto(output.text_mask),
            truncated=list(output.truncated),
            max_tokens=engine.max_tokens,
        )

    @grpc_errors
    def EncodeImage(self, request: encoder_pb2.EncodeImageRequest, context: grpc.ServicerContext):
        engine = self.slot.get()
        if not 1 <= len(request.images) <= MAX_PROMPTS:
            raise ValueError(f"images must hold 1..{MAX_PROMPTS} images, got {len(request.images)}")
        images = []
        for i, data in enumerate(request.images):
            image = decode_image(data, f"images[{i}]")
            require_square(image, f"images[{i}]")
            images.append(image.convert("RGB"))
        with self.slot.call("EncodeImage", len(images)):
            image_embeds = engine.encode_image(images)
        return encoder_pb2.EncodeImageResponse(image_embeds=to_proto(image_embeds))
