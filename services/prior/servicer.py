"""Prior servicer: proto <-> tensors around PriorEngine, errors mapped (unclip.runtime.errors)."""

from __future__ import annotations

import grpc

from unclip.runtime.errors import grpc_errors, step_callback_for
from unclip.runtime.slots import EngineSlot
from unclip.runtime.tensors import decode_generators, decode_text_condition, encode_generators, to_proto
from unclip.runtime.validation import check_guidance, check_steps
from unclip.v1 import prior_pb2, prior_pb2_grpc

# Rerank draws at most this many embeddings per image.
MAX_CANDIDATES = 16


class PriorServicer(prior_pb2_grpc.PriorServicer):
    def __init__(self, metrics=None) -> None:
        self.slot = EngineSlot("prior", metrics)  # __main__ sets slot.engine once loaded

    @grpc_errors
    def Sample(self, request: prior_pb2.PriorRequest, context: grpc.ServicerContext):
        engine = self.slot.get()
        cfg = request.do_classifier_free_guidance
        n, text_embeds, hidden, mask = decode_text_condition(request, None, cfg)
        check_steps(request.num_inference_steps, "num_inference_steps")
        check_guidance(request.guidance_scale, "guidance_scale")
        if not 0 <= request.num_candidates <= MAX_CANDIDATES:
            raise ValueError(f"num_candidates must be in 0..{MAX_CANDIDATES}, got {request.num_candidates}")
        generators = decode_generators(request.generators, n)
        with self.slot.call("Sample", n):
            output = engine.sample(
                text_embeds,
                hidden,
                mask,
                generators,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                do_classifier_free_guidance=cfg,
                num_candidates=max(1, request.num_candidates),
                step_callback=step_callback_for(context),
            )
        return prior_pb2.PriorResponse(
            image_embeds=to_proto(output.image_embeds), generators=encode_generators(output.generators)
        )
