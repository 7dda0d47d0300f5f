"""The HTTP routes: OpenAI's /v1/images/* (dall-e-2), /v1/models, health, metrics, the playground page.

A thin adapter: each route reads the HTTP request, lets `core` check and translate it, calls the orchestrator
(`client.Orchestrator`) and writes the answer. Every failure leaves as OpenAI's error body
`{"error": {message, type, param, code}}` with its status code; never a stack trace.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import core, manipulations, provenance, schema
from services.gateway.client import Orchestrator, OrchestratorConfig, OrchestratorError
from services.gateway.core import ApiError, ImageFields
from services.gateway.forms import read_json_object, read_multipart, read_upload
from services.gateway.links import LinkConfig, LinkStore
from services.gateway.streaming import EDIT, GENERATION, sse_events

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"

# Bounded labels: each /v1 route, the links, models, content_provenance_checks, and "other".
ENDPOINTS = ("generations", "edits", "variations", "interpolations", "text-diffs", "files", "models")
REQUESTS = Counter(
    "unclip_gateway_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "status"]
)
LATENCY = Histogram(
    "unclip_gateway_request_seconds",
    "Time to the response's headers (streams: to the first event), by endpoint.",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


@dataclass
class GatewayConfig:
    orchestrator: OrchestratorConfig  # where the orchestrator is, and how calls to it are made
    links: LinkConfig = field(default_factory=LinkConfig)  # response_format=url without a bucket
    public_url: str = ""  # base of the links ('': the request's own scheme and host)
    max_upload_bytes: int = 4 * 1024 * 1024  # one uploaded image (OpenAI: "less than 4MB")

    @property
    def max_body_bytes(self) -> int:
        """A request body: image + mask + form fields."""
        return 2 * self.max_upload_bytes + 1024 * 1024


class BodyTooLarge(Exception):
    pass


def _endpoint(path: str) -> str:
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["v1", "images"] and parts[2] in ENDPOINTS:
        return parts[2]
    if parts[:2] in (["v1", "models"], ["v1", "content_provenance_checks"]):
        return parts[1]
    return "other"


class Limits:
    """ASGI middleware: refuses bodies over the limit (413, before they are read) and counts requests."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope["path"])
        started = time.perf_counter()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, _too_large(self.max_body_bytes), endpoint, started)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:  # a chunked body without Content-Length
                raise BodyTooLarge()
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                REQUESTS.labels(endpoint, str(message["status"])).inc()
                LATENCY.labels(endpoint).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, limited_receive, counting_send)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than {limit} bytes (each image must be less than "
        f"{(limit - 1024 * 1024) // 2 // (1024 * 1024)} MB).",
        code="request_too_large",
    )


async def _send_error(send, error: ApiError, endpoint: str, started: float) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    REQUESTS.labels(endpoint, str(error.status)).inc()
    LATENCY.labels(endpoint).observe(time.perf_counter() - started)


