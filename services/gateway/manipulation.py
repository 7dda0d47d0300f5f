"""The paper's manipulations over HTTP (unclip extensions): /v1/images/interpolations and
/v1/images/text-diffs, without HTTP or gRPC transport.

As `core` does for the OpenAI endpoints, plain functions the routes (services.gateway.manipulations) call:
- `ManipulationFields.parse`: a JSON object or multipart form fields -> checked fields, every type error an
  `ApiError` naming its `param`;
- `to_interpolate` / `to_text_diff`: checked fields (+ the uploaded image files) -> the orchestrator's
  requests; `http_error`: a failed call -> the OpenAI error, its `param` named as the HTTP field;
- `frames_body`: an InterpolateResponse -> `{created, seed, size, data: [{b64_json | url, index, theta,
  seed}], animation: {format, b64_json | url}, unclip_usage, warnings}`.

The fields are flat and the same in both encodings: an end is `start_prompt` or `start_image` (`end_*`
likewise); an image is a base64 string (a `data:` URL too) in JSON and a file in multipart. The orchestrator's
errors name nested fields ("start.image"), which `http_error` renames. Range checks (frames, steps, seed,
max_theta, frame_duration_ms) stay the orchestrator's, as for the other endpoints.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Any

from services.gateway import core
from services.gateway.core import ApiError, Served, invalid
from unclip.v1 import orchestrator_pb2

INTERPOLATION = "interpolation"
TEXT_DIFF = "text_diff"
DEFAULT_FRAMES = 8  # as `unclip interpolate` / `unclip diff`
NOISE = {
    "fixed": orchestrator_pb2.INTERPOLATION_NOISE_FIXED,
    "inverted": orchestrator_pb2.INTERPOLATION_NOISE_INVERTED,
}
ANIMATIONS = {"gif": orchestrator_pb2.ANIMATION_FORMAT_GIF, "webp": orchestrator_pb2.ANIMATION_FORMAT_WEBP}
ANIMATION_TYPES = {"gif": "image/gif", "webp": "image/webp"}
IMAGE_FIELDS = {INTERPOLATION: ("start_image", "end_image"), TEXT_DIFF: ("image",)}
TEXT_FIELDS = {
    INTERPOLATION: ("start_prompt", "end_prompt", "noise"),
    TEXT_DIFF: ("from_caption", "to_caption"),
}
# The orchestrator's field names -> the HTTP ones.
_PARAMS = {
    "start": "start_prompt",
    "end": "end_prompt",
    "start.image": "start_image",
    "start.prompt": "start_prompt",
    "end.image": "end_image",
    "end.prompt": "end_prompt",
}


@dataclass
class ManipulationFields:
    """The fields of one interpolation or text-diff request, type-checked."""

    kind: str  # INTERPOLATION | TEXT_DIFF
    texts: dict[str, str] = field(default_factory=dict)  # prompts, captions, noise (by HTTP name)
    images: dict[str, bytes] = field(default_factory=dict)  # decoded image ends / the image (JSON base64)
    frames: int = DEFAULT_FRAMES
    size: str | None = None  # "WxH"; None: the largest
    seed: int | None = None
    response_format: str = "url"
    user: str = ""
    model: str | None = None
    animation: str | None = None  # gif | webp
    frame_duration_ms: int = 0  # 0: the orchestrator's 150 ms
    max_theta: float | None = None  # text diffs
    params: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields

    @classmethod
    def parse(
        cls, kind: str, values: dict[str, Any], *, form: bool = False, max_image_bytes: int = 0
    ) -> ManipulationFields:
        """`values`: a JSON object, or the form's text fields (strings; lists as `name[]`) when `form`.
        `max_image_bytes`: the largest decoded base64 image (0: no limit)."""
        fields = cls(kind)
        for key, value in values.items():
            name = key[:-2] if key.endswith("[]") else key
            if name in IMAGE_FIELDS[kind]:
                if form:  # files come in separately; a text value here is a mistake
                    raise invalid(name, f"'{name}' must be one file upload.", "invalid_type")
                fields.images[name] = _base64_image(value, name, max_image_bytes)
            elif name in TEXT_FIELDS[kind]:
                fields.texts[name] = core._str(value, name)
            elif name == "frames":
                fields.frames = core._int32(value, name, form)
            elif name == "size":
                fields.size = core._str(value, name)
            elif name == "seed":
                fields.seed = core._int(value, name, form)
                core._in_range("seed", fields.seed)
            elif name == "response_format":
                fields.response_format = core._str(value, name)
                if fields.response_format not in core.RESPONSE_FORMATS:
                    raise invalid(name, f"response_format must be one of {', '.join(core.RESPONSE_FORMATS)}")
            elif name == "user":
                fields.user = core._str(value, name)
            elif name == "model":
                fields.model = core._str(value, name)
            elif name == "animation":
                fields.animation = core._str(value, name)
                if fields.animation not in ANIMATIONS:
                    raise invalid(name, f"animation must be one of {', '.join(ANIMATIONS)}", "invalid_value")
            elif name == "frame_duration_ms":
                fields.frame_duration_ms = core._int32(value, name, form)
            elif name == "max_theta" and kind == TEXT_DIFF:
                fields.max_theta = core._float(value, name, form)
                if (
                    fields.max_theta == 0
                ):  # the proto's 0 means "the default": refuse it rather than change it
                    raise invalid(name, "max_theta must be in (0, 1], got 0", "invalid_value")
            elif name in core.INT_PARAMS:
                fields.params[name] = core._int32(value, name, form)
            elif name in core.FLOAT_PARAMS:
                fields.params[name] = core._float(value, name, form)
            elif name in core.LIST_PARAMS:
                items = value if isinstance(value, list) else [value]
                fields.params[name] = [core._int32(item, name, form) for item in items]
            elif name in core.SAMPLER_PARAMS:
                fields.params[name] = core._str(value, name)
            else:
                raise invalid(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
        noise = fields.texts.get("noise", "fixed")
        if noise not in NOISE:
            raise invalid("noise", f"noise must be one of {', '.join(NOISE)}, got {noise!r}", "invalid_value")
        return fields

    def add_files(self, files: dict[str, bytes]) -> None:
        """The multipart request's image files."""
        self.images.update(files)


