"""Prior servicer: proto <-> tensors around PriorEngine, errors mapped (unclip.runtime.errors)."""

from __future__ import annotations

from services.stage_methods import unary_and_stream
from unclip.batching.batcher import BatcherConfig
from unclip.runtime.slots import EngineSlot, last_compute_seconds
from unclip.runtime.tensors import decode_generators, decode_text_condition, encode_generators, to_proto
from unclip.runtime.validation import check_candidates, check_guidance, check_steps
from unclip.sampling import check_eta, check_sampler
from unclip.v1 import prior_pb2, prior_pb2_grpc


class PriorServicer(prior_pb2_grpc.PriorServicer):
    def __init__(self, metrics=None, config: BatcherConfig | None = None) -> None:
        self.slot = EngineSlot("prior", metrics, config)  # __main__ attaches the engine once loaded

    def _sample(self, request, context, on_accepted=None, on_step=None) -> prior_pb2.PriorResponse:
        self.slot.get()
        cfg = request.do_classifier_free_guidance
        n, text_embeds, hidden, mask = decode_text_condition(request, None, cfg)
        check_steps(request.num_inference_steps, "num_inference_steps")
        check_guidance(request.guidance_scale, "guidance_scale")
        check_candidates(request.num_candidates, "num_candidates", unset_means_one=True)
        sampler = check_sampler(request.sampler, "sampler")
        eta = check_eta(request.eta, "eta")
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
                sampler=sampler,
                eta=eta,
            ),
            context,
            on_step=on_step,
            on_accepted=on_accepted,
        )
        return prior_pb2.PriorResponse(
            image_embeds=to_proto(output.image_embeds),
            generators=encode_generators(output.generators),
            compute_seconds=last_compute_seconds(),
        )

    # the unary call and its streaming twin (progress events, then the same response)
    Sample, SampleStream = unary_and_stream(_sample, prior_pb2.PriorEvent, "Sample")
