"""Interpolate: the DALL-E 2 paper's interpolation between two images or prompts (arXiv 2204.06125, §3.2).

The decoder is conditioned on a CLIP image embedding, so a path between two embeddings is a path between two
pictures. Each end becomes an embedding in the stage that owns it — an image through the encoder
(EncodeImage), a prompt through the encoder and the prior with the request's seed — and the orchestrator,
which holds them, decodes z_theta = slerp(z_start, z_end, theta) for evenly spaced theta in [0, 1]
(services.orchestrator.frames).

Noise FIXED: every frame starts from the same noise (the request's seed): a family of trajectories, one per
seed. INVERTED (two image ends): the decoder inverts each image under its own embedding (DDIM, Decoder.Invert)
and frame theta starts from slerp(x_T_start, x_T_end, theta) and walks DDIM at eta 0, so the ends reconstruct
the two images (approximately: DDIM inversion is not exact).
"""

from __future__ import annotations

import PIL.Image
import torch

from services.orchestrator.clients import Calls
from services.orchestrator.frames import FrameSequence, check_animation, evenly, inverting, slerp
from services.orchestrator.params import Params, Request
from services.orchestrator.pipeline import Pipeline
from unclip.limits import check
from unclip.runtime.images import decode_image, require_square
from unclip.runtime.validation import check_prompt
from unclip.v1 import orchestrator_pb2


class Interpolation:
    """One Interpolate request: validated on construction, drawn by `run()`."""

    def __init__(self, pipeline: Pipeline, req: orchestrator_pb2.InterpolateRequest, calls: Calls):
        self.req = req
        self.ends = [self._end(req.start, "start"), self._end(req.end, "end")]
        images = [end for end in self.ends if isinstance(end, PIL.Image.Image)]
        if len(images) == 2 and images[0].size != images[1].size:
            raise ValueError(
                f"end.image must be the size of start.image ({images[0].width}x{images[0].height}), got "
                f"{images[1].width}x{images[1].height}"
            )
        self.frames = int(check("frames", req.frames))
        if req.noise not in orchestrator_pb2.InterpolationNoise.values():
            raise ValueError(f"noise must be one of {list(orchestrator_pb2.InterpolationNoise.keys())}")
        self.inverted = req.noise == orchestrator_pb2.INTERPOLATION_NOISE_INVERTED
        if self.inverted and len(images) != 2:
            raise ValueError(
                "noise INTERPOLATION_NOISE_INVERTED needs two image ends (a prompt has no latent)"
            )
        check_animation(req.animation, req.frame_duration_ms)
        png = orchestrator_pb2.OUTPUT_FORMAT_PNG
        base = pipeline._request(1, req.size, req.HasField("seed"), req.seed, png, req.user)
        request = Request(
            n=self.frames, size=base.size, seed=base.seed, output_format=base.output_format, user=base.user
        )
        self.has_prompt = any(isinstance(end, str) for end in self.ends)  # the prior runs
        params = Params.from_proto(
            req.params,
            len(pipeline.cascade) - 1,
            prior=self.has_prompt,
            prior_guidance_scale=pipeline.prior_guidance_scale,
            decoder_guidance_scale=pipeline.decoder_guidance_scale,
            defaults=pipeline.step_defaults,
        )
        if self.inverted:
            params = inverting(params, req.params)
        self.sequence = FrameSequence(pipeline, calls, request, params)

    @staticmethod
    def _end(end: orchestrator_pb2.InterpolationEnd, name: str) -> str | PIL.Image.Image:
        kind = end.WhichOneof("kind")
        if kind is None:
            raise ValueError(f"{name} is required: an image or a prompt")
        if kind == "prompt":
            check_prompt(end.prompt, f"{name}.prompt")
            return end.prompt
        image = decode_image(end.image, f"{name}.image")
        require_square(image, f"{name}.image")
        return image

    @property
    def request_id(self) -> str:
        return self.sequence.request.request_id

    def run(self) -> orchestrator_pb2.InterpolateResponse:
        sequence = self.sequence
        for end in self.ends:  # both prompts and both images pass the content policy before any model runs
            if isinstance(end, str):
                sequence.check_prompt(end)
            else:
                sequence.check_image(end)
        embeds = [
            sequence.prior_embedding(end) if isinstance(end, str) else sequence.image_embeddings([end])[0]
            for end in self.ends
        ]  # each [D]
        thetas = evenly(self.frames)
        path = torch.stack([slerp(embeds[0], embeds[1], theta) for theta in thetas])  # [F, D]
        latents = None
        if self.inverted:
            ends = sequence.invert(self.ends, torch.stack(embeds))  # [2, 3, s, s]
            latents = torch.stack([slerp(ends[0], ends[1], theta) for theta in thetas])
        return sequence.decode(path, thetas, latents, self.req.animation, self.req.frame_duration_ms)
