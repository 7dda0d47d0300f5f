"""Shared pieces of the benchmarks: the model, the in-process reference pipeline, the stack, timing helpers.

Every benchmark runs both sides in the same process tree, on the same weights and steps, and prints one JSON
line per measurement (plus a readable table) so results can be pasted into BENCHMARKS.md with the machine,
date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Threads: the stack chooses its own (UNCLIP_TORCH_THREADS unset: automatic, unclip.runtime.threads); the
# in-process diffusers side runs at torch's default, as a user of diffusers runs it. Set UNCLIP_TORCH_THREADS
# to pin the stages (the in-process side stays at torch's default).


def own_session() -> None:
    """Re-runs this benchmark as the leader of a new session, unless it already is one.

    Linux's scheduler (CFS with sched_autogroup, on by default on desktops and on the development machine)
    shares the CPU between sessions first, then between the processes of a session. Every process of the
    stack is started in its own session (unclip.stack), so on a loaded machine each stage gets a whole
    session's share while the in-process pipeline shares one with whatever else its shell runs: on the
    shared 2-core machine that alone made the stack look up to 1.7x faster than the same compute in process.
    In its own session the in-process side competes on the same terms.
    """
    if os.getsid(0) == os.getpid() or os.environ.get("UNCLIP_BENCH_SESSION") == "1":
        return
    if shutil.which("setsid") is None:  # not Linux (util-linux): no autogroups to even out either
        return
    os.environ["UNCLIP_BENCH_SESSION"] = "1"
    sys.stdout.flush()
    os.execvp("setsid", ["setsid", "--wait", *sys.orig_argv])


def model_dir(path: str | None, tiny_width: int | None = None) -> Path:
    """The given model folder, or a fresh tiny random model (`tiny_width`: its UNets' first-block width,
    see unclip.tiny.make_tiny_model; None: the default tiny model the tests use)."""
    if path:
        if tiny_width is not None:
            raise SystemExit("--tiny-width applies to the generated tiny model, not to --model")
        return Path(path)
    from unclip.tiny import make_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="unclip-bench-")) / "model"
    if tiny_width is None:
        return make_tiny_model(folder)
    return make_tiny_model(folder, width=tiny_width)


# The stages' compute options (unclip.models._tune_unet; their variables: unclip.stack_process.compute_env).
# The in-process side is diffusers' pipeline as it comes, so reference_pipeline loads with every option off;
# the stack's processes take theirs from the environment (channels-last on by default;
# `UNCLIP_CHANNELS_LAST=0 python -m benchmarks.latency ...` is the stack with diffusers' contiguous UNets).


def compute_options() -> dict[str, str]:
    """The compute options this run's stack gets (for the JSON header): the environment's, else the
    stages' defaults."""
    from unclip.runtime.settings import env_default
    from unclip.stack_process import COMPUTE_OPTION_ENV

    return {env: str(env_default(name)) for name, env in COMPUTE_OPTION_ENV.items()}


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype`: the stages' weights (UNCLIP_DTYPE), default the services' own, auto."""
    from unclip.runtime.settings import DTYPES

    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="the stages' weights (UNCLIP_DTYPE; auto, the services' default: bfloat16 on a CPU with native "
        "bfloat16, float16 on CUDA)",
    )


def reference_pipeline(model: Path, device: str = "cpu", dtype: str = "float32"):
    """diffusers' UnCLIPPipeline in this process, built from the same components the stages load, with
    every compute option of the stages off: contiguous, eager, as diffusers runs it, on
    `device` in `dtype` (the stack's UNCLIP_DEVICE / UNCLIP_DTYPE; float32 on the CPU by default)."""
    import torch
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

    from services.decoder.engine import DecoderEngine, UpsamplerEngine
    from services.encoder.engine import EncoderEngine
    from services.prior.engine import PriorEngine
    from unclip.stack_process import COMPUTE_OPTION_ENV, compute_env

    # Every option off while the engines load; the stack started later gets the caller's environment.
    with mock.patch.dict(os.environ, compute_env(**dict.fromkeys(COMPUTE_OPTION_ENV, False))):
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
    if device != "cpu" or dtype != "float32":
        pipe.to(device=device, dtype=getattr(torch, dtype))
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


def generate_request(prompt: str, n: int, seed: int, steps: tuple[int, int, int], sampler: str = "unclip"):
    """A Generate request at `steps` with `sampler` on every stage: by default UnCLIPScheduler's, the one
    diffusers' UnCLIPPipeline runs (the model's own default sampler may differ)."""
    from unclip.v1 import orchestrator_pb2

    return orchestrator_pb2.GenerateRequest(
        prompt=prompt,
        n=n,
        seed=seed,
        params=orchestrator_pb2.SamplingParams(
            prior_num_inference_steps=steps[0],
            decoder_num_inference_steps=steps[1],
            super_res_num_inference_steps=[steps[2]],
            prior_sampler=sampler,
            decoder_sampler=sampler,
            super_res_sampler=sampler,
        ),
    )


def stub(address: str, api_key: str | None = None):
    """An ImageService stub for `address`, sending `api_key` (a Stack's `api_key`; None: UNCLIP_API_KEY or the
    running `unclip up` stack's key)."""
    from unclip.access.client import resolve_key, with_key
    from unclip.runtime.server import create_channel
    from unclip.v1 import orchestrator_pb2_grpc

    channel = with_key(create_channel(address), resolve_key(api_key, address))
    return orchestrator_pb2_grpc.ImageServiceStub(channel)


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

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor() or platform.system()}",
        "loadavg": os.getloadavg(),
        "own_session": os.getsid(0) == os.getpid(),  # see own_session()
        "autogroup": _read("/proc/sys/kernel/sched_autogroup_enabled"),
        "torch": torch.__version__,
        "in_process_torch_threads": torch.get_num_threads(),  # torch's default in this process
        "stack_torch_threads": os.environ.get("UNCLIP_TORCH_THREADS", "auto"),
        "stack_compute_options": compute_options(),  # the in-process side runs without them
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def read_spans(log_dir: Path) -> list[dict]:
    """Spans every process of a stack printed with OTEL_TRACES_EXPORTER=console (one log per process):
    [{trace, process, name, start, end}] with times in seconds since the epoch."""
    from datetime import datetime

    def seconds(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    spans = []
    decoder = json.JSONDecoder()
    for log in sorted(Path(log_dir).glob("*.log")):
        text, at = log.read_text(errors="replace"), 0
        while (begin := text.find('{\n    "name"', at)) >= 0:
            span, at = decoder.raw_decode(text, begin)
            spans.append(
                {
                    "trace": span["context"]["trace_id"],
                    "process": log.stem,
                    "name": span["name"],
                    "start": seconds(span["start_time"]),
                    "end": seconds(span["end_time"]),
                }
            )
    return spans


def breakdown(spans: list[dict]) -> list[dict]:
    """Per traced Generate (in the order they started): its wall time, the stages' own compute (their
    `<stage>.compute` spans) and where the rest went (ms): each stage call's time outside the stage's
    compute, and the orchestrator's own time between calls."""
    by_trace: dict[str, list[dict]] = {}
    for span in spans:
        by_trace.setdefault(span["trace"], []).append(span)
    rows = []
    for trace in by_trace.values():
        root = [s for s in trace if s["process"] == "orchestrator" and s["name"].endswith("/Generate")]
        if not root:
            continue
        root = root[0]
        calls = sorted(
            (s for s in trace if s["process"] == "orchestrator" and s is not root), key=lambda s: s["start"]
        )
        compute = {s["process"]: s for s in trace if s["name"].endswith(".compute")}
        row = {"start": root["start"], "total_ms": 1000 * (root["end"] - root["start"])}
        inside = 0.0
        for call in calls:
            method = call["name"].rsplit("/", 1)[-1]
            stage = next(
                (s["process"] for s in trace if s["name"] == call["name"] and s["process"] != "orchestrator"
                 and call["start"] <= s["start"] <= call["end"]),
                "?",
            )  # fmt: skip
            own = compute.get(stage)
            took = call["end"] - call["start"]
            busy = 0.0
            if own and call["start"] <= own["start"] <= call["end"]:
                busy = own["end"] - own["start"]
            key = f"{stage}.{method}"
            row[key + ".compute_ms"] = row.get(key + ".compute_ms", 0.0) + 1000 * busy
            row[key + ".other_ms"] = row.get(key + ".other_ms", 0.0) + 1000 * (took - busy)
            inside += took
        row["orchestrator_own_ms"] = 1000 * (root["end"] - root["start"] - inside)
        row["compute_ms"] = sum(v for k, v in row.items() if k.endswith(".compute_ms"))
        row["services_add_ms"] = row["total_ms"] - row["compute_ms"]
        rows.append(row)
    return sorted(rows, key=lambda r: r["start"])


def in_process_engines(model: str) -> tuple:
    """The stack's four engines (encoder, prior, decoder, upsampler) of a model folder in this process."""
    from services.decoder.engine import DecoderEngine, UpsamplerEngine
    from services.encoder.engine import EncoderEngine
    from services.prior.engine import PriorEngine

    return (EncoderEngine.from_pretrained(model), PriorEngine.from_pretrained(model),
            DecoderEngine.from_pretrained(model), UpsamplerEngine.from_pretrained(model))  # fmt: skip


def draw_in_process(engines: tuple, prompts: list[str], generators: list, settings: dict, image_embeds=None):
    """Prompts through the engines at `settings` (sampling_defaults.json's keys), as the stack draws them.
    image_embeds [n, D], if given, replaces the prior's. Returns the decoder's images [n, 3, 32, 32] and the
    upsampler's [n, 3, 128, 128] (float32, in [-1, 1])."""
    enc, pri, dec, up = engines
    e = enc.encode_text(prompts, True)
    text = (e.text_embeds, e.text_encoder_hidden_states, e.text_mask)
    p = pri.sample(
        *text,
        generators,
        num_inference_steps=settings["prior_num_inference_steps"],
        guidance_scale=settings["prior_guidance_scale"],
        sampler=settings["prior_sampler"],
    )
    embeds = p.image_embeds if image_embeds is None else image_embeds.to(p.image_embeds.dtype)
    d = dec.decode(
        embeds,
        *text,
        p.generators,
        num_inference_steps=settings["decoder_num_inference_steps"],
        guidance_scale=settings["decoder_guidance_scale"],
        sampler=settings["decoder_sampler"],
    )
    u = up.upsample(
        d.images,
        d.generators,
        num_inference_steps=settings["super_res_num_inference_steps"],
        sampler=settings["super_res_sampler"],
    )
    return d.images.float().clamp(-1, 1), u.images.float().clamp(-1, 1)