def _base64_image(value: Any, name: str, max_bytes: int) -> bytes:
    text = core._str(value, name)
    if text.startswith("data:"):  # a data URL, as a browser's canvas or FileReader gives it
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(name, f"'{name}' must be a base64-encoded image file.", "invalid_value") from None
    if max_bytes and len(data) > max_bytes:
        limit = max_bytes // (1024 * 1024)
        raise invalid(name, f"'{name}' must be less than {limit} MB.", "invalid_value")
    return data


# ---- fields -> the orchestrator's requests -----------------------------------------------------------------


def _end(fields: ManipulationFields, which: str) -> orchestrator_pb2.InterpolationEnd:
    prompt, image = fields.texts.get(f"{which}_prompt"), fields.images.get(f"{which}_image")
    if prompt is not None and image is not None:
        raise invalid(
            f"{which}_image", f"Give '{which}_prompt' or '{which}_image', not both.", "invalid_value"
        )
    if image is not None:
        return orchestrator_pb2.InterpolationEnd(image=image)
    if prompt is None:
        raise invalid(
            f"{which}_prompt",
            f"Missing required parameter: '{which}_prompt' or '{which}_image'.",
            "missing_required_parameter",
        )
    return orchestrator_pb2.InterpolationEnd(prompt=prompt)


def _common(fields: ManipulationFields, served: Served) -> dict[str, Any]:
    served.check_model(fields.model)
    common: dict[str, Any] = {
        "frames": fields.frames,
        "size": served.side(fields.size),
        "params": core.sampling_params(fields.params),
        "user": fields.user,
        "frame_duration_ms": fields.frame_duration_ms,
    }
    if fields.animation is not None:
        common["animation"] = ANIMATIONS[fields.animation]
    if fields.seed is not None:
        common["seed"] = fields.seed
    return common


def to_interpolate(fields: ManipulationFields, served: Served) -> orchestrator_pb2.InterpolateRequest:
    return orchestrator_pb2.InterpolateRequest(
        start=_end(fields, "start"),
        end=_end(fields, "end"),
        noise=NOISE[fields.texts.get("noise", "fixed")],
        **_common(fields, served),
    )


def to_text_diff(fields: ManipulationFields, served: Served) -> orchestrator_pb2.TextDiffRequest:
    if "image" not in fields.images:
        raise invalid("image", "Missing required parameter: 'image'.", "missing_required_parameter")
    for name in ("from_caption", "to_caption"):
        if name not in fields.texts:
            raise invalid(name, f"Missing required parameter: '{name}'.", "missing_required_parameter")
    return orchestrator_pb2.TextDiffRequest(
        image=fields.images["image"],
        from_caption=fields.texts["from_caption"],
        to_caption=fields.texts["to_caption"],
        max_theta=fields.max_theta or 0.0,
        **_common(fields, served),
    )


def http_error(failure: core.RpcFailure) -> ApiError:
    """The OpenAI error of a failed call, its `param` named as this endpoint's field."""
    error = core.error_from_rpc(failure)
    if error.param is not None:
        error.param = _PARAMS.get(error.param, error.param)
    return error


# ---- the orchestrator's answer -> the body -----------------------------------------------------------------


def frames_body(
    response: orchestrator_pb2.InterpolateResponse,
    frame_urls: list[str] | None,
    animation_url: str | None = None,
) -> dict[str, Any]:
    """`frame_urls`: one link per returned frame for response_format=url (None: b64_json); `animation_url`:
    the animation's link, likewise."""
    frames = response.frames
    data = []
    for k, (image, theta) in enumerate(zip(frames.images, response.thetas, strict=True)):
        item: dict[str, Any] = {"index": image.index, "theta": round(float(theta), 6), "seed": image.seed}
        if frame_urls is None:
            item["b64_json"] = base64.b64encode(image.png).decode("ascii")
        else:
            item["url"] = frame_urls[k]
        data.append(item)
    body: dict[str, Any] = {
        "created": int(time.time()),
        "seed": frames.seed,
        "size": f"{frames.size}x{frames.size}",
        "data": data,
    }
    if response.animation:
        name = animation_format(response)
        animation: dict[str, Any] = {"format": name}
        if frame_urls is None:
            animation["b64_json"] = base64.b64encode(response.animation).decode("ascii")
        else:
            animation["url"] = animation_url
        body["animation"] = animation
    if frames.withheld:
        body["withheld"] = frames.withheld
        body["withheld_categories"] = list(frames.withheld_categories)
    if frames.HasField("usage"):
        body["unclip_usage"] = core.usage_body(frames.usage)
    if frames.warnings:
        body["warnings"] = list(frames.warnings)
    return body


def animation_format(response: orchestrator_pb2.InterpolateResponse) -> str:
    """ "gif" or "webp": the animation's format name (the links' file extension)."""
    return next(name for name, value in ANIMATIONS.items() if value == response.animation_format)
