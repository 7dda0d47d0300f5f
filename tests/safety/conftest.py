"""Fixtures for the safety tests: the real safety service as its own process, started with a policy the test
writes.

`start_safety(policy_text)` returns a running service (`.addr`, `.stub`, `.proc`, `.policy`, `.audit_dir`,
`.write_policy(text)`, `.records()`); every process a test starts is stopped at the end of the test.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from safety_helpers import Process, Safety, spawn, stop, wait_serving

from unclip.v1 import safety_pb2_grpc


@pytest.fixture
def start_safety(tmp_path) -> Callable[..., Safety]:
    started: list[Safety] = []

    def start(
        policy: str, *, audit_dir: Path | None = None, extra: list[str] = (), poll: float = 0.2
    ) -> Safety:
        policy_path = tmp_path / f"policy-{len(started)}.yaml"
        policy_path.write_text(textwrap.dedent(policy))
        audit = audit_dir or tmp_path / f"audit-{len(started)}"
        args = ["-m", "services.safety", "--host", "127.0.0.1", "--port", "0", "--policy", str(policy_path)]
        args += [
            "--audit-dir",
            str(audit),
            "--policy-poll-seconds",
            str(poll),
            "--grace-seconds",
            "5",
            *extra,
        ]
        process = spawn(args)
        wait_serving(process)
        channel = grpc.insecure_channel(process.addr)
        safety = Safety(process, policy_path, audit, channel, safety_pb2_grpc.SafetyStub(channel))
        started.append(safety)
        return safety

    yield start
    for safety in started:
        safety.channel.close()
        stop(safety.proc)


@pytest.fixture
def spawn_process():
    """Starts helper processes (an external filter, an encoder) and stops them at the end of the test."""
    started: list[Process] = []

    def start(args: list[str], **kwargs) -> Process:
        process = spawn(args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        stop(process.proc)
