"""The safety service as a process: bad input gets INVALID_ARGUMENT naming the field (and it stays SERVING), a
bad policy at start exits 1 naming the line, SIGTERM drains, and refusals carry ErrorInfo
CONTENT_POLICY_VIOLATION."""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from safety_helpers import ROOT, health, images_tensor, prompt_request, service_env

from services.safety.refusal import REASON, parse_refusal, refusal_status
from unclip.v1 import safety_pb2, safety_pb2_grpc, tensor_pb2

POLICY = """\
version: svc-1
categories:
  violence: {action: block}
filters:
  words: {type: blocklist, terms: {violence: [behead]}}
stages:
  prompt: [words]
"""


def images_request(images, stage=safety_pb2.CHECK_STAGE_FINAL_OUTPUT, embeds=None):
    request = safety_pb2.CheckImagesRequest(images=images_tensor(images), stage=stage)
    if embeds is not None:
        request.image_embeds.CopyFrom(images_tensor(embeds))
    return request


GOOD_IMAGES = np.zeros((2, 3, 8, 8), np.float32)
BAD_REQUESTS = [
    ("CheckPrompt", safety_pb2.CheckPromptRequest(prompt=""), "prompt is required"),
    ("CheckPrompt", safety_pb2.CheckPromptRequest(prompt="x" * 1001), "prompt must be at most 1000"),
    ("CheckImages", safety_pb2.CheckImagesRequest(stage=4), "images is required"),
    ("CheckImages", images_request(GOOD_IMAGES, stage=0), "stage must be"),
    ("CheckImages", images_request(GOOD_IMAGES, stage=safety_pb2.CHECK_STAGE_PROMPT), "stage must be"),
    ("CheckImages", images_request(np.zeros((2, 8, 8), np.float32)), "images must have shape"),
    ("CheckImages", images_request(np.zeros((1, 3, 8, 4), np.float32)), "images must be square"),
    ("CheckImages", images_request(np.full((1, 3, 4, 4), np.nan, np.float32)), "images contains NaN"),
    ("CheckImages", images_request(np.zeros((11, 3, 4, 4), np.float32)), "images must hold 1..10"),
    (
        "CheckImages",
        images_request(GOOD_IMAGES, embeds=np.zeros((3, 8), np.float32)),
        "image_embeds must have",
    ),
    (
        "CheckImages",
        safety_pb2.CheckImagesRequest(
            images=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT16, shape=[1, 3, 2, 2], data=b"\0" * 24),
            stage=4,
        ),
        "images must be DATA_TYPE_FLOAT32",
    ),
    (
        "CheckImages",
        safety_pb2.CheckImagesRequest(
            images=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 3, 2, 2], data=b"\0" * 5),
            stage=4,
        ),
        "images: 5 bytes do not match",
    ),
]


def test_bad_input_names_the_field_and_the_service_stays_serving(start_safety):
    safety = start_safety(POLICY)
    for method, request, message in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as error:
            getattr(safety.stub, method)(request, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, error.value.details())
        assert message in error.value.details()
    assert health(safety.addr) == "SERVING"
    reply = safety.stub.CheckImages(images_request(GOOD_IMAGES), timeout=10)
    assert reply.action == safety_pb2.ACTION_ALLOW and len(reply.verdicts) == 2  # no image filters: allowed


def test_bad_policy_at_start_exits_1_naming_the_line(tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text(POLICY.replace("action: block", "action: nuke"))
    proc = subprocess.run(
        [sys.executable, "-m", "services.safety", "--port", "0", "--policy", str(policy), "--audit-dir",
         str(tmp_path / "audit")],
        cwd=ROOT, env=service_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"{policy}:3: categories.violence.action: 'nuke' is not one of" in proc.stderr


def test_sigterm_stops_cleanly_and_closes_the_audit_log(start_safety):
    safety = start_safety(POLICY)
    safety.stub.CheckPrompt(prompt_request("behead", request_id="last"), timeout=10)
    safety.proc.send_signal(signal.SIGTERM)
    assert safety.proc.wait(30) == 0
    assert safety.records()[-1]["request_id"] == "last"


class _Refuser(safety_pb2_grpc.SafetyServicer):
    """What the orchestrator does with a BLOCK: abort with the refusal status."""

    def CheckPrompt(self, request, context):
        context.abort_with_status(refusal_status(safety_pb2.CHECK_STAGE_PROMPT, ["violence", "gore"], "v9"))


def test_refusal_round_trips_over_grpc():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    safety_pb2_grpc.add_SafetyServicer_to_server(_Refuser(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as error:
                safety_pb2_grpc.SafetyStub(channel).CheckPrompt(prompt_request("anything"), timeout=10)
    finally:
        server.stop(0)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refusal = parse_refusal(error.value)
    assert refusal is not None and refusal.stage == "prompt" and refusal.categories == ["gore", "violence"]
    assert refusal.policy_version == "v9"
    assert "content_policy_violation" in error.value.details() and REASON == "CONTENT_POLICY_VIOLATION"
    # Never a score or a listed term in what the caller sees.
    assert "score" not in error.value.details() and "behead" not in error.value.details()
