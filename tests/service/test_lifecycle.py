"""A stage process's life: NOT_SERVING (and UNAVAILABLE) until its weights are loaded, SERVING after; a
cancelled call stops its denoising loop within a step; on SIGTERM it stops taking calls, finishes the one in
flight and exits 0. Children of the stack die with it (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch

from unclip.rng import generators_from_seed
from unclip.runtime.server import create_channel, health_status, wait_for_serving
from unclip.runtime.tensors import encode_generators, from_proto, to_proto
from unclip.v1 import decoder_pb2, decoder_pb2_grpc


def start_stage(args: list[str], log_path) -> tuple[subprocess.Popen, str]:
    """Starts a service and returns it with its address, as soon as it announces its port (before loading)."""
    log = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = process.stdout.readline()  # the first line is "<name> listening on host:port"
    assert "listening on" in line, (line, log_path.read_text())
    return process, line.split("listening on ")[1].strip()


def upsample_request(steps: int) -> decoder_pb2.UpsampleRequest:
    return decoder_pb2.UpsampleRequest(
        images=to_proto(torch.zeros(1, 3, 32, 32)),
        generators=encode_generators(generators_from_seed(0, 1)),
        num_inference_steps=steps,
    )


def test_not_serving_until_loaded_and_sigterm_lets_the_request_finish(stack_model_dir, tmp_path):
    process, address = start_stage(
        [
            "services.decoder",
            "--model",
            str(stack_model_dir),
            "--stage",
            "super_res",
            "--grace-seconds",
            "60",
        ],
        tmp_path / "super_res.log",
    )
    try:
        channel = create_channel(address)
        stub = decoder_pb2_grpc.UpsamplerStub(channel)
        # Listening, but the weights are still loading: health says so, and calls are refused as UNAVAILABLE.
        assert health_status(address) == "NOT_SERVING"
        assert health_status(address, "unclip.v1.Upsampler") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as caught:
            stub.Upsample(upsample_request(2), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        assert wait_for_serving(address, timeout=120, is_alive=lambda: process.poll() is None)
        assert health_status(address, "unclip.v1.Upsampler") == "SERVING"

        # A cancelled call stops the denoising loop within a step (the servicer's step_callback raises).
        started = time.monotonic()
        stub.Upsample(upsample_request(10), timeout=60)
        per_step = (time.monotonic() - started) / 10
        cancelled = stub.Upsample.future(upsample_request(1000), timeout=120)
        time.sleep(min(1.0, 100 * per_step))
        cancelled.cancel()
        log = tmp_path / "super_res.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "stopped: cancelled by the caller" not in log.read_text():
            time.sleep(0.05)
        stopped = log.read_text().split("stopped: cancelled by the caller at step ")[-1].split("/")[0]
        assert stopped.isdigit() and int(stopped) < 1000, log.read_text()[-2000:]

        # A request long enough to be in flight when SIGTERM arrives (sized from the measured steps).
        steps = min(1000, max(20, int(3.0 / per_step)))
        future = stub.Upsample.future(upsample_request(steps), timeout=120)
        time.sleep(min(1.0, steps * per_step / 3))
        assert not future.done()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert health_status(address) in ("NOT_SERVING", "UNREACHABLE")

        result = future.result()  # the in-flight request finished
        images = from_proto(result.images, "images")
        assert images.shape == (1, 3, 64, 64) and bool(torch.isfinite(images).all())
        assert len(result.generators) == 1
        assert process.wait(timeout=60) == 0
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_stack_children_die_with_the_stack_even_on_sigkill(tmp_path):
    """The mechanism `unclip up` relies on: a child started by unclip.stack.Process outlives no SIGKILLed
    parent."""
    parent_code = f"""
import os, sys, time
from pathlib import Path
from unclip.stack import Process
p = Process("safety", [sys.executable, "-m", "services.safety", "--host", "127.0.0.1", "--port", "0",
                       "--audit-dir", {str(tmp_path / "audit")!r}], Path({str(tmp_path / "safety.log")!r}))
p.start(dict(os.environ))
print(p.popen.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "listening on" not in (tmp_path / "safety.log").read_text():
        time.sleep(0.1)
    assert _alive(child)
    parent.kill()  # SIGKILL: the parent cannot clean up; the kernel's PDEATHSIG must
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_reflection_lists_every_service_and_health(stack):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    expected = {
        "orchestrator": "unclip.v1.ImageService",
        "encoder": "unclip.v1.Encoder",
        "prior": "unclip.v1.Prior",
        "decoder": "unclip.v1.Decoder",
        "super_res": "unclip.v1.Upsampler",
        "super_res_2": "unclip.v1.Upsampler",
        "safety": "unclip.v1.Safety",
    }
    for name, service in expected.items():
        with stack.channel(name) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services, (
            name
        )


def test_messages_over_grpcs_default_limit_pass(stack):
    """gRPC refuses messages over 4 MiB by default; the stack's limit (UNCLIP_MAX_MESSAGE_BYTES) is larger."""
    import io

    import numpy as np
    import PIL.Image

    from unclip.v1 import encoder_pb2, encoder_pb2_grpc

    uploads = []  # two uploads, each under the 4 MB upload limit (unclip.limits), together over 5 MiB
    for seed in (0, 1):
        noise = np.random.default_rng(seed).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        PIL.Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
        uploads.append(buffer.getvalue())
    assert sum(len(upload) for upload in uploads) > 5 * 2**20
    with stack.channel("encoder") as channel:
        reply = encoder_pb2_grpc.EncoderStub(channel).EncodeImage(
            encoder_pb2.EncodeImageRequest(images=uploads), timeout=120
        )
    assert list(reply.image_embeds.shape)[0] == 2
