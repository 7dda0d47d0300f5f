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
