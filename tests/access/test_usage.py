"""Usage accounting through the shared stack: every response carries its usage (images, compute seconds split
per stage, energy), and `unclip usage --by tenant` sums the durable ledger to what was sent."""

from __future__ import annotations

import json
import subprocess
import sys

from unclip.access import keys
from unclip.access.client import with_key
from unclip.runtime.server import create_channel
from unclip.v1 import orchestrator_pb2 as pb
from unclip.v1 import orchestrator_pb2_grpc

FAST = pb.SamplingParams(prior_num_inference_steps=2, decoder_num_inference_steps=3)


def test_usage_in_every_response_and_in_the_ledger(stack):
    key = keys.create(stack.running.keys_file, "usage-probe", tenant="usage-tenant")
    sent_images, compute = 0, 0.0
    with with_key(create_channel(stack.address), key) as channel:
        stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        for n, size in [(1, 32), (2, 64)]:
            request = pb.GenerateRequest(prompt="a red circle", n=n, size=size, params=FAST)
            usage = stub.Generate(request, timeout=120).usage
            assert usage.images == n
            stages = dict(usage.stage_seconds)
            upsampler = {"super_res"} if size == 64 else set()
            assert set(stages) == {"encoder", "prior", "decoder", "safety"} | upsampler, stages
            assert all(seconds > 0 for seconds in stages.values())
            assert abs(usage.compute_seconds - sum(stages.values())) < 1e-6
            assert usage.energy_joules > 0
            sent_images += n
            compute += usage.compute_seconds
        events = list(stub.GenerateStream(pb.GenerateRequest(prompt="a blue square", size=32, params=FAST)))
        assert events[-1].result.usage.images == 1
        sent_images += 1
        compute += events[-1].result.usage.compute_seconds

    done = subprocess.run([sys.executable, "-m", "unclip", "usage", "--by", "tenant", "--json",
                           "--dir", str(stack.log_dir / "usage")],
                          env=stack.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {row["tenant"]: row for row in map(json.loads, done.stdout.splitlines())}
    mine = rows["usage-tenant"]
    assert mine["requests"] == 3 and mine["images"] == sent_images
    assert abs(mine["compute_seconds"] - compute) < 1e-3
