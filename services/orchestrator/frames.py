"""Sequences of frames decoded from CLIP image embeddings: what Interpolate and TextDiff share.

The DALL-E 2 paper's manipulations (arXiv 2204.06125, §3) move through the decoder's conditioning space: the
orchestrator holds the embeddings (the encoder and the prior made them) and the path between them; every frame
is a row of the decoder and upsampler calls, with the empty caption as the decoder's text (as CreateVariation)
and the request's generator for every row, so frames differ only by their embedding (and, with inverted noise,
their starting latents). Rows are split into calls of at most MAX_IMAGES that run at the same time (the stages
batch them step by step).
"""

from __future__ import annotations

import contextvars
import io
import threading

import PIL.Image
import torch

from services.orchestrator.clients import Calls
from services.orchestrator.params import Params, Request, generator_states
from services.orchestrator.pipeline import Pipeline
from unclip.rng import MAX_IMAGES
from unclip.runtime.images import pil_to_tensor, png_bytes, resize_image
from unclip.runtime.tensors import from_proto, to_proto
from unclip.v1 import decoder_pb2, encoder_pb2, orchestrator_pb2, safety_pb2

DEFAULT_FRAME_MS = 150  # per frame of the animation when the request leaves it 0
MAX_FRAME_MS = 10_000
INVERTING_SAMPLER = "ddim"  # the decoder's sampler whose walk can be inverted (eta 0)