def event_stream(events) -> StreamingResponse:
    """Server-Sent Events, unbuffered by proxies."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(config: GatewayConfig) -> Limits:
    """The ASGI application: the FastAPI app inside the body-size and metrics middleware."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["orchestrator"] = Orchestrator(config.orchestrator)
        try:
            yield
        finally:
            await state["orchestrator"].close()

    app = FastAPI(
        title="unclip",
        description="The OpenAI Images API (dall-e-2: generations, edits, variations) served by unclip, and "
        "unclip's extensions: interpolations and text diffs (the DALL-E 2 paper's manipulations).",
        lifespan=lifespan,
    )
    links = LinkStore(config.links)

    def orchestrator() -> Orchestrator:
        return state["orchestrator"]

    # ---- errors: OpenAI's shape, never a trace ---------------------------------------------------------

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(OrchestratorError)
    async def on_rpc_error(_request: Request, error: OrchestratorError):
        return error_response(core.error_from_rpc(error.failure))

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(_request: Request, _error: BodyTooLarge):
        return error_response(_too_large(config.max_body_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, error: StarletteHTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(ApiError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, error: RequestValidationError):
        return error_response(ApiError(400, str(error)))

    @app.exception_handler(Exception)
    async def on_bug(_request: Request, error: Exception):
        log.error("request failed", exc_info=error)
        return error_response(
            ApiError(500, "The server had an error processing the request.", type="server_error")
        )

    # ---- /v1/images/* ----------------------------------------------------------------------------------

    def base_url(request: Request) -> str:
        return config.public_url.rstrip("/") or str(request.base_url).rstrip("/")

    async def answer(request: Request, fields: ImageFields, method: str, message) -> JSONResponse:
        response = await orchestrator().images(method, message, request.headers.get("authorization"))
        urls = None
        if fields.response_format == "url":
            base = base_url(request)
            urls = [image.url or base + links.put(image.png) for image in response.images]
        return JSONResponse(core.images_body(response, urls))

    @app.post(
        "/v1/images/generations",
        summary="Create images from a prompt (OpenAI's images.generate)",
        openapi_extra=schema.GENERATIONS,
    )
    async def generations(request: Request):
        fields = ImageFields.parse(await read_json_object(request))
        authorization = request.headers.get("authorization")
        served = await orchestrator().served(authorization)
        # A stream always carries b64 PNGs, as gpt-image's.
        url_format = fields.response_format == "url" and not fields.stream
        message = core.to_generate(fields, served, url_format=url_format)
        if fields.stream:
            head, rest = await orchestrator().generate_stream(message, authorization)
            return event_stream(sse_events(head, rest, fields, message.size, GENERATION))
        return await answer(request, fields, "Generate", message)

    @app.post(
        "/v1/images/edits",
        summary="Edit an image with a mask and a prompt (OpenAI's images.edit)",
        openapi_extra=schema.EDITS,
    )
    async def edits(request: Request):
        fields, files = await read_form(request, ("image", "mask"))
        if "image" not in files:
            raise core.invalid("image", "Missing required parameter: 'image'.", "missing_required_parameter")
        authorization = request.headers.get("authorization")
        served = await orchestrator().served(authorization)
        url_format = fields.response_format == "url" and not fields.stream  # a stream carries b64 PNGs
        message = core.to_edit(fields, files["image"], files.get("mask", b""), served, url_format)
        if fields.stream:
            return await edit_stream(message, fields, authorization)
        return await answer(request, fields, "Edit", message)

    async def edit_stream(message, fields: ImageFields, authorization: str | None) -> StreamingResponse:
        """Edits with stream=true: EditStream's events as the generations' SSE, named image_edit.*; bad
        input and refusals are raised here, before the 200."""
        head, rest = await orchestrator().edit_stream(message, authorization)
        return event_stream(sse_events(head, rest, fields, message.size, EDIT))

    @app.post(
        "/v1/images/variations",
        summary="Variations of an image (OpenAI's images.create_variation)",
        openapi_extra=schema.VARIATIONS,
    )
    async def variations(request: Request):
        fields, files = await read_form(request, ("image",))
        if "image" not in files:
            raise core.invalid("image", "Missing required parameter: 'image'.", "missing_required_parameter")
        served = await orchestrator().served(request.headers.get("authorization"))
        message = core.to_variation(fields, files["image"], served, fields.response_format == "url")
        return await answer(request, fields, "CreateVariation", message)

    @app.post(
        "/v1/content_provenance_checks",
        summary="Is this image ours, and unaltered? (OpenAI's content_provenance_checks.create)",
        openapi_extra=provenance.SCHEMA,
    )
    async def content_provenance_checks(request: Request):
        image = await read_file_form(request)
        try:
            answer = await orchestrator().verify(image, request.headers.get("authorization"))
        except OrchestratorError as error:
            if error.failure.code == "INVALID_ARGUMENT":  # the orchestrator's "image" is this form's "file"
                raise core.invalid("file", error.failure.message, "invalid_value") from None
            raise
        return JSONResponse(provenance.check_body(answer))

    async def read_file_form(request: Request) -> bytes:
        """The one `file` upload of a multipart body (content_provenance_checks takes nothing else)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "This endpoint takes multipart/form-data (the image as `file`).")
        form = await request.form(max_files=2, max_fields=8)
        for key in form:
            if key != "file":
                raise core.invalid(key, f"Unrecognized request argument supplied: {key}", "unknown_parameter")
        items = form.getlist("file")
        if not items:
            raise core.invalid("file", "Missing required parameter: 'file'.", "missing_required_parameter")
        return await read_upload("file", items, config.max_upload_bytes)

    async def read_form(
        request: Request, file_names: tuple[str, ...]
    ) -> tuple[ImageFields, dict[str, bytes]]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "This endpoint takes multipart/form-data (image and mask as files).")
        values, files = await read_multipart(request, file_names, config.max_upload_bytes)
        return ImageFields.parse(values, form=True), files

    # unclip's extensions, in their own module: interpolations, text diffs, the animations' links.
    app.include_router(manipulations.router(orchestrator, links, config.public_url, config.max_upload_bytes))

    @app.get("/v1/images/files/{token}.png", include_in_schema=False)
    async def image_file(token: str, expires: int = 0, signature: str = ""):
        png = links.get(token, expires, signature)
        if png is None:
            raise ApiError(404, "This image link is invalid or has expired (links last 60 minutes).")
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    # ---- models, health, metrics, the page -------------------------------------------------------------

    @app.get("/v1/models", summary="The served model (also answers to dall-e-2)")
    async def models(request: Request):
        served = await orchestrator().served(request.headers.get("authorization"))
        now = int(time.time())
        sizes = {  # unclip's extras: what the page offers, and how many stages make each size
            "unclip_sizes": [f"{s}x{s}" for s in served.offered_sizes()],
            "unclip_stage_sizes": list(served.sizes),
        }
        data = [
            {"id": name, "object": "model", "created": now, "owned_by": "unclip", **sizes}
            for name in dict.fromkeys([served.model_name, core.DALL_E_2])
        ]
        return {"object": "list", "data": data}

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz():
        if await orchestrator().ready():
            return {"status": "ready"}
        return JSONResponse({"status": "not ready: the orchestrator is not SERVING"}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = STATIC / name
        if path.parent != STATIC or not path.is_file():
            raise ApiError(404, f"no such file: {name}")
        return FileResponse(path)

    return Limits(app, config.max_body_bytes)
