"""Shared pieces of the benchmarks: the model, the in-process reference pipeline, the stack, timing helpers.

Every benchmark runs both sides in the same process tree, on the same weights and steps, and prints one JSON
line per measurement (plus a readable table) so results can be pasted into BENCHMARKS.md with the machine,
date and commit.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Both sides compute with one torch thread (the stages' default, UNCLIP_TORCH_THREADS=1).
os.environ.setdefault("UNCLIP_TORCH_THREADS", "1")


def model_dir(path: str | None) -> Path:
    """The given model folder, or a fresh tiny random model."""
    if path:
        return Path(path)
    from unclip.tiny import make_tiny_model

    return make_tiny_model(Path(tempfile.mkdtemp(prefix="unclip-bench-")) / "model")


def reference_pipeline(model: Path):
    """diffusers' UnCLIPPipeline in this process, built from the same components the stages load."""
    import torch
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

    from services.decoder.engine import DecoderEngine, UpsamplerEngine
    from services.encoder.engine import EncoderEngine
    from services.prior.engine import PriorEngine

    torch.set_num_threads(int(os.environ.get("UNCLIP_TORCH_THREADS", "1")))
    encoder, prior = EncoderEngine.from_pretrained(model), PriorEngine.from_pretrained(model)
    decoder, upsampler = DecoderEngine.from_pretrained(model), UpsamplerEngine.from_pretrained(model)
    pipe = UnCLIPPipeline(
        prior=prior.prior,
        decoder=decoder.decoder,
        text_encoder=encoder.text_encoder,
        tokenizer=encoder.tokenizer,
        text_proj=decoder.text_proj,
        super_res_first=upsampler.first,
        super_res_last=upsampler.last,
        prior_scheduler=prior.scheduler,
        decoder_scheduler=decoder.scheduler,
        super_res_scheduler=upsampler.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, prompt: str, n: int, seed: int, steps: tuple[int, int, int]):
    import torch

    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(
        prompt=[prompt] * n,
        generator=generators,
        prior_num_inference_steps=steps[0],
        decoder_num_inference_steps=steps[1],
        super_res_num_inference_steps=steps[2],
        output_type="np",
    ).images


def start_stack(model: Path, **kwargs):
    from unclip.stack import Stack

    stack = Stack(model=str(model), port=0, grace_seconds=5, **kwargs)
    stack.start(timeout=600)
    return stack


def generate_request(prompt: str, n: int, seed: int, steps: tuple[int, int, int]):
    from unclip.v1 import orchestrator_pb2

    return orchestrator_pb2.GenerateRequest(
        prompt=prompt,
        n=n,
        seed=seed,
        params=orchestrator_pb2.SamplingParams(
            prior_num_inference_steps=steps[0],
            decoder_num_inference_steps=steps[1],
            super_res_num_inference_steps=[steps[2]],
        ),
    )


def stub(address: str):
    from unclip.runtime.server import create_channel
    from unclip.v1 import orchestrator_pb2_grpc

    return orchestrator_pb2_grpc.ImageServiceStub(create_channel(address))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment() -> dict:
    """Machine, date, commit and load: what BENCHMARKS.md records next to each number."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = "?"
    import torch

    torch.set_num_threads(int(os.environ["UNCLIP_TORCH_THREADS"]))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor() or platform.system()}",
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
