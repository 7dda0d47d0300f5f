"""The OpenAI Images API (dall-e-2) onto unclip's gRPC API, without HTTP or gRPC transport.

Three jobs, each a plain function the HTTP routes (services.gateway.app) call:
- `ImageFields.parse`: a request body (JSON object, or multipart form fields) -> checked fields, every type
  error a `ApiError` naming its `param`, as the OpenAI API answers;
- `to_generate` / `to_variation` / `to_edit`: checked fields -> the orchestrator's request messages;
- `error_from_rpc`: a gRPC status -> the OpenAI error (status code, type, code, param, retry headers);
- `images_body`: an ImagesResponse -> `{created, data: [{b64_json | url, seed}], unclip_usage, warnings}`.

Range checks (n, prompt length, seed, steps, guidance) stay the orchestrator's, which names the field in its
INVALID_ARGUMENT; only what the HTTP surface adds (size as "WxH", response_format, model, stream) and the
types of the JSON / form values are checked here.
"""

from __future__ import annotations

import base64
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from unclip import limits
from unclip.v1 import orchestrator_pb2

DALL_E_2 = "dall-e-2"
# The dall-e-2 sizes; offered where the cascade makes them (any square size up to its largest).
STANDARD_SIZES = (256, 512, 1024)
RESPONSE_FORMATS = ("url", "b64_json")
# SamplingParams fields, by the type of their value (the names are the proto's and diffusers').
INT_PARAMS = ("prior_num_inference_steps", "decoder_num_inference_steps", "prior_num_candidates")
FLOAT_PARAMS = ("prior_guidance_scale", "decoder_guidance_scale", "ddim_eta")
SAMPLER_PARAMS = ("prior_sampler", "decoder_sampler", "super_res_sampler")  # names from GetCapabilities
LIST_PARAMS = ("super_res_num_inference_steps",)
# Accepted and ignored: what the SDK or OpenAI clients send for dall-e-2 that has one meaning here.
IGNORED = {"quality": ("standard", "auto")}


@dataclass
class ApiError(Exception):
    """An error as the OpenAI API answers it: `{"error": {message, type, param, code}}` with `status`."""

    status: int  # HTTP status code
    message: str  # says what is wrong and, for a bad value, which values are allowed
    type: str = "invalid_request_error"  # OpenAI's error type
    param: str | None = None  # the request field at fault
    code: str | None = None  # OpenAI's machine-readable code (content_policy_violation, invalid_api_key, ...)
    headers: dict[str, str] = field(default_factory=dict)  # retry-after, retry-after-ms, x-should-retry

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---- request fields ----------------------------------------------------------------------------------------


