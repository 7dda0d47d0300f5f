"""The policy as the orchestrator enforces it, on a real stack (every stage its own process, tiny random
model): the prompt is refused before any model work (CLI exit 3), withheld images are dropped and the others
returned, decoder outputs are checked before upsampler compute is spent, and SIGKILLing the orchestrator
during a burst loses no audit record of an answered request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from safety_helpers import HERE, ROOT, service_env, spawn, stop, wait_serving

from services.safety.audit import read_records
from services.safety.refusal import parse_refusal
from unclip.access.client import with_key
from unclip.stack import Stack
from unclip.tiny import make_tiny_model
from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

STEPS = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("orchestrated")
    model = make_tiny_model(root / "model")
    vendor = spawn([str(HERE / "external_filter.py"), "--port", "0", "--bright", "2.0"])
    policy = root / "policy.yaml"
    policy.write_text(
        "version: orchestrated-1\n"
        "categories:\n  violence: {action: block}\n"
        "filters:\n"
        "  words: {type: blocklist, terms: {violence: [behead]}}\n"
        f"  vendor: {{type: external, address: '{vendor.addr}', timeout_seconds: 30}}\n"
        "stages:\n  prompt: [words]\n  decoder_output: [vendor]\n  final_output: [vendor]\n"
    )
    env = {
        k: v for k, v in service_env().items() if k.startswith(("UNCLIP_", "OMP_", "HF_", "TRANSFORMERS_"))
    }
    # The burst's six workers share the stack's one key: the per-caller cap follows the key, not `user`.
    env["UNCLIP_MAX_INFLIGHT_PER_CALLER"] = "8"
    running = Stack(model=str(model), port=0, log_dir=root / "logs", safety_policy=str(policy), extra_env=env)
    try:
        address = running.start(timeout=600)
        running.address_ = address
        running.vendor = vendor
        running.audit_dir = root / "logs" / "audit"
        running.policy = policy
        running.channel = running.channel("orchestrator")  # with the stack's API key
        running.stub = orchestrator_pb2_grpc.ImageServiceStub(running.channel)
        yield running
    finally:
        running.stop()
        stop(vendor.proc)


def generate(stack, prompt: str, n: int = 1, user: str = "", seed: int = 7):
    request = orchestrator_pb2.GenerateRequest(
        prompt=prompt, n=n, seed=seed, user=user, params=orchestrator_pb2.SamplingParams(**STEPS)
    )
    return stack.stub.Generate(request, timeout=300)


def decisions(stack, request_id: str) -> list[dict]:
    return [r for r in read_records(stack.audit_dir) if r.get("request_id") == request_id]


def test_prompt_refused_before_any_model_work_and_cli_exits_3(stack, tmp_path):
    cli = subprocess.run(
        [sys.executable, "-m", "unclip.cli", "generate", "please b.e.h.e.a.d him", "--addr", stack.address_,
         "--out", str(tmp_path), "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2"],
        cwd=ROOT, env={**service_env(), **stack.client_env()}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 3, cli.stderr
    assert "prompt" in cli.stderr and "violence" in cli.stderr
    assert "behead" not in cli.stderr.replace("b.e.h.e.a.d", "")  # the listed term itself is never echoed
    assert not list(tmp_path.glob("*.png"))

    with pytest.raises(grpc.RpcError) as error:
        generate(stack, "b3h3ad", user="carol")
    refusal = parse_refusal(error.value)
    assert refusal is not None and refusal.stage == "prompt" and refusal.categories == ["violence"]
    [record] = [r for r in read_records(stack.audit_dir) if r.get("user") == "carol"]
    # Only the prompt was checked for this request: nothing went further.
    assert record["stage"] == "prompt" and record["action"] == "block"
    assert decisions(stack, record["request_id"]) == [record]


def test_withheld_images_are_dropped_and_the_others_returned(stack):
    user = "withhold:decoder_output=2;final_output=1"
    response = generate(stack, "a red circle", n=4, user=user)
    # Decoder output: image 2 withheld before the upsampler; final: position 1 of the 3 left (image 1)
    # withheld.
    assert [image.index for image in response.images] == [0, 3]
    assert response.withheld == 2 and list(response.withheld_categories) == ["vendor_nsfw"]
    assert [image.seed for image in response.images] == [7, 10]
    # The vendor filter's output reaches the test through a reader thread: wait (bounded) for both lines.
    deadline = time.monotonic() + 30
    while True:
        checks = [line for line in stack.vendor.text().splitlines() if f"user={user}" in line]
        if len(checks) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert checks == [
        f"check stage=decoder_output n=4 user={user}",
        f"check stage=final_output n=3 user={user}",
    ]
    by_stage = {r["stage"]: r for r in decisions(stack, response.request_id)}
    assert set(by_stage) == {"prompt", "decoder_output", "final_output"}
    assert [v["action"] for v in by_stage["decoder_output"]["verdicts"]] == [
        "allow",
        "allow",
        "withhold",
        "allow",
    ]
    assert by_stage["final_output"]["action"] == "withhold"


def test_a_blocked_final_image_refuses_the_request(stack):
    with pytest.raises(grpc.RpcError) as error:
        generate(stack, "a red circle", n=2, user="block:final_output")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refusal = parse_refusal(error.value)
    assert refusal is not None and refusal.stage == "final_output" and refusal.categories == ["vendor_nsfw"]


def wait_policy(stack, version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(
            r.get("version") == version
            for r in read_records(stack.audit_dir)
            if r["event"] == "policy_loaded"
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"policy {version} was not loaded")


def test_clip_concepts_join_the_running_stack_by_a_policy_edit(stack):
    """The CLIP-concept filter, added to the running stack's policy, embeds prompts and the generated images
    with the stack's own encoder service."""
    encoder = next(p.address for p in stack.processes if p.name == "encoder")
    original = stack.policy.read_text()
    edited = original.replace("version: orchestrated-1", "version: orchestrated-2")
    edited = edited.replace("categories:\n", "categories:\n  gore: {action: block}\n")
    edited = edited.replace(
        "filters:\n",
        f"filters:\n  concepts: {{type: clip_concepts, encoder_addr: '{encoder}', "
        "concepts: [{name: gore, category: gore, text: 'a photo of gore', threshold: 0.9999}]}\n",
    )
    edited = edited.replace("prompt: [words]", "prompt: [words, concepts]")
    edited = edited.replace("final_output: [vendor]", "final_output: [concepts, vendor]")
    stack.policy.with_suffix(".tmp").write_text(edited)
    os.replace(stack.policy.with_suffix(".tmp"), stack.policy)
    try:
        wait_policy(stack, "orchestrated-2")
        # A prompt the concept text itself (cosine 1) is refused at the prompt stage.
        with pytest.raises(grpc.RpcError) as error:
            generate(stack, "a photo of gore")
        refusal = parse_refusal(error.value)
        assert refusal is not None and refusal.stage == "prompt" and refusal.categories == ["gore"]
        # Another prompt passes; both images were embedded by the encoder and scored against the concept.
        response = generate(stack, "a red circle", n=2)
        assert len(response.images) == 2
        by_stage = {r["stage"]: r for r in decisions(stack, response.request_id)}
        final = next(f for f in by_stage["final_output"]["filters"] if f["filter"] == "concepts")
        assert [s["index"] for s in final["scores"]] == [0, 1]
        assert all(-1 <= s["score"] <= 1 and not s["hit"] for s in final["scores"])
        assert any(f["filter"] == "concepts" for f in by_stage["prompt"]["filters"])
    finally:
        stack.policy.with_suffix(".tmp").write_text(original.replace("orchestrated-1", "orchestrated-3"))
        os.replace(stack.policy.with_suffix(".tmp"), stack.policy)
        wait_policy(stack, "orchestrated-3")


