"""External filters: a separate gRPC server implementing the Safety contract, plugged in by editing the policy
while the safety service runs; fail-closed and fail-open when it is killed (SIGKILL) during a burst of
requests."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from safety_helpers import HERE, images_tensor, prompt_request

from unclip.v1 import safety_pb2

BASE = """\
version: {version}
categories:
  violence: {{action: block}}
filters:
  words: {{type: blocklist, terms: {{violence: [behead]}}}}
{extra_filters}
stages:
  prompt: [{prompt_filters}]
  final_output: [{image_filters}]
"""


def policy(version: str, external: str | None = None, fail_open: bool = False) -> str:
    extra = ""
    if external:
        flag = str(fail_open).lower()
        extra = f"  vendor: {{type: external, address: '{external}', timeout_seconds: 2, fail_open: {flag}}}"
    return BASE.format(
        version=version,
        extra_filters=extra,
        prompt_filters="words, vendor" if external else "words",
        image_filters="vendor" if external else "",
    )


def start_external(spawn_process, *args: str):
    return spawn_process([str(HERE / "external_filter.py"), "--port", "0", *args])


def test_external_filter_plugged_in_by_editing_the_policy(start_safety, spawn_process):
    safety = start_safety(policy("without-vendor"))
    request = prompt_request("a pineapple on a table", request_id="r-1", user="alice")
    assert safety.stub.CheckPrompt(request, timeout=10).action == safety_pb2.ACTION_ALLOW

    vendor = start_external(spawn_process, "--word", "pineapple", "--category", "fruit", "--action", "block")
    safety.write_policy(policy("with-vendor", external=vendor.addr))
    safety.wait_version("with-vendor")

    reply = safety.stub.CheckPrompt(request, timeout=10)
    assert reply.action == safety_pb2.ACTION_BLOCK
    # A category the policy does not list takes the vendor's own action.
    assert list(reply.verdicts[0].categories) == ["fruit"]
    assert safety.stub.CheckPrompt(prompt_request("a banana"), timeout=10).action == safety_pb2.ACTION_ALLOW

    # Images: the vendor withholds bright ones, the others pass (withhold: per image, not the whole request).
    images = np.full((4, 3, 8, 8), -0.5, np.float32)
    images[[1, 3]] = 0.9
    reply = safety.stub.CheckImages(
        safety_pb2.CheckImagesRequest(
            images=images_tensor(images), stage=safety_pb2.CHECK_STAGE_FINAL_OUTPUT
        ),
        timeout=10,
    )
    assert [v.action for v in reply.verdicts] == [
        safety_pb2.ACTION_ALLOW, safety_pb2.ACTION_BLOCK, safety_pb2.ACTION_ALLOW, safety_pb2.ACTION_BLOCK,
    ]  # fmt: skip
    # The audit log names the filter and what it said.
    record = next(r for r in safety.records() if r["request_id"] == "r-1" and r["action"] == "block")
    assert record["user"] == "alice" and record["policy_version"] == "with-vendor"
    assert any(f["filter"] == "vendor" and f["scores"][0]["category"] == "fruit" for f in record["filters"])


def burst_while_killing(safety, vendor) -> list[tuple[float, int, list[str]]]:
    """Sends prompts from 4 threads for ~3 s, SIGKILLs the vendor after ~1 s.

    Returns (seconds after the kill, action, categories) per answer."""
    results: list[tuple[float, int, list[str]]] = []
    lock = threading.Lock()
    stop = time.monotonic() + 3.0

    def worker(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            reply = safety.stub.CheckPrompt(
                prompt_request(f"a quiet lake {k}-{i}", request_id=f"b{k}-{i}"), timeout=10
            )
            with lock:
                results.append((time.monotonic(), reply.action, list(reply.verdicts[0].categories)))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(worker, k) for k in range(4)]
        time.sleep(1.0)
        os.kill(vendor.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for f in futures:
            f.result()
    vendor.proc.wait()
    return [(t - killed_at, a, c) for t, a, c in results]


def test_fail_closed_when_the_external_filter_is_killed(start_safety, spawn_process):
    vendor = start_external(spawn_process)
    safety = start_safety(policy("closed", external=vendor.addr))
    results = burst_while_killing(safety, vendor)
    before = [r for r in results if r[0] < 0]
    after = [r for r in results if r[0] > 0.5]  # allow the in-flight calls at the kill to settle
    assert before and all(a == safety_pb2.ACTION_ALLOW for _, a, _ in before)
    assert after and all(a == safety_pb2.ACTION_BLOCK and c == ["filter_unavailable"] for _, a, c in after)
    errors = [f for r in safety.records() for f in r["filters"] if "error" in f]
    assert errors and all(f["filter"] == "vendor" and f["fail_open"] is False for f in errors)


def test_fail_open_when_the_policy_says_so(start_safety, spawn_process):
    vendor = start_external(spawn_process)
    safety = start_safety(policy("open", external=vendor.addr, fail_open=True))
    results = burst_while_killing(safety, vendor)
    assert all(a == safety_pb2.ACTION_ALLOW for _, a, _ in results)
    assert any(t > 0.5 for t, _, _ in results)
    errors = [f for r in safety.records() for f in r["filters"] if "error" in f]
    assert errors and all(f["fail_open"] is True for f in errors)
    # Other filters still run while the vendor is down.
    reply = safety.stub.CheckPrompt(prompt_request("behead"), timeout=10)
    assert reply.action == safety_pb2.ACTION_BLOCK and list(reply.verdicts[0].categories) == ["violence"]


def test_unreachable_at_start_fails_closed(start_safety):
    safety = start_safety(policy("nobody-home", external="127.0.0.1:1"))
    reply = safety.stub.CheckPrompt(prompt_request("a quiet lake"), timeout=10)
    assert reply.action == safety_pb2.ACTION_BLOCK
    assert list(reply.verdicts[0].categories) == ["filter_unavailable"]
