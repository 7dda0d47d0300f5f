"""The chain, top to bottom: safety -> encoder -> prior -> decoder -> safety -> upsampler(s) -> safety ->
PNGs.

Each arrow is one gRPC call (services.orchestrator.clients). The orchestrator holds no model: tensors pass
through as the stages return them, together with every image's generator state, so a request's images equal
diffusers' UnCLIPPipeline run in one process with `generator=[torch.Generator().manual_seed(seed + i) for i in
range(n)]`.
"""

from __future__ import annotations

import contextvars
import secrets
from concurrent.futures import ThreadPoolExecutor

import torch

from services.orchestrator.clients import OWN_EVENTS, Calls, StageInfo, Stages
from services.orchestrator.moderation import ContentChecks, select_rows
from services.orchestrator.outputs import ImageStore
from services.orchestrator.params import (
    DECODER_GUIDANCE,
    PRIOR_GUIDANCE,
    EditInputs,
    Params,
    Request,
    StepDefaults,
    generator_states,
)
from unclip.limits import LIMITS, check_chars, default
from unclip.provenance.stamp import Provenance, stage_parameters
from unclip.rng import MAX_IMAGES
from unclip.runtime.images import (
    decode_image,
    downscale,
    encode_png,
    known_mask,
    pil_to_tensor,
    require_square,
    resize_image,
    resize_mask,
    to_pixels,
)
from unclip.runtime.tensors import from_proto, to_proto
from unclip.runtime.validation import (
    MAX_PROMPT_CHARS,
    check_n,
    check_prompt,
    check_seed,
)
from unclip.sampling import DEFAULT_SAMPLER, sampler_names
from unclip.v1 import (
    decoder_pb2,
    encoder_pb2,
    orchestrator_pb2,
    prior_pb2,
    safety_pb2,
    tensor_pb2,
)
from unclip.vocabulary import unknown_words
from unclip.vocabulary import warning as vocabulary_warning


