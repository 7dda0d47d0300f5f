"""Interpolate: the DALL-E 2 paper's interpolation between two images or prompts (arXiv 2204.06125, §3.2).

The decoder is conditioned on a CLIP image embedding, so a path between two embeddings is a path between two
pictures. Each end becomes an embedding in the stage that owns it — an image through the encoder
(EncodeImage), a prompt through the encoder and the prior with the request's seed — and the orchestrator,
which holds them, decodes z_theta = slerp(z_start, z_end, theta) for evenly spaced theta in [0, 1].

Noise FIXED: every frame's decoder and upsamplers draw from the same generator (the request's seed), so
frames differ only by their embedding. The decoder's text conditioning is the empty caption, as
CreateVariation's. Frames are rows of the stage calls, split into calls of at most MAX_IMAGES rows that run
at the same time (the stages batch them step by step).
"""

from __future__ import annotations

import contextvars
import io

import grpc
import PIL.Image
import torch

from services.orchestrator.clients import Calls
from services.orchestrator.pipeline import Params, Pipeline, Request, _generator_states
from unclip.limits import check
from unclip.rng import MAX_IMAGES
from unclip.runtime.errors import StatusError
from unclip.runtime.images import decode_image, pil_to_tensor, png_bytes, require_square
from unclip.runtime.tensors import from_proto, to_proto
from unclip.runtime.validation import check_prompt
from unclip.v1 import encoder_pb2, orchestrator_pb2, safety_pb2

DEFAULT_FRAME_MS = 150  # per frame of the animation when the request leaves it 0
MAX_FRAME_MS = 10_000