@dataclass
class ImageFields:
    """The fields of one /v1/images/* request, type-checked (ranges are the orchestrator's)."""

    prompt: str | None = None  # required for generations and edits
    n: int = 1  # images to make
    size: str | None = None  # "WxH"; None: the largest the cascade makes
    response_format: str = "url"  # url | b64_json
    user: str = ""  # the end user, for the audit trail
    model: str | None = None  # dall-e-2 or the served model's name
    seed: int | None = None  # unclip extra: reproducible results
    params: dict[str, Any] = field(default_factory=dict)  # unclip extra: SamplingParams fields
    stream: bool = False  # Server-Sent Events (generations and edits)
    partial_images: int = 3  # with stream: how many intermediate images to send (0-3)
    progress: bool = False  # with stream: also `unclip.progress` events (the playground's progress bar)

    @classmethod
    def parse(cls, values: dict[str, Any], *, form: bool = False) -> ImageFields:
        """`values`: a JSON object, or form fields (strings; lists as `name[]`) when `form`."""
        fields = cls()
        for key, value in values.items():
            name = key[:-2] if key.endswith("[]") else key
            if name in ("image", "mask"):
                continue  # files, read by the route
            if name in IGNORED:
                if value not in IGNORED[name]:
                    raise invalid(name, f"{name} must be one of {', '.join(IGNORED[name])} for {DALL_E_2}")
            elif name == "prompt":
                fields.prompt = _str(value, name)
            elif name == "n":
                fields.n = _int(value, name, form)
            elif name == "size":
                fields.size = _str(value, name)
            elif name == "response_format":
                fields.response_format = _str(value, name)
                if fields.response_format not in RESPONSE_FORMATS:
                    raise invalid(name, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
            elif name == "user":
                fields.user = _str(value, name)
            elif name == "model":
                fields.model = _str(value, name)
            elif name == "seed":
                fields.seed = _int(value, name, form)
                _in_range("seed", fields.seed)
            elif name in INT_PARAMS:
                fields.params[name] = _int32(value, name, form)
            elif name in FLOAT_PARAMS:
                fields.params[name] = _float(value, name, form)
            elif name in LIST_PARAMS:
                items = value if isinstance(value, list) else [value]
                fields.params[name] = [_int32(item, name, form) for item in items]
            elif name in SAMPLER_PARAMS:
                fields.params[name] = _str(value, name)
            elif name == "stream":
                fields.stream = _bool(value, name, form)
            elif name == "partial_images":
                fields.partial_images = _int(value, name, form)
                if not 0 <= fields.partial_images <= 3:
                    raise invalid(name, "partial_images must be in 0..3")
            elif name == "unclip_progress":
                fields.progress = _bool(value, name, form)
            else:
                raise invalid(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
        _in_range("n", fields.n)  # n=0 would mean 1 to the orchestrator; the OpenAI API refuses it
        return fields

    def require_prompt(self) -> str:
        if self.prompt is None:
            raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
        return self.prompt


def _type_error(name: str, expected: str, value: Any) -> ApiError:
    got = type(value).__name__ if not isinstance(value, str) else "a string"
    return invalid(
        name, f"Invalid type for '{name}': expected {expected}, but got {got} instead.", "invalid_type"
    )


def _in_range(name: str, value: int) -> None:
    try:
        limits.check(name, value)
    except ValueError as error:
        raise invalid(name, str(error), "invalid_value") from None


def _int32(value: Any, name: str, form: bool) -> int:
    """An int32 proto field: a value beyond it is out of range (the orchestrator checks the real range)."""
    number = _int(value, name, form)
    if not -(2**31) <= number < 2**31:
        raise invalid(name, f"{name} is out of range, got {number}", "invalid_value")
    return number


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _int(value: Any, name: str, form: bool) -> int:
    if form and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _type_error(name, "an integer", value) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    return value


def _float(value: Any, name: str, form: bool) -> float:
    if form and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _type_error(name, "a number", value) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _type_error(name, "a finite number", value)
    return float(value)


def _bool(value: Any, name: str, form: bool) -> bool:
    if form and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


# ---- fields -> the orchestrator's requests -----------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What the gateway knows of the served cascade (from GetCapabilities)."""

    model_name: str  # the served model's name (accepted as `model` beside dall-e-2)
    sizes: tuple[int, ...]  # the stage sizes, ascending

    def offered_sizes(self) -> list[int]:
        """Stage sizes plus the dall-e-2 standard sizes the cascade can make, ascending."""
        largest = self.sizes[-1]
        return sorted(set(self.sizes) | {s for s in STANDARD_SIZES if s <= largest})

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (DALL_E_2, self.model_name):
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}' "
                f"(also accepted as '{DALL_E_2}').",
                param="model",
                code="model_not_found",
            )

    def side(self, size: str | None) -> int:
        """The square side of `size` ("WxH"); None -> the largest."""
        offered = self.offered_sizes()
        if size is None:
            return offered[-1]
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if not match or match.group(1) != match.group(2) or int(match.group(1)) not in offered:
            names = ", ".join(f"'{s}x{s}'" for s in offered)
            raise invalid("size", f"'{size}' is not one of the supported sizes: {names}.", "invalid_value")
        return int(match.group(1))


def sampling_params(params: dict[str, Any]) -> orchestrator_pb2.SamplingParams:
    return orchestrator_pb2.SamplingParams(**params)


def _common(fields: ImageFields, served: Served, url_format: bool) -> dict[str, Any]:
    served.check_model(fields.model)
    common: dict[str, Any] = {
        "n": fields.n,
        "size": served.side(fields.size),
        "params": sampling_params(fields.params),
        "user": fields.user,
        "output_format": orchestrator_pb2.OUTPUT_FORMAT_URL
        if url_format
        else orchestrator_pb2.OUTPUT_FORMAT_PNG,
    }
    if fields.seed is not None:
        common["seed"] = fields.seed
    return common


def to_generate(fields: ImageFields, served: Served, url_format: bool) -> orchestrator_pb2.GenerateRequest:
    if fields.stream and fields.n != 1:
        raise invalid("n", "n must be 1 with stream=true (the completed event carries no image index)")
    request = orchestrator_pb2.GenerateRequest(
        prompt=fields.require_prompt(), **_common(fields, served, url_format)
    )
    request.previews = fields.stream and fields.partial_images > 0
    return request


def to_variation(
    fields: ImageFields, image: bytes, served: Served, url_format: bool
) -> orchestrator_pb2.VariationRequest:
    if fields.prompt is not None:
        raise invalid("prompt", "Unrecognized request argument supplied: prompt", "unknown_parameter")
    if fields.stream:
        raise invalid("stream", "stream is supported on /v1/images/generations and /v1/images/edits only")
    return orchestrator_pb2.VariationRequest(image=image, **_common(fields, served, url_format))


