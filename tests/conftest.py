"""Session fixtures shared by the service and end-to-end tests.

`stack_model_dir`: a tiny random model with two upsampler stages (32 -> 64 -> 128 px) and the image encoder,
so one stack covers text-to-image, variations, edits and the two-stage cascade.
`stack`: ONE multi-process stack on that model (each stage its own process, real gRPC on loopback), started
once per session, with access control on as `unclip up` has it (API keys at the orchestrator, mTLS between the
services): `stack.channel(name)` and `stack.env` carry the credentials. Tests using it must leave it as they
found it; tests that kill or reconfigure start their own.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Stages started by tests compute with one torch thread: the parity tests compare with one-thread in-process
# references, and a step's rounding can depend on the thread count (the services default to automatic).
os.environ.setdefault("UNCLIP_TORCH_THREADS", "1")
# ... and with diffusers' contiguous UNets: channels-last (the services' default) rounds differently, by the
# drift tests/unit/test_compute_options.py bounds.
os.environ.setdefault("UNCLIP_CHANNELS_LAST", "0")
# ... and in float32, as the reference pipelines compute (the services' default "auto" picks bfloat16 on a CPU
# with native bfloat16; tests/unit/test_dtype.py and tests/e2e/test_compute_flags.py check that path).
os.environ.setdefault("UNCLIP_DTYPE", "float32")
# `unclip up` started by a test publishes its state (unclip.stack_state) here, not over a person's stack.
os.environ["UNCLIP_STATE_DIR"] = tempfile.mkdtemp(prefix="unclip-test-state-")


@pytest.fixture(scope="session")
def stack_model_dir(tmp_path_factory) -> Path:
    from unclip.tiny import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("stack-model") / "model", super_res_stages=2, variation=True
    )


@dataclass
class RunningStack:
    address: str  # the orchestrator's host:port
    addresses: dict[str, str]  # process name ("encoder", "prior", "decoder", "super_res", ...) -> host:port
    model_dir: Path
    log_dir: Path
    running: Any = None  # the unclip.stack.Stack (its keys file, certificates, health-only ports)
    pids: dict[str, int] = field(default_factory=dict)  # process name -> pid (RSS reads from /proc/<pid>)

    @property
    def env(self) -> dict[str, str]:
        """Environment for a CLI subprocess talking to this stack (os.environ + its address and API key)."""
        return {**os.environ, **self.running.client_env()}

    def channel(self, name: str = "orchestrator"):
        """A channel to one process, with its credentials (the API key; a client certificate for stages)."""
        return self.running.channel(name)

    def health_address(self, name: str) -> str:
        """Where a plaintext grpc.health.v1 check reaches the process (a stage's health-only port)."""
        return next(p.probe_address for p in self.running.processes if p.name == name)


@pytest.fixture(scope="session")
def stack(stack_model_dir, tmp_path_factory):
    from unclip.stack import Stack

    log_dir = tmp_path_factory.mktemp("stack-logs")
    running = Stack(model=str(stack_model_dir), port=0, log_dir=log_dir, grace_seconds=5.0)
    address = running.start(timeout=300)
    try:
        yield RunningStack(
            address=address,
            addresses={p.name: p.address for p in running.processes},
            model_dir=stack_model_dir,
            log_dir=log_dir,
            running=running,
            pids={p.name: p.popen.pid for p in running.processes if p.popen is not None},
        )
    finally:
        running.stop()


@pytest.fixture(scope="session")
def image_service(stack):
    """The shared stack's orchestrator: an ImageService stub on a channel carrying its API key."""
    from unclip.v1 import orchestrator_pb2_grpc

    with stack.channel() as channel:
        yield orchestrator_pb2_grpc.ImageServiceStub(channel)


@pytest.fixture(scope="session")
def stack_engines(stack):
    """The shared stack's weights loaded in this process the way the stages load them (encoder, prior,
    decoder, first upsampler): what in-process diffusers references are built from."""
    import torch

    from services.decoder.engine import DecoderEngine, UpsamplerEngine
    from services.encoder.engine import EncoderEngine
    from services.prior.engine import PriorEngine

    torch.set_num_threads(1)  # as the stages compute (UNCLIP_TORCH_THREADS above)
    return (
        EncoderEngine.from_pretrained(stack.model_dir),
        PriorEngine.from_pretrained(stack.model_dir),
        DecoderEngine.from_pretrained(stack.model_dir),
        UpsamplerEngine.from_pretrained(stack.model_dir, "super_res"),
    )
