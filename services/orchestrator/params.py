"""A request's validated shape: the deployment's step defaults, the sampling parameters with every default
filled in and every range checked, and what every kind of request shares (size, seed, identity, ...)."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field

import torch

from unclip.limits import default
from unclip.rng import generator_to_bytes, generators_from_seed
from unclip.runtime.validation import check_candidates, check_guidance, check_steps
from unclip.sampling import DEFAULT_SAMPLER, check_eta, check_sampler
from unclip.v1 import orchestrator_pb2, tensor_pb2

# unclip.limits.DEFAULTS (Karlo's), used for every unset SamplingParams field (the guidance scales: the
# deployment's UNCLIP_PRIOR_GUIDANCE_SCALE, UNCLIP_DECODER_GUIDANCE_SCALE and
# UNCLIP_EDIT_DECODER_GUIDANCE_SCALE, since a model may sample best at other values).
PRIOR_STEPS, PRIOR_GUIDANCE = default("prior_num_inference_steps"), default("prior_guidance_scale")
DECODER_STEPS, DECODER_GUIDANCE = default("decoder_num_inference_steps"), default("decoder_guidance_scale")
SUPER_RES_STEPS = default("super_res_num_inference_steps")


@dataclass
class StepDefaults:
    """The deployment's steps and samplers for unset SamplingParams fields (unclip.limits.DEFAULTS unless
    the orchestrator's settings, e.g. a model folder's sampling_defaults.json under `unclip up`, say
    otherwise)."""

    prior_num_inference_steps: int = PRIOR_STEPS
    decoder_num_inference_steps: int = DECODER_STEPS
    super_res_num_inference_steps: int = SUPER_RES_STEPS  # every upsampler stage
    prior_sampler: str = DEFAULT_SAMPLER
    decoder_sampler: str = DEFAULT_SAMPLER
    super_res_sampler: str = DEFAULT_SAMPLER
    ddim_eta: float = default("ddim_eta")

    def for_edits(self) -> StepDefaults:
        """The defaults an edit's image stages use: they run the UnCLIP sampler, so a stage whose deployment
        default is another sampler takes the library's default steps for it."""
        return dataclasses.replace(
            self,
            decoder_num_inference_steps=self.decoder_num_inference_steps
            if self.decoder_sampler == DEFAULT_SAMPLER
            else DECODER_STEPS,
            super_res_num_inference_steps=self.super_res_num_inference_steps
            if self.super_res_sampler == DEFAULT_SAMPLER
            else SUPER_RES_STEPS,
            decoder_sampler=DEFAULT_SAMPLER,
            super_res_sampler=DEFAULT_SAMPLER,
        )

    def check(self) -> StepDefaults:
        """ValueError naming the setting's flag when a default is out of range."""
        for stage in ("prior", "decoder", "super_res"):
            check_steps(getattr(self, f"{stage}_num_inference_steps"), f"--{stage.replace('_', '-')}-steps")
        for name in ("prior_sampler", "decoder_sampler", "super_res_sampler"):
            check_sampler(getattr(self, name), f"--{name.replace('_', '-')}")
        check_eta(self.ddim_eta, "--ddim-eta")
        return self


