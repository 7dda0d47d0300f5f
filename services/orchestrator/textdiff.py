"""TextDiff: the DALL-E 2 paper's text diff (arXiv 2204.06125, §3.3) — an image moved toward a new caption.

With the image's CLIP embedding z_i and the CLIP text embeddings of its current caption z_t0 and of the target
z_t, the text diff is z_d = normalize(z_t - z_t0); frame theta decodes slerp(z_i, z_d, theta) (z_d scaled to
z_i's length: unCLIP's embeddings are not unit vectors) for theta evenly from 0 to `max_theta` (the paper:
about 0.5). The decoder starts every frame from the image's DDIM inversion under z_i (Decoder.Invert) and
walks DDIM at eta 0, so what the caption change does not touch stays; the upsamplers draw from the request's
seed, the same for every frame. The encoder embeds, the decoder inverts and decodes, the orchestrator does the
arithmetic on the embeddings it holds.
"""

from __future__ import annotations

import math

import torch

from services.orchestrator.clients import Calls
from services.orchestrator.frames import FrameSequence, check_animation, evenly, inverting, slerp
from services.orchestrator.params import Params, Request
from services.orchestrator.pipeline import Pipeline
from unclip.limits import check
from unclip.runtime.images import decode_image, require_square
from unclip.runtime.validation import check_prompt
from unclip.v1 import orchestrator_pb2

DEFAULT_MAX_THETA = 0.5  # the paper's range of theta for text diffs


class TextDiff:
    """One TextDiff request: validated on construction, drawn by `run()`."""

    def __init__(self, pipeline: Pipeline, req: orchestrator_pb2.TextDiffRequest, calls: Calls):
        self.req = req
        self.image = decode_image(req.image, "image")
        require_square(self.image, "image")
        check_prompt(req.from_caption, "from_caption")
        check_prompt(req.to_caption, "to_caption")
        self.frames = int(check("frames", req.frames))
        self.max_theta = req.max_theta or DEFAULT_MAX_THETA
        if not math.isfinite(self.max_theta) or not 0 < self.max_theta <= 1:
            raise ValueError(
                f"max_theta must be in (0, 1] (0 means {DEFAULT_MAX_THETA}), got {req.max_theta}"
            )
        check_animation(req.animation, req.frame_duration_ms)
        png = orchestrator_pb2.OUTPUT_FORMAT_PNG
        base = pipeline._request(1, req.size, req.HasField("seed"), req.seed, png, req.user)
        request = Request(
            n=self.frames, size=base.size, seed=base.seed, output_format=base.output_format, user=base.user
        )
        params = Params.from_proto(
            req.params,
            len(pipeline.cascade) - 1,
            prior=False,
            decoder_guidance_scale=pipeline.decoder_guidance_scale,
            defaults=pipeline.step_defaults,
        )
        self.sequence = FrameSequence(pipeline, calls, request, inverting(params, req.params))

    def run(self) -> orchestrator_pb2.InterpolateResponse:
        sequence, req = self.sequence, self.req
        sequence.check_prompt(req.from_caption)
        sequence.check_prompt(req.to_caption)
        sequence.check_image(self.image)
        image_embed = sequence.image_embeddings([self.image])[0]  # [D]
        now, target = sequence.text_embeddings([req.from_caption, req.to_caption])  # [D] each
        diff = target - now
        if float(diff.norm()) == 0.0:
            raise ValueError(
                "to_caption must differ from from_caption in meaning (their embeddings are equal)"
            )
        diff = diff / diff.norm() * image_embed.norm()
        thetas = evenly(self.frames, self.max_theta)
        path = torch.stack([slerp(image_embed, diff, theta) for theta in thetas])  # [F, D]
        start = sequence.invert([self.image], image_embed[None])  # [1, 3, s, s]
        latents = start.expand(self.frames, -1, -1, -1).contiguous()
        return sequence.decode(path, thetas, latents, req.animation, req.frame_duration_ms)
