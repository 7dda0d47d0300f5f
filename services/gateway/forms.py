"""Request bodies of the gateway's endpoints: a JSON object, or multipart text fields and image files (each
file at most the upload limit); errors in OpenAI's shape naming the field."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile  # what request.form() returns

from services.gateway import core


async def read_json_object(request: Request, alternative: str = "") -> dict[str, Any]:
    """The body as a JSON object (400 when it is not one; `alternative` names another accepted form)."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise core.ApiError(400, f"We could not parse the JSON body of your request ({error}).") from None
    if not isinstance(body, dict):
        raise core.ApiError(400, f"The request body must be a JSON object{alternative}.")
    return body


async def read_upload(name: str, items: list[Any], max_upload_bytes: int) -> bytes:
    """The bytes of the one file sent as `name` (400 naming it when not one file, or over the limit)."""
    if len(items) != 1 or not isinstance(items[0], UploadFile):
        raise core.invalid(name, f"'{name}' must be one file upload.", "invalid_type")
    upload = items[0]
    if upload.size is not None and upload.size > max_upload_bytes:
        limit = max_upload_bytes // (1024 * 1024)
        raise core.invalid(name, f"'{name}' must be less than {limit} MB.", "invalid_value")
    return await upload.read()


async def read_multipart(
    request: Request, file_names: tuple[str, ...], max_upload_bytes: int
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The form's text fields (lists for `name[]`) and its image files `file_names`."""
    form = await request.form(max_files=4, max_fields=64)
    values: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for key in form:
        items = form.getlist(key)
        name = key.removesuffix("[]")
        if name in file_names:
            files[name] = await read_upload(name, items, max_upload_bytes)
        elif any(isinstance(item, UploadFile) for item in items):
            raise core.invalid(name, f"'{name}' must be a form field, not a file.", "invalid_type")
        elif key.endswith("[]") or len(items) > 1:
            values[name] = list(items) if name in core.LIST_PARAMS else items[-1]
        else:
            values[name] = items[0]
    return values, files