@dataclass
class Params:
    """A request's sampling parameters with defaults filled in and every range checked."""

    prior_num_inference_steps: int
    prior_guidance_scale: float
    decoder_num_inference_steps: int
    decoder_guidance_scale: float
    super_res_num_inference_steps: list[int]  # one per upsampler stage of the cascade
    prior_num_candidates: int
    prior_sampler: str = DEFAULT_SAMPLER
    decoder_sampler: str = DEFAULT_SAMPLER
    super_res_sampler: str = DEFAULT_SAMPLER  # every upsampler stage
    ddim_eta: float = 0.0  # the stages that run ddim use it

    @classmethod
    def from_proto(
        cls,
        params: orchestrator_pb2.SamplingParams,
        upsamplers: int,
        prior: bool = True,
        prior_guidance_scale: float = PRIOR_GUIDANCE,
        decoder_guidance_scale: float = DECODER_GUIDANCE,
        defaults: StepDefaults | None = None,
        edit: bool = False,
    ) -> Params:
        """Fills defaults and checks ranges; `prior=False` (variations) ignores the prior's fields.
        prior_guidance_scale, decoder_guidance_scale: the defaults for the unset request fields; defaults:
        the deployment's steps and samplers. `edit`: the image stages run ``unclip`` (the only sampler that
        walks an edit's known region): another one asked for is refused, a deployment default is not used,
        and neither are the deployment's steps for a stage whose default sampler is another (steps chosen
        for DPM-Solver++ are too few for UnCLIP's sampler): that stage takes the library's default steps."""
        defaults = defaults or StepDefaults()
        if edit:
            defaults = defaults.for_edits()

        def get(name: str, default: float) -> float:
            return getattr(params, name) if params.HasField(name) else default

        image_sampler = DEFAULT_SAMPLER if edit else None
        resolved = cls(
            prior_num_inference_steps=int(
                get("prior_num_inference_steps", defaults.prior_num_inference_steps)
            ),
            prior_guidance_scale=float(get("prior_guidance_scale", prior_guidance_scale)),
            decoder_num_inference_steps=int(
                get("decoder_num_inference_steps", defaults.decoder_num_inference_steps)
            ),
            decoder_guidance_scale=float(get("decoder_guidance_scale", decoder_guidance_scale)),
            super_res_num_inference_steps=list(params.super_res_num_inference_steps),
            prior_num_candidates=int(get("prior_num_candidates", default("prior_num_candidates"))),
            prior_sampler=str(get("prior_sampler", defaults.prior_sampler)),
            decoder_sampler=str(get("decoder_sampler", image_sampler or defaults.decoder_sampler)),
            super_res_sampler=str(get("super_res_sampler", image_sampler or defaults.super_res_sampler)),
            ddim_eta=float(get("ddim_eta", defaults.ddim_eta)),
        )
        if prior:
            check_steps(resolved.prior_num_inference_steps, "params.prior_num_inference_steps")
            check_guidance(resolved.prior_guidance_scale, "params.prior_guidance_scale")
            check_candidates(resolved.prior_num_candidates, "params.prior_num_candidates")
            resolved.prior_sampler = check_sampler(resolved.prior_sampler, "params.prior_sampler")
        check_steps(resolved.decoder_num_inference_steps, "params.decoder_num_inference_steps")
        check_guidance(resolved.decoder_guidance_scale, "params.decoder_guidance_scale")
        for name in ("decoder_sampler", "super_res_sampler"):
            value = check_sampler(getattr(resolved, name), f"params.{name}")
            if edit and value != DEFAULT_SAMPLER:
                raise ValueError(f"params.{name} must be {DEFAULT_SAMPLER!r} for edits, got {value!r}")
            setattr(resolved, name, value)
        resolved.ddim_eta = check_eta(resolved.ddim_eta, "params.ddim_eta")
        steps = resolved.super_res_num_inference_steps
        if not steps:
            steps = [defaults.super_res_num_inference_steps]
        if len(steps) == 1:
            steps = steps * upsamplers
        if len(steps) != upsamplers:
            raise ValueError(
                f"params.super_res_num_inference_steps must hold one value or one per upsampler stage "
                f"({upsamplers}), got {len(resolved.super_res_num_inference_steps)}"
            )
        for value in steps:
            check_steps(value, "params.super_res_num_inference_steps")
        resolved.super_res_num_inference_steps = steps
        return resolved


@dataclass
class Request:
    """What every kind of request shares once validated."""

    n: int
    size: int
    seed: int
    output_format: int
    user: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    previews: bool = False  # GenerateStream asked for intermediate images (GenerateRequest.previews)
    operation: str = "generate"  # "generate", "variation" or "edit" (the images' provenance records)
    prompt: str = ""
    identity: str = ""  # the authenticated caller (Calls.identity), recorded by the safety audit
    tenant: str = ""


@dataclass
class EditInputs:
    """An Edit request once validated: its shared fields, parameters, and the original and its mask at the
    requested size."""

    r: Request
    params: Params
    cfg: bool
    original: torch.Tensor  # [1, 3, S, S] in [-1, 1]
    known: torch.Tensor  # [1, 1, S, S], 1 = keep
    checked: bool = False  # the prompt and image passed the content policy


def generator_states(seed: int, n: int) -> list[tensor_pb2.GeneratorState]:
    """Image i's generator, manual_seed(seed + i), as the state that travels through the stages."""
    return [tensor_pb2.GeneratorState(state=generator_to_bytes(g)) for g in generators_from_seed(seed, n)]
