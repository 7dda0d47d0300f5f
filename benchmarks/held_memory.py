"""What a stage holds after large requests: the encoder and the upsamplers under the largest legitimate
inputs, then idle; RSS after warm-up, at the peak, and after --idle-seconds of quiet, per process.

    python -m benchmarks.held_memory [--seconds 120] [--idle-seconds 25]
    UNCLIP_MALLOC_TUNING=0 python -m benchmarks.held_memory   # glibc's defaults, for comparison

Load (3 threads): variations of a 2048x2048 upload with n=10 (the encoder decodes and preprocesses it),
and upsampler requests with a 1024x1024 inpaint at n=4 (67 MB messages) at super_res.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from benchmarks.common import emit, environment, start_stack
from unclip.fuzz import rss_mb


def upload(side: int = 2048) -> bytes:
    """A smooth (so small) 2048x2048 PNG: 12 MB of pixels once decoded."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    array = np.stack(
        [np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.full((side, side), 90, np.uint8)], -1
    )
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--idle-seconds", type=float, default=25.0)
    args = parser.parse_args()
    from unclip.rng import generators_from_seed
    from unclip.runtime.tensors import encode_generators, to_proto
    from unclip.tiny import make_tiny_model
    from unclip.v1 import decoder_pb2, decoder_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc

    model = make_tiny_model(Path(tempfile.mkdtemp(prefix="unclip-held-")) / "model", super_res_stages=2)
    stack = start_stack(model)
    try:
        pids = {p.name: p.popen.pid for p in stack.processes}
        images = orchestrator_pb2_grpc.ImageServiceStub(stack.channel("orchestrator"))  # with its key
        upsampler = decoder_pb2_grpc.UpsamplerStub(stack.channel("super_res"))  # mTLS as the orchestrator
        fast = orchestrator_pb2.SamplingParams(
            prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=[2]
        )
        variation = orchestrator_pb2.VariationRequest(image=upload(), n=10, size=32, params=fast)
        side, n = 1024, 4
        upsample = decoder_pb2.UpsampleRequest(
            images=to_proto(torch.zeros(n, 3, 32, 32)),
            generators=encode_generators(generators_from_seed(0, n)),
            num_inference_steps=2,
            inpaint=decoder_pb2.InpaintInput(
                image=to_proto(torch.rand(n, 3, side, side) * 2 - 1),
                mask=to_proto((torch.rand(n, 1, side, side) > 0.5).float()),
            ),
        )
        images.CreateVariation(variation, timeout=300)
        upsampler.Upsample(upsample, timeout=300)
        warm = {name: round(rss_mb(pid)) for name, pid in pids.items()}
        peak = dict(warm)
        stop_at, done, lock = time.monotonic() + args.seconds, [0], threading.Lock()

        def client(index: int) -> None:
            while time.monotonic() < stop_at:
                if index == 0:
                    upsampler.Upsample(upsample, timeout=300)
                else:
                    images.CreateVariation(variation, timeout=300)
                with lock:
                    done[0] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            for name, pid in pids.items():
                peak[name] = max(peak[name], round(rss_mb(pid)))
            time.sleep(0.2)
        time.sleep(args.idle_seconds)
        after = {name: round(rss_mb(pid)) for name, pid in pids.items()}
        emit(
            {
                "benchmark": "held_memory",
                **environment(),
                "requests": done[0],
                "rss_warm_mb": warm,
                "rss_peak_mb": peak,
                "rss_after_idle_mb": after,
                "held_mb": {name: after[name] - warm[name] for name in pids},
            }
        )
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