def slerp(start: torch.Tensor, end: torch.Tensor, theta: float) -> torch.Tensor:
    """Spherical interpolation of two embeddings [D]: the direction moves along the great circle between
    theirs, the length linearly between their lengths (CLIP image embeddings of unCLIP priors are not unit
    vectors). theta = 0 gives `start`, 1 gives `end`, exactly."""
    if theta <= 0.0:
        return start.clone()
    if theta >= 1.0:
        return end.clone()
    start_norm, end_norm = start.norm(), end.norm()
    a, b = start / start_norm, end / end_norm
    omega = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    if omega.item() < 1e-6:  # (nearly) the same direction: the circle degenerates to a line
        direction = (1 - theta) * a + theta * b
    else:
        direction = (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / torch.sin(omega)
    direction = direction / direction.norm()
    return direction * ((1 - theta) * start_norm + theta * end_norm)


def thetas_for(frames: int) -> list[float]:
    """`frames` evenly spaced values from 0 to 1, both included."""
    return [k / (frames - 1) for k in range(frames)]


class Interpolation:
    """One Interpolate request over a Pipeline's stages (validation first, then the work)."""

    def __init__(self, pipeline: Pipeline, req: orchestrator_pb2.InterpolateRequest, calls: Calls):
        self.pipeline = pipeline
        self.calls = calls
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
        if req.noise == orchestrator_pb2.INTERPOLATION_NOISE_INVERTED:
            if len(images) != 2:
                raise ValueError(
                    "noise INTERPOLATION_NOISE_INVERTED needs two image ends (a prompt has no latent)"
                )
            raise StatusError(
                grpc.StatusCode.UNIMPLEMENTED,
                "noise INTERPOLATION_NOISE_INVERTED needs the decoder's DDIM inversion, which this "
                "deployment does not have; use INTERPOLATION_NOISE_FIXED",
            )
        if req.animation not in orchestrator_pb2.AnimationFormat.values():
            raise ValueError(f"animation must be one of {list(orchestrator_pb2.AnimationFormat.keys())}")
        if not 0 <= req.frame_duration_ms <= MAX_FRAME_MS:
            raise ValueError(f"frame_duration_ms must be in 0..{MAX_FRAME_MS}, got {req.frame_duration_ms}")
        png = orchestrator_pb2.OUTPUT_FORMAT_PNG
        base = pipeline._request(1, req.size, req.HasField("seed"), req.seed, png, req.user)
        self.request = Request(
            n=self.frames, size=base.size, seed=base.seed, output_format=base.output_format, user=base.user
        )
        has_prompt = any(isinstance(end, str) for end in self.ends)
        self.params = Params.from_proto(
            req.params,
            len(pipeline.cascade) - 1,
            prior=has_prompt,
            prior_guidance_scale=pipeline.prior_guidance_scale,
            decoder_guidance_scale=pipeline.decoder_guidance_scale,
        )

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

    # ---- the work ---------------------------------------------------------------------------------------

    def run(self) -> orchestrator_pb2.InterpolateResponse:
        r, params = self.request, self.params
        self._check_inputs()
        embeds = [self._embedding(end) for end in self.ends]  # each [D]
        thetas = thetas_for(self.frames)
        path = torch.stack([slerp(embeds[0], embeds[1], theta) for theta in thetas])  # [F, D]

        cfg = params.decoder_guidance_scale > 1.0  # the decoder's guidance only, as CreateVariation
        chunks = [list(range(k, min(k + MAX_IMAGES, self.frames))) for k in range(0, self.frames, MAX_IMAGES)]
        futures = [
            self.pipeline._helpers.submit(contextvars.copy_context().run, self._decode, rows, path, cfg)
            for rows in chunks
        ]
        frames = orchestrator_pb2.ImagesResponse(seed=r.seed, request_id=r.request_id, size=r.size)
        categories: set[str] = set()
        for rows, future in zip(chunks, futures, strict=True):
            part = future.result()
            for image in part.images:
                image.index = rows[image.index]
                image.seed = r.seed  # every frame draws from the request's seed
                frames.images.append(image)
            frames.withheld += part.withheld
            categories.update(part.withheld_categories)
        frames.withheld_categories.extend(sorted(categories))
        response = orchestrator_pb2.InterpolateResponse(
            frames=frames, thetas=[thetas[image.index] for image in frames.images]
        )
        if self.req.animation != orchestrator_pb2.ANIMATION_FORMAT_NONE and frames.images:
            response.animation = animate(
                [image.png for image in frames.images],
                self.req.animation,
                self.req.frame_duration_ms or DEFAULT_FRAME_MS,
            )
            response.animation_format = self.req.animation
        return response

    def _check_inputs(self) -> None:
        """Both prompts and both images pass the content policy before any model runs."""
        for end in self.ends:
            if isinstance(end, str):
                self.pipeline._check_prompt(end, self.request, self.calls)
            else:
                largest = self.pipeline.sizes[-1]
                checked = end.convert("RGB")
                if checked.width > largest:
                    checked = checked.resize((largest, largest), PIL.Image.Resampling.BICUBIC)
                self.pipeline._check_images(
                    pil_to_tensor(checked)[None], safety_pb2.CHECK_STAGE_INPUT_IMAGE, self.request, self.calls
                )

    def _embedding(self, end: str | PIL.Image.Image) -> torch.Tensor:
        """The end's CLIP image embedding [D]: the encoder's for an image, the prior's for a prompt."""
        if isinstance(end, PIL.Image.Image):
            encoded = self.calls(
                self.pipeline.stages.encoder.EncodeImage,
                encoder_pb2.EncodeImageRequest(images=[png_bytes(end)]),
                "encoder",
            )
            return from_proto(encoded.image_embeds, "image_embeds", dtype=torch.float32)[0]
        params = self.params
        cfg = params.prior_guidance_scale > 1.0 or params.decoder_guidance_scale > 1.0
        generators = _generator_states(self.request.seed, 1)
        _, prior = self.pipeline._encode_and_sample_prior(end, 1, params, cfg, generators, self.calls)
        return from_proto(prior.image_embeds, "image_embeds", dtype=torch.float32)[0]

    def _decode(self, rows: list[int], path: torch.Tensor, cfg: bool) -> orchestrator_pb2.ImagesResponse:
        """Decoder, safety, upsamplers, safety for the frames `rows`, each with the request's generator."""
        r = self.request
        part = Request(
            n=len(rows), size=r.size, seed=r.seed, output_format=r.output_format, user=r.user,
            request_id=r.request_id,
        )  # fmt: skip
        text = self.calls(
            self.pipeline.stages.encoder.EncodeText,
            encoder_pb2.EncodeTextRequest(prompts=[""] * len(rows), do_classifier_free_guidance=cfg),
            "encoder",
        )
        generators = _generator_states(r.seed, 1) * len(rows)
        return self.pipeline._decode_and_upsample(
            part, self.params, cfg, to_proto(path[rows]), text, generators, self.calls
        )


def animate(pngs: list[bytes], animation: int, frame_ms: int) -> bytes:
    """The frames as one looping animated GIF or (lossless) WebP."""
    images = [PIL.Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    out = io.BytesIO()
    if animation == orchestrator_pb2.ANIMATION_FORMAT_GIF:
        images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    else:
        images[0].save(
            out, "WEBP", save_all=True, append_images=images[1:], duration=frame_ms, loop=0, lossless=True
        )
    return out.getvalue()