class Pipeline:
    """Runs Generate, CreateVariation and Edit over the stages."""

    def __init__(
        self,
        stages: Stages,
        cascade: list[StageInfo],
        stage_timeout_seconds: float,
        image_store: ImageStore | None = None,
        prior_guidance_scale: float = PRIOR_GUIDANCE,
        decoder_guidance_scale: float = DECODER_GUIDANCE,
        edit_decoder_guidance_scale: float = DECODER_GUIDANCE,
        step_defaults: StepDefaults | None = None,
        model_name: str = "",
        vocabulary: frozenset[str] | None = None,
        provenance: Provenance | None = None,
    ):
        self.stages = stages
        self.checks = ContentChecks(stages.safety)  # the content policy's checkpoints
        self.step_defaults = step_defaults or StepDefaults()  # steps and samplers for unset fields
        self.cascade = cascade  # decoder first, then each upsampler
        self.sizes = [stage.output_size for stage in cascade]  # ascending
        self.stage_timeout_seconds = stage_timeout_seconds
        self.image_store = image_store  # where OUTPUT_FORMAT_URL images go; None: such requests are refused
        self.prior_guidance_scale = prior_guidance_scale  # for requests that leave it unset
        self.decoder_guidance_scale = decoder_guidance_scale  # generations and variations leaving it unset
        self.edit_decoder_guidance_scale = edit_decoder_guidance_scale  # for edits that leave it unset
        self.model_name = model_name  # reported by GetCapabilities
        self.vocabulary = vocabulary  # the model's words (unclip.vocabulary); None: prompts are not checked
        self.provenance = provenance  # watermark, metadata and C2PA on the final images; None: none
        # Stage calls that run beside the request's own thread (the encoder during the prompt check).
        self._helpers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="stage-call")

    # ---- validation shared by the three calls --------------------------------------------------------------

    def _request(
        self, n: int, size: int, has_seed: bool, seed: int, output_format: int, user: str
    ) -> Request:
        n = n or 1
        check_n(n)
        size = size or self.sizes[-1]
        if not 1 <= size <= self.sizes[-1]:
            sizes = ", ".join(str(s) for s in self.sizes)
            raise ValueError(
                f"size must be in 1..{self.sizes[-1]}, got {size}: this cascade makes {sizes} "
                f"(and any size in between, downscaled from the next larger)"
            )
        if has_seed:
            check_seed(seed)
        else:
            seed = secrets.randbelow(2**63)  # drawn and returned, so the result can be reproduced
        if output_format not in orchestrator_pb2.OutputFormat.values():
            raise ValueError(f"output_format must be one of {list(orchestrator_pb2.OutputFormat.keys())}")
        if output_format == orchestrator_pb2.OUTPUT_FORMAT_URL and self.image_store is None:
            raise ValueError(
                "output_format OUTPUT_FORMAT_URL is not available: this orchestrator has no image bucket "
                "(UNCLIP_IMAGES_URL is not set); ask for OUTPUT_FORMAT_PNG"
            )
        return Request(n=n, size=size, seed=seed, output_format=output_format, user=user)

    def _upsamplers_for(self, size: int) -> int:
        """How many upsampler stages make `size`: the smallest stage output at least as large."""
        return next(i for i, stage_size in enumerate(self.sizes) if stage_size >= size)

    def capabilities(self) -> orchestrator_pb2.Capabilities:
        steps = self.step_defaults
        defaults = orchestrator_pb2.SamplingParams(
            prior_num_inference_steps=steps.prior_num_inference_steps,
            prior_guidance_scale=self.prior_guidance_scale,
            decoder_num_inference_steps=steps.decoder_num_inference_steps,
            decoder_guidance_scale=self.decoder_guidance_scale,
            super_res_num_inference_steps=[steps.super_res_num_inference_steps] * (len(self.cascade) - 1),
            prior_num_candidates=default("prior_num_candidates"),
            prior_sampler=steps.prior_sampler,
            decoder_sampler=steps.decoder_sampler,
            super_res_sampler=steps.super_res_sampler,
            ddim_eta=steps.ddim_eta,
        )
        edit_defaults = orchestrator_pb2.SamplingParams()
        edit_defaults.CopyFrom(defaults)
        edit_defaults.decoder_guidance_scale = self.edit_decoder_guidance_scale
        edit_steps = steps.for_edits()
        edit_defaults.decoder_sampler = edit_defaults.super_res_sampler = DEFAULT_SAMPLER
        edit_defaults.decoder_num_inference_steps = edit_steps.decoder_num_inference_steps
        del edit_defaults.super_res_num_inference_steps[:]
        edit_defaults.super_res_num_inference_steps.extend(
            [edit_steps.super_res_num_inference_steps] * (len(self.cascade) - 1)
        )
        return orchestrator_pb2.Capabilities(
            sizes=self.sizes,
            defaults=defaults,
            edit_defaults=edit_defaults,
            max_n=MAX_IMAGES,
            max_prompt_chars=MAX_PROMPT_CHARS,
            samplers=sampler_names(),
            model_name=self.model_name,
            limits=[
                orchestrator_pb2.RequestLimit(
                    name=limit.name,
                    field=limit.field,
                    low=str(limit.low),
                    high=str(limit.high),
                    why=limit.why,
                )
                for limit in LIMITS.values()
            ],
            vocabulary_words=len(self.vocabulary or ()),
        )

    def prompt_warnings(self, prompt: str) -> list[str]:
        """The response's warnings for a prompt: the words the model does not know (none without a
        vocabulary)."""
        unknown = unknown_words(prompt, self.vocabulary) if self.vocabulary else []
        return [vocabulary_warning(unknown)] if unknown else []

    # ---- the three public calls ----------------------------------------------------------------------------

    def validate_generate(self, req: orchestrator_pb2.GenerateRequest) -> tuple[Request, Params, bool]:
        """Every check of a Generate request, before any work (GenerateStream runs it before "accepted")."""
        check_chars("user_chars", req.user, "user")
        check_prompt(req.prompt)
        r = self._request(req.n, req.size, req.HasField("seed"), req.seed, req.output_format, req.user)
        r.prompt = req.prompt
        params = Params.from_proto(
            req.params,
            len(self.cascade) - 1,
            prior_guidance_scale=self.prior_guidance_scale,
            decoder_guidance_scale=self.decoder_guidance_scale,
            defaults=self.step_defaults,
        )
        # Guidance is on or off for all stages at once, as UnCLIPPipeline decides it.
        cfg = params.prior_guidance_scale > 1.0 or params.decoder_guidance_scale > 1.0
        return r, params, cfg

    def generate(
        self,
        req: orchestrator_pb2.GenerateRequest,
        calls: Calls,
        validated: tuple[Request, Params, bool] | None = None,
    ) -> orchestrator_pb2.ImagesResponse:
        # 1. Validate everything before any work (unless the caller just did).
        r, params, cfg = validated or self.validate_generate(req)
        r.previews = req.previews and calls.on_event is not None
        r.identity, r.tenant = calls.identity, calls.tenant
        generators = generator_states(r.seed, r.n)

        # 2-3. The prompt passes the content policy while the encoder encodes it (the prompt n times, and ""
        #      n times first with guidance): the check's round trip hides behind the encoder's. Nothing uses
        #      the encoding before the check passes; a refused prompt's is dropped.
        text = self._check_prompt_while_encoding(req.prompt, r, cfg, calls)

        # 4. The prior: text embedding -> CLIP image embedding, drawing from each image's generator.
        prior = self._sample_prior(text, params, cfg, generators, calls)

        # 5-8. Decoder, safety, upsamplers, safety, PNGs.
        response = self._decode_and_upsample(
            r, params, cfg, prior.image_embeds, text, prior.generators, calls
        )
        response.prompt_truncated = any(text.truncated)
        response.warnings.extend(self.prompt_warnings(req.prompt))
        return response

    def create_variation(
        self, req: orchestrator_pb2.VariationRequest, calls: Calls
    ) -> orchestrator_pb2.ImagesResponse:
        # 1. Validate: a square image, and the shared fields. No prior runs: its parameters are ignored.
        check_chars("user_chars", req.user, "user")
        image = decode_image(req.image, "image")
        require_square(image, "image")
        r = self._request(req.n, req.size, req.HasField("seed"), req.seed, req.output_format, req.user)
        r.operation = "variation"
        r.identity, r.tenant = calls.identity, calls.tenant
        params = Params.from_proto(
            req.params,
            len(self.cascade) - 1,
            prior=False,
            decoder_guidance_scale=self.decoder_guidance_scale,
            defaults=self.step_defaults,
        )
        cfg = params.decoder_guidance_scale > 1.0  # as UnCLIPImageVariationPipeline
        generators = generator_states(r.seed, r.n)

        # 2. The uploaded image passes the content policy (checked at most at the cascade's largest size).
        checked = resize_image(image.convert("RGB"), min(image.width, self.sizes[-1]))
        self.checks.check_images(pil_to_tensor(checked)[None], safety_pb2.CHECK_STAGE_INPUT_IMAGE, r, calls)

        # 3. Encoder: the image's CLIP embedding and the empty prompt, each n times in one batch, as the
        # reference called with image=[image] * n computes them (a batch of one, repeated, rounds
        # differently).
        encoded = calls(
            self.stages.encoder.EncodeImage,
            # the upload as sent (checked above; the encoder decodes it through the same layer)
            encoder_pb2.EncodeImageRequest(images=[req.image] * r.n),
            "encoder",
        )
        image_embeds = encoded.image_embeds  # [n, D]
        text = calls(
            self.stages.encoder.EncodeText,
            encoder_pb2.EncodeTextRequest(prompts=[""] * r.n, do_classifier_free_guidance=cfg),
            "encoder",
        )

        # 4-7. Decoder, safety, upsamplers, safety, PNGs.
        return self._decode_and_upsample(r, params, cfg, image_embeds, text, generators, calls)

    def validate_edit(self, req: orchestrator_pb2.EditRequest) -> EditInputs:
        """Every check of an Edit request that needs no stage (EditStream runs it before admission)."""
        # Prompt, a square image, a mask of its size (or its own alpha), the shared fields.
        check_chars("user_chars", req.user, "user")
        check_prompt(req.prompt)
        image = decode_image(req.image, "image")
        require_square(image, "image")
        mask = decode_image(req.mask, "mask") if req.mask else None
        known = known_mask(image, mask)  # [1, S, S], 1 = keep
        r = self._request(req.n, req.size, req.HasField("seed"), req.seed, req.output_format, req.user)
        r.operation, r.prompt = "edit", req.prompt
        params = Params.from_proto(
            req.params,
            len(self.cascade) - 1,
            prior_guidance_scale=self.prior_guidance_scale,
            decoder_guidance_scale=self.edit_decoder_guidance_scale,
            defaults=self.step_defaults,
            edit=True,
        )
        cfg = params.prior_guidance_scale > 1.0 or params.decoder_guidance_scale > 1.0
        # The original at the requested size; every stage resizes it (and the mask) to its own resolution.
        original = pil_to_tensor(resize_image(image.convert("RGB"), r.size))[None]  # [1, 3, S, S]
        return EditInputs(r, params, cfg, original, resize_mask(known, r.size)[None])  # mask [1, 1, S, S]

    def check_edit(self, edit: EditInputs, calls: Calls) -> None:
        """The prompt and the uploaded image pass the content policy (EditStream: before "accepted")."""
        edit.r.identity, edit.r.tenant = calls.identity, calls.tenant
        self.checks.check_prompt(edit.r.prompt, edit.r, calls)
        self.checks.check_images(edit.original, safety_pb2.CHECK_STAGE_INPUT_IMAGE, edit.r, calls)
        edit.checked = True

    def edit(
        self, req: orchestrator_pb2.EditRequest, calls: Calls, validated: EditInputs | None = None
    ) -> orchestrator_pb2.ImagesResponse:
        # 1-3. Validate, then the prompt and uploaded image pass the content policy (unless the caller did).
        edit = validated or self.validate_edit(req)
        if not edit.checked:
            self.check_edit(edit, calls)
        r, params, cfg, original, known = edit.r, edit.params, edit.cfg, edit.original, edit.known
        r.previews = calls.on_event is not None  # EditStream: a preview after each stage but the last
        generators = generator_states(r.seed, r.n)
        inpaint = decoder_pb2.InpaintInput(
            image=to_proto(original.expand(r.n, -1, -1, -1)), mask=to_proto(known.expand(r.n, -1, -1, -1))
        )

        # 4. Encoder and prior, as for Generate.
        text, prior = self._encode_and_sample_prior(req.prompt, r.n, params, cfg, generators, calls)

        # 5. Decoder and upsamplers sample the masked region only; the known region is the original's.
        response = self._decode_and_upsample(
            r,
            params,
            cfg,
            prior.image_embeds,
            text,
            prior.generators,
            calls,
            inpaint=inpaint,
            keep=(original, known),
        )
        response.prompt_truncated = any(text.truncated)
        response.warnings.extend(self.prompt_warnings(req.prompt))
        return response

    # ---- the model stages, shared by the three calls -------------------------------------------------------

    def _encode_and_sample_prior(
        self,
        prompt: str,
        n: int,
        params: Params,
        cfg: bool,
        generators: list[tensor_pb2.GeneratorState],
        calls: Calls,
    ) -> tuple[encoder_pb2.EncodeTextResponse, prior_pb2.PriorResponse]:
        text = self._encode(prompt, n, cfg, calls)
        return text, self._sample_prior(text, params, cfg, generators, calls)

    def _encode(
        self, prompt: str, n: int, cfg: bool, calls: Calls, on_event=OWN_EVENTS
    ) -> encoder_pb2.EncodeTextResponse:
        return calls(
            self.stages.encoder.EncodeText,
            encoder_pb2.EncodeTextRequest(prompts=[prompt] * n, do_classifier_free_guidance=cfg),
            "encoder",
            on_event=on_event,
        )

    def _check_prompt_while_encoding(
        self, prompt: str, r: Request, cfg: bool, calls: Calls
    ) -> encoder_pb2.EncodeTextResponse:
        """CheckPrompt on this thread, EncodeText on a helper at the same time; the encoding is returned only
        once the check passed. The encoder's progress events are held back and sent after the check's, so a
        stream still reads safety, then encoder."""
        held: list[orchestrator_pb2.GenerateEvent] = []
        on_event = held.append if calls.on_event is not None else None
        # copy_context: the encoder call's trace span stays a child of this request's.
        encoding = self._helpers.submit(
            contextvars.copy_context().run, self._encode, prompt, r.n, cfg, calls, on_event
        )
        try:
            self.checks.check_prompt(prompt, r, calls)
        except BaseException:
            # Refused (or the check failed): the encoding is dropped; the call is cancelled with the request.
            encoding.add_done_callback(lambda future: future.exception())  # nobody waits for its error
            raise
        text = encoding.result()
        for event in held:
            calls.on_event(event)
        return text

    def _sample_prior(
        self,
        text: encoder_pb2.EncodeTextResponse,
        params: Params,
        cfg: bool,
        generators: list[tensor_pb2.GeneratorState],
        calls: Calls,
    ) -> prior_pb2.PriorResponse:
        return calls(
            self.stages.prior.Sample,
            prior_pb2.PriorRequest(
                text_embeds=text.text_embeds,
                text_encoder_hidden_states=text.text_encoder_hidden_states,
                text_mask=text.text_mask,
                generators=generators,
                num_inference_steps=params.prior_num_inference_steps,
                guidance_scale=params.prior_guidance_scale,
                do_classifier_free_guidance=cfg,
                num_candidates=params.prior_num_candidates,
                sampler=params.prior_sampler,
                eta=params.ddim_eta,
            ),
            "prior",
        )

    def _decode_and_upsample(
        self,
        r: Request,
        params: Params,
        cfg: bool,
        image_embeds: tensor_pb2.Tensor,
        text: encoder_pb2.EncodeTextResponse,
        generators: list[tensor_pb2.GeneratorState],
        calls: Calls,
        inpaint: decoder_pb2.InpaintInput | None = None,
        keep: tuple[torch.Tensor, torch.Tensor] | None = None,
        latents: tensor_pb2.Tensor | None = None,
    ) -> orchestrator_pb2.ImagesResponse:
        # Decoder: image embedding (+ text) -> small images [n, 3, s, s] (from `latents` instead of noise when
        # given: a DDIM-inverted start).
        decoded = calls(
            self.stages.decoder.Decode,
            decoder_pb2.DecodeRequest(
                image_embeds=image_embeds,
                text_embeds=text.text_embeds,
                text_encoder_hidden_states=text.text_encoder_hidden_states,
                text_mask=text.text_mask,
                generators=generators,
                num_inference_steps=params.decoder_num_inference_steps,
                guidance_scale=params.decoder_guidance_scale,
                do_classifier_free_guidance=cfg,
                inpaint=inpaint,
                sampler=params.decoder_sampler,
                eta=params.ddim_eta,
                latents=latents,
            ),
            "decoder",
        )
        images, generators = decoded.images, list(decoded.generators)

        # Safety on the small images, before upsampler compute is spent; withheld images go no further.
        indices = list(range(r.n))
        upsamplers = self._upsamplers_for(r.size)
        withheld: list[str] = []
        if upsamplers:
            images, generators, indices, withheld = self.checks.filter_images(
                images, generators, indices, safety_pb2.CHECK_STAGE_DECODER_OUTPUT, r, calls
            )
            if inpaint is not None and len(indices) < r.n:
                inpaint = decoder_pb2.InpaintInput(
                    image=select_rows(inpaint.image, indices), mask=select_rows(inpaint.mask, indices)
                )
            self._preview(r, images, indices, "decoder", calls)

        # Upsamplers, in cascade order, each drawing from the generators the previous stage handed on.
        for stage in range(upsamplers):
            upsampled = calls(
                self.stages.upsamplers[stage].Upsample,
                decoder_pb2.UpsampleRequest(
                    images=images,
                    generators=generators,
                    num_inference_steps=params.super_res_num_inference_steps[stage],
                    inpaint=inpaint,
                    sampler=params.super_res_sampler,
                    eta=params.ddim_eta,
                ),
                self.cascade[stage + 1].stage,
            )
            images, generators = upsampled.images, list(upsampled.generators)
            if stage < upsamplers - 1:  # the last stage's output is the result, after the final check
                self._preview(r, images, indices, self.cascade[stage + 1].stage, calls)

        # A size between two stage sizes is a high-quality downscale of the next larger.
        final = downscale(from_proto(images, "images", dtype=torch.float32), r.size).clamp(-1, 1)
        if keep is not None and final.shape[-1] != self.sizes[upsamplers]:
            # Resampling blurred the known region: restore it from the original at this size.
            original, known = keep
            final = known * original + (1 - known) * final
        if self.provenance is not None:  # the watermark goes in before the final check: it judges what leaves
            final = self.provenance.embed(final, [r.seed + index for index in indices])
        final_proto = to_proto(final)

        # Safety on the final images, while a helper encodes the PNGs (and float32 pixels when asked) with
        # their metadata and C2PA manifest: nothing leaves before the verdict, and a withheld image's PNG is
        # dropped.
        pixels = to_pixels(final)  # [m, S, S, 3] in [0, 1]
        stamp = self._stamper(r, params, upsamplers)
        encoding = self._helpers.submit(
            lambda: [stamp(encode_png(pixels[row]), indices[row]) for row in range(len(indices))]
        )
        _, _, final_indices, more_withheld = self.checks.filter_images(
            final_proto, [], indices, safety_pb2.CHECK_STAGE_FINAL_OUTPUT, r, calls
        )
        withheld += more_withheld
        pngs = encoding.result()
        response = orchestrator_pb2.ImagesResponse(
            seed=r.seed, request_id=r.request_id, size=r.size, withheld=r.n - len(final_indices)
        )
        response.withheld_categories.extend(sorted(set(withheld)))
        for row, index in enumerate(indices):
            if index not in final_indices:
                continue
            image = orchestrator_pb2.Image(png=pngs[row], seed=r.seed + index, index=index)
            if r.output_format == orchestrator_pb2.OUTPUT_FORMAT_FLOAT32:
                image.pixels.CopyFrom(to_proto(pixels[row]))
            response.images.append(image)
        if r.output_format == orchestrator_pb2.OUTPUT_FORMAT_URL and response.images:
            # Into the bucket; the caller gets presigned GET URLs instead of the bytes.
            urls = self.image_store.store([image.png for image in response.images], r.request_id)
            for image, url in zip(response.images, urls, strict=True):
                image.url = url
                image.png = b""
        return response

    def _preview(
        self, r: Request, images: tensor_pb2.Tensor, indices: list[int], stage: str, calls: Calls
    ) -> None:
        """GenerateStream with previews: the first image left, as this stage made it (already checked)."""
        if not r.previews or not indices:
            return
        first = from_proto(images, "images", dtype=torch.float32)[:1].clamp(-1, 1)
        preview = orchestrator_pb2.Preview(
            stage=stage, size=first.shape[-1], png=encode_png(to_pixels(first)[0]), index=indices[0]
        )
        calls.on_event(orchestrator_pb2.GenerateEvent(preview=preview))

    def _stamper(self, r: Request, params: Params, upsamplers: int):
        """png, index -> the PNG with its provenance (as is without a Provenance)."""
        if self.provenance is None:
            return lambda png, index: png
        stages = stage_parameters(params, [stage.stage for stage in self.cascade[1 : upsamplers + 1]])
        if r.operation == "variation":
            del stages["prior"]  # no prior runs
        prompt = r.prompt if r.operation != "variation" else None
        return self.provenance.stamper(r.request_id, r.seed, r.size, r.operation, stages, prompt)
