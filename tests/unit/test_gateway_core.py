"""The gateway's transport-free core: gRPC statuses -> OpenAI errors (including the access-control statuses
and limits the orchestrator sends), request fields, sizes, and the signed links."""

from __future__ import annotations

import time

import pytest

from services.gateway import core
from services.gateway.core import ApiError, ImageFields, RpcFailure, Served
from services.gateway.links import LinkConfig, LinkStore


def failure(code: str, message: str = "m", **metadata: str) -> RpcFailure:
    return RpcFailure(code=code, message=message, metadata=metadata)


def test_access_statuses():
    error = core.error_from_rpc(failure("UNAUTHENTICATED", "no key"))
    assert (error.status, error.code, error.message) == (401, "invalid_api_key", "no key")
    error = core.error_from_rpc(failure("PERMISSION_DENIED", "key 'a' lacks scope edit"))
    assert (error.status, error.type) == (403, "permission_error")
    assert core.error_from_rpc(failure("UNAVAILABLE")).status == 503
    assert core.error_from_rpc(failure("DEADLINE_EXCEEDED")).status == 504
    internal = core.error_from_rpc(failure("INTERNAL", "Traceback (most recent call last)"))
    assert internal.status == 500 and "Traceback" not in internal.message


def test_backpressure_and_quota():
    busy = core.error_from_rpc(failure("RESOURCE_EXHAUSTED", "busy", **{"retry-after-ms": "1500"}))
    assert busy.status == 429 and busy.code == "rate_limit_exceeded"
    assert busy.headers == {"retry-after-ms": "1500", "retry-after": "2", "x-unclip-limit": "capacity"}
    also_busy = core.error_from_rpc(
        failure("RESOURCE_EXHAUSTED", "busy", **{"retry-after-ms": "100", "unclip-limit": "capacity"})
    )
    assert "x-should-retry" not in also_busy.headers and also_busy.headers["retry-after"] == "1"
    quota = core.error_from_rpc(
        failure(
            "RESOURCE_EXHAUSTED", "2 images a minute", **{"retry-after-ms": "42000", "unclip-limit": "ipm"}
        )
    )
    assert quota.status == 429 and quota.code == "insufficient_quota"
    assert quota.headers["x-should-retry"] == "false" and quota.headers["retry-after"] == "42"


def test_invalid_argument_names_the_param():
    error = core.error_from_rpc(failure("INVALID_ARGUMENT", "params.decoder_guidance_scale must be a finite"))
    assert (error.status, error.param) == (400, "decoder_guidance_scale")
    assert core.param_of("output_format OUTPUT_FORMAT_URL is not available") == "response_format"
    assert core.param_of("mask must be the image's size") == "mask"
    refused = RpcFailure("INVALID_ARGUMENT", "content_policy_violation: ...", {}, refused=True)
    assert core.error_from_rpc(refused).code == "content_policy_violation"


def test_form_fields_and_lists():
    fields = ImageFields.parse(
        {"n": "2", "seed": "7", "super_res_num_inference_steps[]": ["2", "3"], "stream": "false"}, form=True
    )
    assert (fields.n, fields.seed, fields.stream) == (2, 7, False)
    assert fields.params == {"super_res_num_inference_steps": [2, 3]}
    with pytest.raises(ApiError) as caught:
        ImageFields.parse({"n": True})
    assert caught.value.param == "n" and caught.value.code == "invalid_type"
    with pytest.raises(ApiError) as caught:
        ImageFields.parse({"prompt": "a", "quality": "hd"})
    assert caught.value.param == "quality"
    assert ImageFields.parse({"prompt": "a", "quality": "standard"}).prompt == "a"


def test_sizes_and_model():
    served = Served(model_name="shapes-toy", sizes=(64, 256, 1024))
    assert served.offered_sizes() == [64, 256, 512, 1024]
    assert served.side(None) == 1024 and served.side("512x512") == 512
    for bad in ("100x100", "512x256", "big", "2048x2048"):
        with pytest.raises(ApiError) as caught:
            served.side(bad)
        assert (
            caught.value.param == "size"
            and "'64x64', '256x256', '512x512', '1024x1024'" in caught.value.message
        )
    served.check_model("dall-e-2"), served.check_model("shapes-toy"), served.check_model(None)
    with pytest.raises(ApiError) as caught:
        served.check_model("dall-e-3")
    assert caught.value.status == 404 and caught.value.code == "model_not_found"


def test_links_are_signed_expire_and_are_bounded():
    store = LinkStore(LinkConfig(ttl_seconds=60, max_bytes=10))
    path = store.put(b"12345")
    token = path.split("/")[-1].split(".png")[0]
    expires = int(path.split("expires=")[1].split("&")[0])
    signature = path.split("signature=")[1]
    assert store.get(token, expires, signature) == b"12345"
    assert store.get(token, expires + 1, signature) is None  # the expiry is signed
    assert store.get(token, expires, "0" * 64) is None
    other = LinkStore(LinkConfig(ttl_seconds=60))
    assert other.get(token, expires, signature) is None  # another secret
    store.put(b"678901")  # over the budget: the oldest goes
    assert store.get(token, expires, signature) is None
    short = LinkStore(LinkConfig(ttl_seconds=-1))
    path = short.put(b"x")
    token, expires = path.split("/")[-1].split(".png")[0], int(path.split("expires=")[1].split("&")[0])
    assert short.get(token, expires, path.split("signature=")[1]) is None and expires < time.time()