def test_orchestrator_sigkill_during_a_burst_loses_no_audit_record(stack):
    orchestrator = stack.processes[-1]
    answered: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(50):
            try:
                response = generate(stack, f"a small boat {k} {i}", user=f"burst{k}", seed=k * 100 + i)
            except grpc.RpcError:
                return  # the orchestrator is gone: not answered
            with lock:
                answered.append(response.request_id)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(worker, k) for k in range(6)]
        deadline = time.monotonic() + 120
        while len(answered) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(orchestrator.popen.pid, signal.SIGKILL)  # requests in flight at every stage
        for f in futures:
            f.result()
    assert len(answered) >= 6

    # A new orchestrator on the same stages; then compare the answered requests with the audit log.
    again = spawn(orchestrator.argv[1:])
    try:
        wait_serving(again)
        with with_key(grpc.insecure_channel(again.addr), stack.api_key) as channel:
            stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
            request = orchestrator_pb2.GenerateRequest(
                prompt="after the restart", seed=1, params=orchestrator_pb2.SamplingParams(**STEPS)
            )
            answered.append(stub.Generate(request, timeout=300).request_id)
    finally:
        stop(again.proc)
    logged: dict[str, set[str]] = {}
    for record in read_records(stack.audit_dir):
        if record.get("event") == "decision":
            logged.setdefault(record["request_id"], set()).add(record["stage"])
    missing = [rid for rid in answered if logged.get(rid) != {"prompt", "decoder_output", "final_output"}]
    assert not missing, f"answered requests without their full audit trail: {missing}"
