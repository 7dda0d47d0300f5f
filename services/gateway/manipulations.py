"""The HTTP routes of the paper's manipulations (unclip extensions of the Images API):

    POST /v1/images/interpolations   frames between two prompts or images (Interpolate)
    POST /v1/images/text-diffs       an image moved toward a new caption (TextDiff)
    GET  /v1/images/files/<token>.gif|.webp   the animations' links (response_format=url)

Each takes JSON (images as base64) or multipart/form-data (images as files, as /v1/images/edits), with the
same key handling, errors and body conventions as the OpenAI routes (services.gateway.app); the conversions
are `services.gateway.manipulation`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from services.gateway import manipulation, schema
from services.gateway.client import Orchestrator, OrchestratorError
from services.gateway.core import ApiError
from services.gateway.forms import read_json_object, read_multipart
from services.gateway.links import LinkStore
from services.gateway.manipulation import INTERPOLATION, TEXT_DIFF, ManipulationFields


def router(
    orchestrator: Callable[[], Orchestrator], links: LinkStore, public_url: str, max_upload_bytes: int
) -> APIRouter:
    """The routes, for `app.include_router`; `orchestrator` gives the app's client once it started."""
    routes = APIRouter()

    async def read(request: Request, kind: str) -> ManipulationFields:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            values, files = await read_multipart(request, manipulation.IMAGE_FIELDS[kind], max_upload_bytes)
            fields = ManipulationFields.parse(kind, values, form=True)
            fields.add_files(files)
            return fields
        body = await read_json_object(request, " (or multipart/form-data)")
        return ManipulationFields.parse(kind, body, max_image_bytes=max_upload_bytes)

    async def run(request: Request, kind: str) -> JSONResponse:
        authorization = request.headers.get("authorization")
        served = await orchestrator().served(authorization)  # a wrong key is refused before the fields
        fields = await read(request, kind)
        if kind == INTERPOLATION:
            method, message = "Interpolate", manipulation.to_interpolate(fields, served)
        else:
            method, message = "TextDiff", manipulation.to_text_diff(fields, served)
        try:
            response = await orchestrator().frames(method, message, authorization)
        except OrchestratorError as error:
            raise manipulation.http_error(error.failure) from None
        if fields.response_format == "b64_json":
            return JSONResponse(manipulation.frames_body(response, None))
        base = public_url.rstrip("/") or str(request.base_url).rstrip("/")
        frame_urls = [base + links.put(image.png) for image in response.frames.images]
        animation_url = None
        if response.animation:
            extension = manipulation.animation_format(response)
            animation_url = base + links.put(response.animation, extension)
        return JSONResponse(manipulation.frames_body(response, frame_urls, animation_url))

    @routes.post(
        "/v1/images/interpolations",
        summary="Frames between two prompts or images (unclip: the DALL-E 2 paper's interpolation)",
        openapi_extra=schema.INTERPOLATIONS,
        responses=schema.FRAMES_RESPONSE,
    )
    async def interpolations(request: Request):
        return await run(request, INTERPOLATION)

    @routes.post(
        "/v1/images/text-diffs",
        summary="An image moved toward a new caption (unclip: the DALL-E 2 paper's text diff)",
        openapi_extra=schema.TEXT_DIFFS,
        responses=schema.FRAMES_RESPONSE,
    )
    async def text_diffs(request: Request):
        return await run(request, TEXT_DIFF)

    async def animation_file(extension: str, token: str, expires: int, signature: str) -> Response:
        data = links.get(token, expires, signature, extension)
        if data is None:
            raise ApiError(404, "This image link is invalid or has expired (links last 60 minutes).")
        media_type = manipulation.ANIMATION_TYPES[extension]
        return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=3600"})

    @routes.get("/v1/images/files/{token}.gif", include_in_schema=False)
    async def gif_file(token: str, expires: int = 0, signature: str = ""):
        return await animation_file("gif", token, expires, signature)

    @routes.get("/v1/images/files/{token}.webp", include_in_schema=False)
    async def webp_file(token: str, expires: int = 0, signature: str = ""):
        return await animation_file("webp", token, expires, signature)

    return routes
