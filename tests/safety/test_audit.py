"""The audit trail: durable before the answer (SIGKILL during a burst loses no answered decision), rotation
and the shipping hook, torn tails, and the command that prints and filters it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from safety_helpers import ROOT, prompt_request, service_env

from services.safety.audit import AuditLog, read_records
from unclip.v1 import safety_pb2

POLICY = """\
version: audit-1
categories:
  violence: {action: block}
filters:
  words: {type: blocklist, terms: {violence: [behead]}}
stages:
  prompt: [words]
"""


def test_sigkill_during_a_burst_loses_no_answered_decision(start_safety, tmp_path):
    audit_dir = tmp_path / "audit"
    safety = start_safety(POLICY, audit_dir=audit_dir)
    answered: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def worker(k: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            request_id = f"w{k}-{i}"
            prompt = "behead" if i % 3 == 0 else "a calm sea"
            try:
                reply = safety.stub.CheckPrompt(
                    prompt_request(prompt, request_id, user=f"user{k}"), timeout=10
                )
            except grpc.RpcError:
                return  # the service is gone: this request was not answered
            with lock:
                answered[request_id] = reply.action

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, k) for k in range(8)]
        time.sleep(1.5)
        os.kill(safety.proc.pid, signal.SIGKILL)  # at an arbitrary moment, mid-burst
        stop.set()
        for f in futures:
            f.result()
    assert safety.proc.wait(10) == -signal.SIGKILL
    assert len(answered) > 20

    # Restart on the same directory: the new process writes a new segment and the old records are all there.
    again = start_safety(POLICY, audit_dir=audit_dir)
    again.stub.CheckPrompt(prompt_request("after restart", "after"), timeout=10)
    logged = {r["request_id"]: r for r in again.records()}
    missing = sorted(set(answered) - set(logged))
    assert not missing, f"{len(missing)} answered decisions are not in the audit log: {missing[:5]}"
    expected = {safety_pb2.ACTION_BLOCK: "block", safety_pb2.ACTION_ALLOW: "allow"}
    assert all(logged[rid]["action"] == expected[action] for rid, action in answered.items())
    assert "after" in logged
    assert len(list(audit_dir.glob("audit-*.jsonl"))) == 2


def test_records_carry_what_the_issue_lists(start_safety):
    safety = start_safety(POLICY)
    request = safety_pb2.CheckPromptRequest(
        prompt="b3h3ad",
        context=safety_pb2.RequestContext(request_id="r-7", user="bob", identity="svc:frontend"),
    )
    safety.stub.CheckPrompt(request, timeout=10)
    [record] = [r for r in safety.records() if r["request_id"] == "r-7"]
    # Sent in clear by a caller that did not authenticate as the orchestrator: recorded, marked unverified.
    assert record["user"] == "bob" and record["identity"] == "unverified:svc:frontend"
    assert (
        record["stage"] == "prompt" and record["action"] == "block" and record["policy_version"] == "audit-1"
    )
    assert record["verdicts"] == [{"index": 0, "action": "block", "categories": ["violence"]}]
    [scored] = record["filters"]
    assert scored["filter"] == "words" and scored["scores"][0]["score"] == 1.0
    assert scored["scores"][0]["detail"] == "term:behead"
    assert record["time"].endswith("Z") and "prompt" not in record and len(record["prompt_sha256"]) == 64


def test_rotation_ships_closed_segments_once(tmp_path):
    shipped: list[str] = []
    log = AuditLog(tmp_path, max_segment_bytes=300, on_segment_closed=lambda path: shipped.append(path.name))
    for i in range(12):
        log.append({"event": "decision", "request_id": f"r{i}", "pad": "x" * 60})
    log.close()
    segments = sorted(tmp_path.glob("audit-*.jsonl"))
    assert len(segments) >= 4
    assert [r["request_id"] for r in read_records(tmp_path)] == [f"r{i}" for i in range(12)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(list(tmp_path.glob("*.shipped"))) < len(segments):
        time.sleep(0.05)
    assert sorted(p.name.removesuffix(".shipped") for p in tmp_path.glob("*.shipped")) == [
        s.name for s in segments
    ]
    assert len(shipped) == len(set(shipped)) == len(segments)

    # A new process ships nothing twice; a failing shipper leaves the marker off, so the next start retries.
    calls: list[str] = []
    AuditLog(tmp_path, on_segment_closed=calls.append).close()
    time.sleep(0.3)
    assert calls == []


def test_a_failed_shipment_is_retried(tmp_path):
    AuditLog(tmp_path).append({"event": "decision", "request_id": "a"})  # left open, as by a crash
    attempts: list[str] = []

    def flaky(path: Path) -> None:
        attempts.append(path.name)
        if len(attempts) == 1:
            raise ConnectionError("bucket unreachable")

    AuditLog(tmp_path, on_segment_closed=flaky)
    time.sleep(0.3)
    AuditLog(tmp_path, on_segment_closed=flaky)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(list(tmp_path.glob("*.shipped"))) < 1:
        time.sleep(0.05)
    assert len(attempts) >= 2 and attempts[0] == attempts[1]


def test_a_torn_last_line_is_skipped(tmp_path):
    log = AuditLog(tmp_path)
    log.append({"event": "decision", "request_id": "whole"})
    with open(log.current_segment, "a") as f:
        f.write('{"event": "decision", "request_id": "torn"')  # a crash mid-write: never answered
    assert [r["request_id"] for r in read_records(tmp_path)] == ["whole"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unclip.audit_cli", *args], cwd=ROOT, env=service_env(), capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_audit_command_prints_and_filters(start_safety):
    safety = start_safety(POLICY)
    for i, (prompt, user) in enumerate(
        [("behead", "alice"), ("a calm sea", "alice"), ("b.e.h.e.a.d", "bob")]
    ):
        safety.stub.CheckPrompt(prompt_request(prompt, f"q{i}", user=user), timeout=10)
    directory = str(safety.audit_dir)

    out = run_cli("--dir", directory, "--action", "block")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("block" in line and "categories=violence" in line for line in lines)
    assert "request=q0" in lines[0] and "user=alice" in lines[0] and "request=q2" in lines[1]

    out = run_cli("--dir", directory, "--user", "alice", "--json")
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["request_id"] for r in records] == ["q0", "q1"]

    out = run_cli("--dir", directory, "--since", "2999-01-01T00:00:00Z")
    assert out.returncode == 0 and out.stdout == ""
    out = run_cli("--dir", directory, "--events")
    assert "policy_loaded" in out.stdout

    assert run_cli("--dir", directory + "-absent").returncode == 2
    bad = run_cli("--dir", directory, "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr
