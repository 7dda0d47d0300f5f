"""The request bodies as OpenAPI schemas, for /docs: the routes read their bodies themselves (so every error
keeps OpenAI's shape), and these tell the OpenAPI document what they accept."""

from __future__ import annotations

from typing import Any

from services.gateway import core

_SAMPLING: dict[str, Any] = {
    **{name: {"type": "integer"} for name in core.INT_PARAMS},
    **{name: {"type": "number"} for name in core.FLOAT_PARAMS},
    **{name: {"type": "array", "items": {"type": "integer"}} for name in core.LIST_PARAMS},
}
_COMMON: dict[str, Any] = {
    "n": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
    "size": {
        "type": "string",
        "example": "128x128",
        "description": "WxH; absent: the largest the model makes",
    },
    "response_format": {"type": "string", "enum": list(core.RESPONSE_FORMATS), "default": "url"},
    "user": {"type": "string"},
    "model": {"type": "string", "example": core.DALL_E_2},
    "seed": {
        "type": "integer",
        "minimum": 0,
        "description": "unclip: reproducible results (image i: seed + i)",
    },
    **_SAMPLING,
}
_PROMPT = {"type": "string", "maxLength": 1000}


def _body(content_type: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}


GENERATIONS = _body(
    "application/json",
    {
        "prompt": _PROMPT,
        **_COMMON,
        "stream": {
            "type": "boolean",
            "description": "Server-Sent Events (n=1): partial images, then completed",
        },
        "partial_images": {"type": "integer", "minimum": 0, "maximum": 3, "default": 3},
    },
    ["prompt"],
)
_FILE = {"type": "string", "format": "binary"}
EDITS = _body(
    "multipart/form-data", {"image": _FILE, "mask": _FILE, "prompt": _PROMPT, **_COMMON}, ["image", "prompt"]
)
VARIATIONS = _body("multipart/form-data", {"image": _FILE, **_COMMON}, ["image"])

# ---- unclip's extensions: the paper's manipulations (services.gateway.manipulations) ----------------------

_B64 = {"type": "string", "description": "JSON: the image file, base64 (a data: URL too); multipart: a file"}
_MANIPULATION: dict[str, Any] = {
    "frames": {"type": "integer", "minimum": 2, "maximum": 32, "default": 8},
    "size": _COMMON["size"],
    "seed": {"type": "integer", "minimum": 0, "description": "the same for every frame; drawn when absent"},
    "response_format": _COMMON["response_format"],
    "user": _COMMON["user"],
    "model": _COMMON["model"],
    "animation": {
        "type": "string",
        "enum": ["gif", "webp"],
        "description": "also the frames as one animation",
    },
    "frame_duration_ms": {"type": "integer", "minimum": 0, "description": "per frame (0: 150 ms)"},
    **_SAMPLING,
    **{name: {"type": "string"} for name in ("prior_sampler", "decoder_sampler", "super_res_sampler")},
    "ddim_eta": {"type": "number", "minimum": 0, "maximum": 1},
}


def _both(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """One body in JSON (images as base64) and in multipart (images as files)."""
    content = {}
    for content_type in ("application/json", "multipart/form-data"):
        form = content_type.startswith("multipart")
        props = {
            name: ({**_FILE, "description": "an image file"} if form and value is _B64 else value)
            for name, value in properties.items()
        }
        content[content_type] = {
            "schema": {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        }
    return {"requestBody": {"required": True, "content": content}}


INTERPOLATIONS = _both(
    {
        "start_prompt": {**_PROMPT, "description": "the first end (theta 0) as a prompt; or start_image"},
        "start_image": _B64,
        "end_prompt": {**_PROMPT, "description": "the last end (theta 1) as a prompt; or end_image"},
        "end_image": _B64,
        "noise": {
            "type": "string",
            "enum": ["fixed", "inverted"],
            "default": "fixed",
            "description": "fixed: every frame from the seed's noise; inverted: from the slerp of the two "
            "image ends' DDIM-inverted latents (two image ends)",
        },
        **_MANIPULATION,
    },
    [],
)
TEXT_DIFFS = _both(
    {
        "image": _B64,
        "from_caption": {**_PROMPT, "description": "what the image shows now"},
        "to_caption": {**_PROMPT, "description": "what it should move toward"},
        "max_theta": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": 0.5,
            "description": "how far the last frame goes toward the new caption",
        },
        **_MANIPULATION,
    },
    ["image", "from_caption", "to_caption"],
)
_FRAME = {
    "type": "object",
    "properties": {
        "b64_json": {"type": "string"},
        "url": {"type": "string"},
        "index": {"type": "integer"},
        "theta": {"type": "number"},
        "seed": {"type": "integer"},
    },
}
FRAMES_RESPONSE = {
    "200": {
        "description": "The frames in order (theta 0 to 1, or to max_theta), and the animation when asked",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "created": {"type": "integer"},
                        "seed": {"type": "integer"},
                        "size": {"type": "string"},
                        "data": {"type": "array", "items": _FRAME},
                        "animation": {
                            "type": "object",
                            "properties": {
                                "format": {"type": "string", "enum": ["gif", "webp"]},
                                "b64_json": {"type": "string"},
                                "url": {"type": "string"},
                            },
                        },
                        "unclip_usage": {"type": "object"},
                        "warnings": {"type": "array", "items": {"type": "string"}},
                    },
                }
            }
        },
    }
}
