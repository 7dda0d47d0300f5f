"""`stream=true`: GenerateStream's (and EditStream's) events as Server-Sent Events in the gpt-image shape.

    event: image_generation.partial_image   (after the decoder and each upsampler but the last, at most
    data: {"type": ..., "b64_json": ..., "partial_image_index": i, "size": "64x64", ...}     partial_images)
    event: image_generation.completed
    data: {"type": ..., "b64_json": ..., "size": "128x128", "seed": s, "unclip_usage": {...}, ...}

With `unclip_progress=true` (the playground) `unclip.progress` events (stage started / finished, denoising
step i of N) come in between; the SDK's clients never ask for them. A failure after the 200 (a stage down,
the final images withheld) is an `error` event with OpenAI's error object, and ends the stream.

Edits send the same events named as OpenAI's edit stream names them: `image_edit.partial_image`,
`image_edit.completed`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from services.gateway import core
from services.gateway.client import OrchestratorError
from unclip.v1 import orchestrator_pb2


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


GENERATION, EDIT = "image_generation", "image_edit"  # the events' type prefix, per endpoint


def _image_event(prefix: str, kind: str, png: bytes, size: int) -> dict[str, Any]:
    return {
        "type": f"{prefix}.{kind}",
        "b64_json": base64.b64encode(png).decode("ascii"),
        "created_at": int(time.time()),
        "size": f"{size}x{size}",
        "background": "opaque",
        "output_format": "png",
        "quality": "auto",
    }


def _progress(event: orchestrator_pb2.GenerateEvent) -> dict[str, Any] | None:
    kind = event.WhichOneof("event")
    if kind == "accepted":
        return {"type": "unclip.progress", "event": kind, "queue_position": event.accepted.queue_position}
    if kind in ("stage_started", "stage_finished"):
        stage = getattr(event, kind)
        return {"type": "unclip.progress", "event": kind, "stage": stage.stage, "seconds": stage.seconds}
    if kind == "step":
        step = event.step
        return {
            "type": "unclip.progress",
            "event": kind,
            "stage": step.stage,
            "step": step.step,
            "total": step.total,
        }
    return None


async def sse_events(
    head: Iterable[orchestrator_pb2.GenerateEvent],
    rest: AsyncIterator[orchestrator_pb2.GenerateEvent],
    fields: core.ImageFields,
    size: int,
    prefix: str = GENERATION,
) -> AsyncIterator[bytes]:
    """The stream's bytes: the events read before the 200 (`head`), then the rest as they come; `prefix`
    names the image events (GENERATION or EDIT)."""
    partials = 0

    async def events() -> AsyncIterator[orchestrator_pb2.GenerateEvent]:
        for event in head:
            yield event
        async for event in rest:
            yield event

    try:
        async for event in events():
            kind = event.WhichOneof("event")
            if kind == "preview":
                if partials < fields.partial_images:
                    data = _image_event(prefix, "partial_image", event.preview.png, event.preview.size)
                    data["partial_image_index"] = partials
                    partials += 1
                    yield sse(data["type"], data)
            elif kind == "result":
                result = event.result
                image = result.images[0]
                data = _image_event(prefix, "completed", image.png, result.size)
                data["seed"] = image.seed
                data["usage"] = _token_usage()
                if result.HasField("usage"):
                    data["unclip_usage"] = core.usage_body(result.usage)
                if result.warnings:
                    data["warnings"] = list(result.warnings)
                yield sse(data["type"], data)
                return
            elif fields.progress and (progress := _progress(event)) is not None:
                yield sse("unclip.progress", progress)
    except OrchestratorError as error:
        yield sse("error", {"type": "error", **core.error_from_rpc(error.failure).body()})


def _token_usage() -> dict[str, Any]:
    """The SDK's completed event requires gpt-image token usage; unclip has no tokens (see unclip_usage)."""
    return {
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    }