def slerp(start: torch.Tensor, end: torch.Tensor, theta: float) -> torch.Tensor:
    """Spherical interpolation of two tensors of one shape (embeddings [D], latents [3, s, s]), as flat
    vectors: the direction moves along the great circle between theirs, the length linearly between their
    lengths (unCLIP's image embeddings are not unit vectors). theta = 0 gives `start`, 1 gives `end`."""
    if theta <= 0.0:
        return start.clone()
    if theta >= 1.0:
        return end.clone()
    a, b = start.flatten(), end.flatten()
    a_norm, b_norm = a.norm(), b.norm()
    a, b = a / a_norm, b / b_norm
    omega = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    if omega.item() < 1e-6:  # (nearly) the same direction: the circle degenerates to a line
        direction = (1 - theta) * a + theta * b
    else:
        direction = (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / torch.sin(omega)
    direction = direction / direction.norm()
    return (direction * ((1 - theta) * a_norm + theta * b_norm)).reshape(start.shape)


def evenly(frames: int, last: float = 1.0) -> list[float]:
    """`frames` evenly spaced values from 0 to `last`, both included."""
    return [last * k / (frames - 1) for k in range(frames)]


def animate(pngs: list[bytes], animation: int, frame_ms: int) -> bytes:
    """The frames as one looping animated GIF or (lossless) WebP."""
    images = [PIL.Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    out = io.BytesIO()
    kind = "GIF" if animation == orchestrator_pb2.ANIMATION_FORMAT_GIF else "WEBP"
    extra = {} if kind == "GIF" else {"lossless": True}
    images[0].save(out, kind, save_all=True, append_images=images[1:], duration=frame_ms, loop=0, **extra)
    return out.getvalue()


def check_animation(animation: int, frame_duration_ms: int) -> None:
    if animation not in orchestrator_pb2.AnimationFormat.values():
        raise ValueError(f"animation must be one of {list(orchestrator_pb2.AnimationFormat.keys())}")
    if not 0 <= frame_duration_ms <= MAX_FRAME_MS:
        raise ValueError(f"frame_duration_ms must be in 0..{MAX_FRAME_MS}, got {frame_duration_ms}")


# Decoder guidance of frames that start from inverted latents, unless the request sets one: the inversion and
# the walk back retrace each other only without guidance (on the bundled model, decoder guidance 5 turned a
# red circle's inversion into a blotch; at 1 it comes back within a few levels per pixel, tests/e2e).
INVERTED_DECODER_GUIDANCE = 1.0


def inverting(params: Params, requested: orchestrator_pb2.SamplingParams) -> Params:
    """The decoder runs DDIM at eta 0 when it starts from inverted latents (the only walk that retraces
    them), without guidance unless the request asks for it (INVERTED_DECODER_GUIDANCE); a request that asked
    for another decoder sampler or for noise is refused, not silently changed."""
    if requested.HasField("decoder_sampler") and requested.decoder_sampler not in ("", INVERTING_SAMPLER):
        raise ValueError(
            f"params.decoder_sampler must be {INVERTING_SAMPLER!r} (or unset) when the decoder starts from "
            f"inverted latents, got {requested.decoder_sampler!r}"
        )
    if requested.HasField("ddim_eta") and requested.ddim_eta != 0:
        raise ValueError(
            "params.ddim_eta must be 0 when the decoder starts from inverted latents, got "
            f"{requested.ddim_eta}"
        )
    params.decoder_sampler, params.ddim_eta = INVERTING_SAMPLER, 0.0
    if not requested.HasField("decoder_guidance_scale"):
        params.decoder_guidance_scale = INVERTED_DECODER_GUIDANCE
    return params


class FrameSequence:
    """One request's frames over a Pipeline's stages: input checks, embeddings, inversion, decoding."""

    def __init__(self, pipeline: Pipeline, calls: Calls, request: Request, params: Params):
        self.pipeline = pipeline
        self.calls = calls
        self.request = request  # n = frames; seed: every frame's generator
        self.params = params
        self.cfg = params.decoder_guidance_scale > 1.0  # the decoder's guidance only, as CreateVariation
        self._caption: tuple[torch.Tensor, ...] | None = None  # the empty caption, encoded once (one row)
        self._caption_lock = threading.Lock()  # chunks of frames decode concurrently

    # ---- the content policy on the inputs ---------------------------------------------------------------

    def check_prompt(self, prompt: str) -> None:
        self.pipeline.checks.check_prompt(prompt, self.request, self.calls)

    def check_image(self, image: PIL.Image.Image) -> None:
        """An uploaded image passes the input check (at most at the cascade's largest size)."""
        checked = resize_image(image.convert("RGB"), min(image.width, self.pipeline.sizes[-1]))
        self.pipeline.checks.check_images(
            pil_to_tensor(checked)[None], safety_pb2.CHECK_STAGE_INPUT_IMAGE, self.request, self.calls
        )

    # ---- embeddings and latents ---------------------------------------------------------------------------

    def image_embeddings(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """The encoder's CLIP image embeddings [k, D]."""
        encoded = self.calls(
            self.pipeline.stages.encoder.EncodeImage,
            encoder_pb2.EncodeImageRequest(images=[png_bytes(image) for image in images]),
            "encoder",
        )
        return from_proto(encoded.image_embeds, "image_embeds", dtype=torch.float32)

    def prior_embedding(self, prompt: str) -> torch.Tensor:
        """The prior's image embedding [D] for a prompt, drawn with the request's seed."""
        params = self.params
        cfg = params.prior_guidance_scale > 1.0 or params.decoder_guidance_scale > 1.0
        generators = generator_states(self.request.seed, 1)
        _, prior = self.pipeline._encode_and_sample_prior(prompt, 1, params, cfg, generators, self.calls)
        return from_proto(prior.image_embeds, "image_embeds", dtype=torch.float32)[0]

    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """The CLIP text embeddings [k, D] of captions (the space the image embeddings share)."""
        text = self.calls(
            self.pipeline.stages.encoder.EncodeText,
            encoder_pb2.EncodeTextRequest(prompts=captions, do_classifier_free_guidance=False),
            "encoder",
        )
        return from_proto(text.text_embeds, "text_embeds", dtype=torch.float32)

    def _empty_caption(self, rows: int) -> encoder_pb2.EncodeTextResponse:
        """The decoder's text for `rows` frames: the empty caption, encoded once per request and repeated
        (every row is the same). With guidance the encoder answers [unconditional rows; conditional rows]."""
        with self._caption_lock:
            if self._caption is None:
                text = self.calls(
                    self.pipeline.stages.encoder.EncodeText,
                    encoder_pb2.EncodeTextRequest(prompts=[""], do_classifier_free_guidance=self.cfg),
                    "encoder",
                )
                self._caption = (
                    from_proto(text.text_embeds, "text_embeds"),  # [g, D], g = 2 with guidance else 1
                    from_proto(text.text_encoder_hidden_states, "text_encoder_hidden_states"),  # [g, L, H]
                    from_proto(text.text_mask, "text_mask"),  # [g, L]
                )
        embeds, hidden, mask = (t.repeat_interleave(rows, dim=0) for t in self._caption)  # [g * rows, ...]
        return encoder_pb2.EncodeTextResponse(
            text_embeds=to_proto(embeds),
            text_encoder_hidden_states=to_proto(hidden),
            text_mask=to_proto(mask),
        )

    def invert(self, images: list[PIL.Image.Image], embeds: torch.Tensor) -> torch.Tensor:
        """The decoder's DDIM inversion of each image under its own embedding [k, D]: latents [k, 3, s, s]."""
        size = self.pipeline.sizes[0]  # the decoder's
        pixels = torch.stack([pil_to_tensor(resize_image(image.convert("RGB"), size)) for image in images])
        text = self._empty_caption(len(images))
        inverted = self.calls(
            self.pipeline.stages.decoder.Invert,
            decoder_pb2.InvertRequest(
                images=to_proto(pixels),
                image_embeds=to_proto(embeds),
                text_embeds=text.text_embeds,
                text_encoder_hidden_states=text.text_encoder_hidden_states,
                text_mask=text.text_mask,
                num_inference_steps=self.params.decoder_num_inference_steps,
                guidance_scale=self.params.decoder_guidance_scale,
                do_classifier_free_guidance=self.cfg,
            ),
            "decoder",
        )
        return from_proto(inverted.latents, "latents", dtype=torch.float32)

    # ---- decoding ------------------------------------------------------------------------------------------

    def decode(
        self,
        path: torch.Tensor,
        thetas: list[float],
        latents: torch.Tensor | None = None,
        animation: int = orchestrator_pb2.ANIMATION_FORMAT_NONE,
        frame_ms: int = 0,
    ) -> orchestrator_pb2.InterpolateResponse:
        """Frames k = 0.. from embeddings `path` [F, D] (and starting latents [F, 3, s, s], else the seed's
        noise), in order, each through the output checks."""
        r, frames = self.request, len(thetas)
        chunks = [list(range(k, min(k + MAX_IMAGES, frames))) for k in range(0, frames, MAX_IMAGES)]
        futures = [
            self.pipeline._helpers.submit(contextvars.copy_context().run, self._decode, rows, path, latents)
            for rows in chunks
        ]
        result = orchestrator_pb2.ImagesResponse(seed=r.seed, request_id=r.request_id, size=r.size)
        categories: set[str] = set()
        for rows, future in zip(chunks, futures, strict=True):
            part = future.result()
            for image in part.images:
                image.index = rows[image.index]
                image.seed = r.seed  # every frame draws from the request's seed
                result.images.append(image)
            result.withheld += part.withheld
            categories.update(part.withheld_categories)
        result.withheld_categories.extend(sorted(categories))
        response = orchestrator_pb2.InterpolateResponse(
            frames=result, thetas=[thetas[image.index] for image in result.images]
        )
        if animation != orchestrator_pb2.ANIMATION_FORMAT_NONE and result.images:
            response.animation = animate(
                [image.png for image in result.images], animation, frame_ms or DEFAULT_FRAME_MS
            )
            response.animation_format = animation
        return response

    def _decode(
        self, rows: list[int], path: torch.Tensor, latents: torch.Tensor | None
    ) -> orchestrator_pb2.ImagesResponse:
        """Decoder, safety, upsamplers, safety for the frames `rows`, each with the request's generator."""
        r = self.request
        part = Request(
            n=len(rows), size=r.size, seed=r.seed, output_format=r.output_format, user=r.user,
            request_id=r.request_id,
        )  # fmt: skip
        generators = generator_states(r.seed, 1) * len(rows)
        start = to_proto(latents[rows]) if latents is not None else None
        return self.pipeline._decode_and_upsample(
            part,
            self.params,
            self.cfg,
            to_proto(path[rows]),
            self._empty_caption(len(rows)),
            generators,
            self.calls,
            latents=start,
        )
