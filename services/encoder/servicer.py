"""Encoder servicer: proto <-> tensors around EncoderEngine, errors mapped (unclip.runtime.errors).

Text requests go through a request-level dynamic batcher (unclip.batching.dynamic): concurrent EncodeText
calls with the same guidance setting share one forward pass (prompts padded to the tokenizer's max length, so
shapes always match). A deterministic request (metadata x-unclip-deterministic, or --deterministic for the
whole deployment) runs alone: bit-exact with the engine. Image requests (variations) run one at a time.

A text request on an idle encoder starts at once; requests arriving while a batch runs form the next batch.
UNCLIP_IDLE_DISPATCH=false makes the oldest request wait UNCLIP_MAX_QUEUE_DELAY_MS for company instead
(Triton's dynamic batcher; the batching tests use it to hold the worker).
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from unclip.batching.batcher import BatcherConfig, QueueFull
from unclip.batching.dynamic import DynamicBatcher
from unclip.rng import MAX_IMAGES
from unclip.runtime.errors import grpc_errors, resource_exhausted
from unclip.runtime.images import decode_image, require_square
from unclip.runtime.slots import EngineSlot, wants_deterministic
from unclip.runtime.tensors import to_proto
from unclip.runtime.validation import MAX_PROMPT_CHARS  # noqa: E402
from unclip.v1 import encoder_pb2, encoder_pb2_grpc

# Text requests carry n prompts (n <= MAX_IMAGES); an image request n images.
MAX_PROMPTS = MAX_IMAGES


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, metrics=None, config: BatcherConfig | None = None) -> None:
        self.slot = EngineSlot("encoder", metrics, config)  # __main__ calls attach() once loaded
        self.batcher: DynamicBatcher | None = None

    def attach(self, engine: Any, threads: Any = None) -> None:
        """Makes the loaded engine available, with the text batcher in front of it. `threads`: the
        process's unclip.runtime.threads.ThreadPolicy, applied on every thread before it runs the engine."""
        on_busy = self.slot.metrics.busy if self.slot.metrics is not None else None
        self.batcher = DynamicBatcher("encoder", self._encode_batch, self.slot.config, on_busy=on_busy)
        self.slot.threads = threads
        self.slot.engine = engine

    def _encode_batch(self, batch: list[tuple[list[str], bool]]) -> list[Any]:
        """The batcher's worker: one forward pass over every prompt of the batch (one guidance setting, the
        batcher's key). A request alone takes exactly encode_text's path, the reference's."""
        engine = self.slot.engine
        with self.slot.lock:  # one thing on the engine at a time (image requests take the lock too)
            if self.slot.threads is not None:
                self.slot.threads.apply()
            if self.slot.metrics is not None:
                self.slot.metrics.forward_pass(sum(len(prompts) for prompts, _ in batch))
            if len(batch) == 1:
                return [engine.encode_text(*batch[0])]
            return engine.encode_text_batch([prompts for prompts, _ in batch], batch[0][1])

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
        guidance = request.do_classifier_free_guidance
        try:
            item = self.batcher.submit(
                (prompts, guidance),
                key=guidance,
                size=len(prompts),
                deterministic=wants_deterministic(context),
            )
        except QueueFull as error:
            raise resource_exhausted(str(error), error.retry_after_s) from error
        metrics = self.slot.metrics
        if metrics is not None:  # queue: until its batch starts; compute: until the batch is done
            with metrics.queued("EncodeText"):
                item.started.wait()
            with metrics.compute("EncodeText", len(prompts)):
                output = item.wait()
        else:
            output = item.wait()
        return encoder_pb2.EncodeTextResponse(
            text_embeds=to_proto(output.text_embeds),
            text_encoder_hidden_states=to_proto(output.text_encoder_hidden_states),
            text_mask=to_proto(output.text_mask),
            truncated=list(output.truncated),
            max_tokens=engine.max_tokens,
            compute_seconds=item.compute_seconds,
        )

    @grpc_errors
    def EncodeImage(self, request: encoder_pb2.EncodeImageRequest, context: grpc.ServicerContext):
        engine = self.slot.get()
        if not 1 <= len(request.images) <= MAX_PROMPTS:
            raise ValueError(f"images must hold 1..{MAX_PROMPTS} images, got {len(request.images)}")
        images = []
        decoded: dict[bytes, object] = {}  # a variation sends one upload n times: decode (and hold) it once
        for i, data in enumerate(request.images):
            if data not in decoded:
                image = decode_image(data, f"images[{i}]")
                require_square(image, f"images[{i}]")
                decoded[data] = image.convert("RGB")
            images.append(decoded[data])
        with self.slot.call("EncodeImage", len(images)):
            began = time.perf_counter()
            image_embeds = engine.encode_image(images)
            seconds = time.perf_counter() - began
        if self.slot.metrics is not None:
            self.slot.metrics.busy(seconds)
        return encoder_pb2.EncodeImageResponse(image_embeds=to_proto(image_embeds), compute_seconds=seconds)
