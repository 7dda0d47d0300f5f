"""Helpers of the safety tests (imported by name; the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.safety.audit import read_records
from unclip.v1 import safety_pb2, safety_pb2_grpc, tensor_pb2

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def service_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["UNCLIP_METRICS_PORT"] = "0"
    env["OMP_NUM_THREADS"] = "1"
    return env


@dataclass
class Process:
    """A service process started by a test; its output is collected in `.output`."""

    proc: subprocess.Popen
    addr: str = ""
    output: list[str] = field(default_factory=list)
    _port_found: threading.Event = field(default_factory=threading.Event)

    def text(self) -> str:
        return "".join(self.output)


def spawn(args: list[str], *, pattern: str = r"listening on [\w.]+:(\d+)", timeout: float = 120.0) -> Process:
    """Starts `python args...`, reads its output, and waits for the "listening on host:port" line."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=service_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    process = Process(proc)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            process.output.append(line)
            match = re.search(pattern, line)
            if match and not process.addr:
                process.addr = f"127.0.0.1:{match.group(1)}"
                process._port_found.set()
        process._port_found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not process._port_found.wait(timeout) or not process.addr:
        proc.kill()
        raise RuntimeError(f"{args} did not start:\n{process.text()}")
    return process


def health(addr: str) -> str:
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as error:
            return f"UNREACHABLE ({error.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(process: Process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"the service exited with {process.proc.returncode}:\n{process.text()}")
        if health(process.addr) == "SERVING":
            return
        time.sleep(0.1)
    raise RuntimeError(f"the service did not become SERVING:\n{process.text()}")


@dataclass
class Safety:
    process: Process
    policy: Path
    audit_dir: Path
    channel: grpc.Channel
    stub: safety_pb2_grpc.SafetyStub

    @property
    def addr(self) -> str:
        return self.process.addr

    @property
    def proc(self) -> subprocess.Popen:
        return self.process.proc

    def write_policy(self, text: str) -> None:
        """Replaces the policy file atomically (as a deployment tool would)."""
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(textwrap.dedent(text))
        os.replace(tmp, self.policy)

    def records(self, event: str = "decision") -> list[dict]:
        return [r for r in read_records(self.audit_dir) if r.get("event") == event]

    def wait_version(self, version: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.stub.CheckPrompt(safety_pb2.CheckPromptRequest(prompt="a quiet lake"), timeout=5)
            if reply.policy_version == version:
                return
            time.sleep(0.1)
        raise AssertionError(f"policy {version} did not take effect:\n{self.process.text()}")

    def wait_rejected(self, count: int, timeout: float = 20.0) -> None:
        """Waits until `count` policy reloads have been rejected (as the audit trail records them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.records("policy_rejected")) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"no policy rejection recorded:\n{self.process.text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def images_tensor(images: np.ndarray) -> tensor_pb2.Tensor:
    images = np.ascontiguousarray(images, dtype=np.float32)
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=list(images.shape), data=images.tobytes()
    )


def prompt_request(prompt: str, request_id: str = "", user: str = "") -> safety_pb2.CheckPromptRequest:
    return safety_pb2.CheckPromptRequest(
        prompt=prompt, context=safety_pb2.RequestContext(request_id=request_id, user=user)
    )
