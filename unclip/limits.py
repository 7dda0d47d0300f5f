"""The one table of request limits and sampling defaults (LIMITS, DEFAULTS).

The orchestrator, the stages, the CLI and the HTTP gateway all read a limit from here; nothing else writes a
limit's number. Import-free (no torch, no grpc) so every front door can use it. docs/interfaces.md prints it
(`python -m unclip.limits`).

A `Limit` is an inclusive range with the field it bounds (the public API's name) and why it has that value.
`check(name, value, field=...)` raises ValueError naming the field, which every servicer maps to
INVALID_ARGUMENT (CLI exit 2, HTTP 400 with `param`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    name: str  # key in LIMITS
    field: str  # the request field it bounds, as the public API names it
    low: int | float  # smallest allowed value (inclusive)
    high: int | float  # largest allowed value (inclusive)
    why: str  # one line: where the value comes from


LIMITS: dict[str, Limit] = {
    limit.name: limit
    for limit in [
        Limit("n", "n", 1, 10, "images per request, as the OpenAI Images API for dall-e-2"),
        Limit(
            "prompt_chars", "prompt", 1, 1000, "characters of a prompt, as the OpenAI Images API for dall-e-2"
        ),
        Limit("user_chars", "user", 0, 256, "characters of the end-user id, as the OpenAI API"),
        Limit("seed", "seed", 0, 2**63 - 1, "a torch.Generator seed (int64, non-negative)"),
        Limit(
            "steps",
            "num_inference_steps",
            2,
            1000,
            "denoising steps of one stage (UnCLIPScheduler divides by steps - 1; 1000 is the trained grid)",
        ),
        Limit(
            "prior_candidates",
            "prior_num_candidates",
            1,
            16,
            "prior samples reranked by CLIP similarity (1: no rerank)",
        ),
        Limit(
            "frames",
            "frames",
            2,
            32,
            "frames of an interpolation (4 stage calls of at most 10 rows)",
        ),
        # Hostile input: uploads, strings and tensors (unclip.runtime.images, unclip.runtime.tensors,
        # unclip.runtime.guard sizes each method's message limit from these).
        Limit(
            "upload_bytes",
            "image",
            1,
            4 * 1024 * 1024,
            "bytes of an uploaded image file (image, mask), as the OpenAI Images API (dall-e-2: under 4 MB)",
        ),
        Limit(
            "upload_side",
            "image",
            1,
            2048,
            "width and height of an upload, read from its header before decoding (decompression-bomb guard: "
            "2048^2 RGBA decodes to 16 MB); larger than the cascade's size is resized down",
        ),
        Limit(
            "image_side",
            "images",
            1,
            1024,
            "side of an image tensor between services: Karlo's cascade with a second upsampler ends at 1024",
        ),
        Limit(
            "inpaint_scale",
            "inpaint.image",
            1,
            16,
            "inpaint image side over the receiving stage's output size (64 px decoder, 1024 px cascade)",
        ),
        Limit(
            "context_chars",
            "context",
            0,
            256,
            "characters of context.request_id, context.user, context.identity (user: as the OpenAI API)",
        ),
        Limit("tensor_rank", "shape", 0, 8, "dimensions of a wire tensor (the stages use at most 4)"),
        Limit(
            "tensor_dim",
            "shape",
            0,
            8192,
            "each dimension of a wire tensor (the largest are image sides <= 1024 and CLIP widths <= 1280)",
        ),
    ]
}


@dataclass(frozen=True)
class Default:
    name: str  # key in DEFAULTS: the SamplingParams field it fills when a request leaves it unset
    value: int | float | str
    why: str  # one line: where the value comes from


# What an unset SamplingParams field means (the guidance scales are the deployment's own defaults; these are
# theirs when the deployment says nothing; a model folder's sampling_defaults.json may override any of them
# under `unclip up`).
DEFAULTS: dict[str, Default] = {
    default.name: default
    for default in [
        Default("prior_num_inference_steps", 25, "Karlo's prior steps"),
        Default("prior_guidance_scale", 4.0, "Karlo's prior guidance"),
        Default("decoder_num_inference_steps", 25, "Karlo's decoder steps"),
        Default("decoder_guidance_scale", 8.0, "Karlo's decoder guidance"),
        Default("super_res_num_inference_steps", 7, "Karlo's super-resolution steps, per upsampler stage"),
        Default("prior_num_candidates", 1, "no rerank"),
        Default("sampler", "unclip", "UnCLIPScheduler, Karlo's sampler (unclip.sampling lists the others)"),
        Default("ddim_eta", 0.0, "DDIM without noise: deterministic, invertible"),
    ]
}


def default(name: str) -> int | float | str:
    """DEFAULTS[name].value."""
    return DEFAULTS[name].value


def check(name: str, value: object, field: str | None = None) -> int | float:
    """`value` if it is a number (not a bool) within LIMITS[name]; else ValueError naming `field`."""
    limit = LIMITS[name]
    field = field or limit.field
    integral = isinstance(limit.low, int) and isinstance(limit.high, int)
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{field} must be {'an integer' if integral else 'a number'}, got {value!r}")
    if not limit.low <= value <= limit.high:
        raise ValueError(f"{field} must be in {limit.low}..{limit.high}, got {value!r}")
    return value


def check_chars(name: str, value: str, field: str | None = None) -> str:
    """`value` if its length in characters is within LIMITS[name]; else ValueError naming `field`.

    Callers check before any work is done with the text (logging it, auditing it, sending it on)."""
    limit = LIMITS[name]
    field = field or limit.field
    if not limit.low <= len(value) <= limit.high:
        raise ValueError(f"{field} must be {limit.low}..{limit.high} characters, got {len(value)}")
    return value


def table() -> str:
    """The tables as Markdown (docs/interfaces.md)."""
    rows = ["| limit | field | range | why |", "|---|---|---|---|"]
    for limit in LIMITS.values():
        rows.append(f"| `{limit.name}` | `{limit.field}` | {limit.low}..{limit.high} | {limit.why} |")
    rows += ["", "| default | value | why |", "|---|---|---|"]
    for entry in DEFAULTS.values():
        rows.append(f"| `{entry.name}` | `{entry.value!r}` | {entry.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