def to_edit(
    fields: ImageFields, image: bytes, mask: bytes, served: Served, url_format: bool
) -> orchestrator_pb2.EditRequest:
    if fields.stream and fields.n != 1:
        raise invalid("n", "n must be 1 with stream=true (the completed event carries no image index)")
    return orchestrator_pb2.EditRequest(
        image=image, mask=mask, prompt=fields.require_prompt(), **_common(fields, served, url_format)
    )


# ---- the orchestrator's answer -> the OpenAI body ----------------------------------------------------------


def usage_body(usage: orchestrator_pb2.Usage) -> dict[str, Any]:
    return {
        "images": usage.images,
        "compute_seconds": usage.compute_seconds,
        "energy_joules": usage.energy_joules,
        "stage_seconds": dict(usage.stage_seconds),
    }


def images_body(response: orchestrator_pb2.ImagesResponse, urls: list[str] | None) -> dict[str, Any]:
    """`urls`: one link per image for response_format=url (None: b64_json)."""
    data = []
    for i, image in enumerate(response.images):
        item: dict[str, Any] = {"seed": image.seed}
        if urls is None:
            item["b64_json"] = base64.b64encode(image.png).decode("ascii")
        else:
            item["url"] = urls[i]
        data.append(item)
    body: dict[str, Any] = {"created": int(time.time()), "data": data}
    if response.HasField("usage"):
        body["unclip_usage"] = usage_body(response.usage)
    if response.warnings:
        body["warnings"] = list(response.warnings)
    return body


# ---- gRPC status -> OpenAI error ---------------------------------------------------------------------------

# Trailing metadata of RESOURCE_EXHAUSTED: the retry hint (exists) and which limit was hit ("capacity" is
# backpressure; any other name is a quota, which a retry within seconds cannot cure).
RETRY_AFTER_MS = "retry-after-ms"
LIMIT_KEY = "unclip-limit"
_FIELD = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)\b")


def param_of(message: str) -> str | None:
    """The request field an INVALID_ARGUMENT message names first ("params.x must ..." -> "x")."""
    match = _FIELD.match(message)
    if not match:
        return None
    name = match.group(1).removeprefix("params.")
    return {"output_format": "response_format"}.get(name, name)


@dataclass(frozen=True)
class RpcFailure:
    """What the gateway needs of a failed gRPC call (transport-free: the routes build it from the error)."""

    code: str  # grpc.StatusCode name: "INVALID_ARGUMENT", "UNAUTHENTICATED", ...
    message: str  # the status details
    metadata: dict[str, str]  # trailing metadata
    refused: bool = False  # a content-policy refusal (ErrorInfo reason CONTENT_POLICY_VIOLATION)


def error_from_rpc(failure: RpcFailure) -> ApiError:
    code, message = failure.code, failure.message
    if failure.refused:
        return ApiError(400, message, param=None, code="content_policy_violation")
    if code == "INVALID_ARGUMENT":
        return ApiError(400, message, param=param_of(message), code="invalid_value")
    if code == "UNAUTHENTICATED":
        return ApiError(401, message, code="invalid_api_key")
    if code == "PERMISSION_DENIED":
        return ApiError(403, message, type="permission_error", code="permission_denied")
    if code == "NOT_FOUND":
        return ApiError(404, message, code="not_found")
    if code == "RESOURCE_EXHAUSTED":
        return _too_many(failure)
    if code == "UNAVAILABLE":
        return ApiError(503, message, type="server_error", code="service_unavailable")
    if code == "DEADLINE_EXCEEDED":
        return ApiError(504, message, type="server_error", code="timeout")
    return ApiError(500, f"The server had an error processing the request ({code}).", type="server_error")


def _too_many(failure: RpcFailure) -> ApiError:
    limit = failure.metadata.get(LIMIT_KEY, "capacity")
    headers: dict[str, str] = {}
    try:
        milliseconds = max(0, int(failure.metadata[RETRY_AFTER_MS]))
        headers["retry-after-ms"] = str(milliseconds)
        headers["retry-after"] = str(max(1, math.ceil(milliseconds / 1000)))
    except (KeyError, ValueError):
        pass
    headers["x-unclip-limit"] = limit
    if limit == "capacity":
        return ApiError(429, failure.message, type="requests", code="rate_limit_exceeded", headers=headers)
    # A quota: the SDK would retry twice within seconds for nothing; tell it not to.
    headers["x-should-retry"] = "false"
    return ApiError(
        429, failure.message, type="insufficient_quota", code="insufficient_quota", headers=headers
    )
