"""Prior servicer: proto <-> tensors around PriorEngine, errors mapped (unclip.runtime.errors)."""

from __future__ import annotations

import grpc

from unclip.batching.batcher import BatcherConfig
from unclip.runtime.errors import grpc_errors, grpc_stream_errors
from unclip.runtime.progress import stream_progress
from unclip.runtime.slots import EngineSlot
from unclip.runtime.tensors import decode_generators, decode_text_condition, encode_generators, to_proto
from unclip.runtime.validation import check_guidance, check_steps
from unclip.v1 import prior_pb2, prior_pb2_grpc

# Rerank draws at most this many embeddings per image.
MAX_CANDIDATES = 16


class PriorServicer(prior_pb2_grpc.PriorServicer):
    def __init__(self, metrics=None, config: BatcherConfig | None = None) -> None:
        self.slot = EngineSlot("prior", metrics, config)  # __main__ attaches the engine once loaded

    @grpc_errors
    def Sample(self, request: prior_pb2.PriorRequest, context: grpc.ServicerContext):
        return self._sample(request, context)

    @grpc_stream_errors
    def SampleStream(self, request: prior_pb2.PriorRequest, context: grpc.ServicerContext):
        self.slot.get()
        yield from stream_progress(
            lambda on_accepted, on_step: self._sample(request, context, on_accepted, on_step),
            lambda progress: prior_pb2.PriorEvent(progress=progress),
            lambda output: prior_pb2.PriorEvent(output=output),
            name="SampleStream",
        )

    def _sample(self, request, context, on_accepted=None, on_step=None) -> prior_pb2.PriorResponse:
        self.slot.get()
        cfg = request.do_classifier_free_guidance
        n, text_embeds, hidden, mask = decode_text_condition(request, None, cfg)
        check_steps(request.num_inference_steps, "num_inference_steps")
        check_guidance(request.guidance_scale, "guidance_scale")
        if not 0 <= request.num_candidates <= MAX_CANDIDATES:
            raise ValueError(f"num_candidates must be in 0..{MAX_CANDIDATES}, got {request.num_candidates}")
        generators = decode_generators(request.generators, n)
        output = self.slot.run(
            "Sample",
            n,
            lambda: self.slot.stage.start(
                text_embeds,
                hidden,
                mask,
                generators,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                do_classifier_free_guidance=cfg,
                num_candidates=max(1, request.num_candidates),
            ),
            context,
            on_step=on_step,
            on_accepted=on_accepted,
        )
        return prior_pb2.PriorResponse(
            image_embeds=to_proto(output.image_embeds), generators=encode_generators(output.generators)
        )
