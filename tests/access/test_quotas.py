"""Quotas through the shared stack: images per minute per key and per tenant (RESOURCE_EXHAUSTED with a retry
time and the limit's name; CLI exit 5), concurrent requests per key, and the per-request compute ceiling
(INVALID_ARGUMENT naming the fields). Other keys are unaffected."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest

from unclip.access import keys
from unclip.access.client import with_key
from unclip.runtime.errors import limit_of, retry_after
from unclip.runtime.server import create_channel
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

UNCLIP = [sys.executable, "-m", "unclip"]
FAST = pb.SamplingParams(prior_num_inference_steps=2, decoder_num_inference_steps=2)
FAST_FLAGS = ["--prior-steps", "2", "--decoder-steps", "2", "--size", "32", "--no-progress"]


def new_key(stack, name: str, **limits) -> str:
    return keys.create(stack.running.keys_file, name, **limits)


def stub_for(stack, key: str):
    return orchestrator_pb2_grpc.ImageServiceStub(with_key(create_channel(stack.address), key))


def generate(stub, n: int = 1, params: pb.SamplingParams = FAST, timeout: float = 120):
    return stub.Generate(
        pb.GenerateRequest(prompt="a red circle", n=n, size=32, params=params), timeout=timeout
    )


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_images_per_minute_refuses_the_third_image_with_a_retry_time(stack, tmp_path):
    key = new_key(stack, "two-a-minute", images_per_minute=2)
    env = {**stack.env, "UNCLIP_API_KEY": key}
    for _ in range(2):
        done = subprocess.run([*UNCLIP, "generate", "a red circle", *FAST_FLAGS, "--out", str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
    done = subprocess.run([*UNCLIP, "generate", "a red circle", *FAST_FLAGS, "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 5, done.stderr
    assert "images_per_minute" in done.stderr and "retry in" in done.stderr, done.stderr

    error = refusal(lambda: generate(stub_for(stack, key)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limit_of(error) == "images_per_minute"
    assert 0 < retry_after(error) <= 30  # one image's refill at 2 a minute
    # Asking for more than a whole minute's worth can never pass: invalid, naming n.
    error = refusal(lambda: generate(stub_for(stack, key), n=3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("n")
    # Other keys are unaffected.
    with stack.channel() as channel:
        assert len(generate(orchestrator_pb2_grpc.ImageServiceStub(channel)).images) == 1


def test_a_tenant_limit_covers_every_key_of_the_tenant(stack):
    path = stack.running.keys_file
    first = new_key(stack, "tenant-q-1", tenant="tenant-q")
    second = new_key(stack, "tenant-q-2", tenant="tenant-q")
    parsed = keys.load(path)
    parsed.tenants["tenant-q"] = keys.Limits(images_per_minute=1)
    keys.save(path, parsed)
    time.sleep(0.3)  # the keys file's reload interval
    assert len(generate(stub_for(stack, first)).images) == 1
    error = refusal(lambda: generate(stub_for(stack, second)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert limit_of(error) == "tenant_images_per_minute" and retry_after(error) > 0


def test_max_concurrent_per_key(stack):
    key = new_key(stack, "one-at-a-time", max_concurrent=1)
    stub = stub_for(stack, key)
    slow = pb.SamplingParams(prior_num_inference_steps=2, decoder_num_inference_steps=400)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="a red circle", size=32, params=slow), timeout=120)
    first = next(stream)  # accepted: the request is in progress
    assert first.HasField("accepted")
    try:
        error = refusal(lambda: generate(stub))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit_of(error) == "max_concurrent"
    finally:
        stream.cancel()
    deadline = time.monotonic() + 30  # the slot comes back once the cancelled request has ended
    while True:
        try:
            assert len(generate(stub).images) == 1
            break
        except grpc.RpcError as error:
            assert limit_of(error) == "max_concurrent" and time.monotonic() < deadline
            time.sleep(0.2)


def test_the_compute_ceiling_names_the_fields(stack):
    huge = pb.SamplingParams(prior_num_inference_steps=1000, prior_num_candidates=16)
    with stack.channel() as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        error = refusal(lambda: generate(stub, n=10, params=huge))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.prior_num_candidates" in error.details() and "ceiling" in error.details()


def test_the_per_caller_cap_keys_on_the_key_not_on_user(stack):
    """Varying `user` does not buy more requests in flight: the cap follows the authenticated key."""
    key = new_key(stack, "many-users")
    stub = stub_for(stack, key)
    slow = pb.SamplingParams(prior_num_inference_steps=2, decoder_num_inference_steps=400)
    streams = []
    try:
        for i in range(4):  # the shared stack's --max-inflight-per-caller (4), each with its own `user`
            request = pb.GenerateRequest(prompt="a red circle", size=32, params=slow, user=f"u{i}")
            streams.append(stub.GenerateStream(request, timeout=120))
            assert next(streams[-1]).HasField("accepted")
        request = pb.GenerateRequest(prompt="a red circle", size=32, params=FAST, user="u-fifth")
        error = refusal(lambda: stub.Generate(request, timeout=60))
        assert (
            error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and limit_of(error) == "max_inflight_per_caller"
        )
    finally:
        for stream in streams:
            stream.cancel()
    threading.Event().wait(0.5)
