"""Compute speed-ups of the dominant stages (decoder, super-res), each measured against the plain engine.

    python -m benchmarks.compute [--model models/shapes-toy] [--repeats 5] [--variants ...]

Per stage (decoder at its default 25 steps with guidance 8, super-res at 7 steps, n=1), the engine's own call
is timed as loaded (``baseline``) and with one change at a time, interleaved round by round so machine load
hits every variant alike:

    channels_last   the stage's UNets in torch.channels_last memory format (UNCLIP_CHANNELS_LAST)
    inference_mode  the call under torch.inference_mode() instead of only no_grad
    threads2        torch.set_num_threads(2) during the call (intra-op threads; the stages default to 1)
    compile         torch.compile(unet) (inductor, CPU); compile time reported apart
    thp             THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator asks for transparent huge pages): a child
                    process, since torch reads the variable once

Each variant reports wall and CPU seconds (process CPU time: steadier than wall on a shared machine, but
blind to extra threads' wall gain) as medians, and the largest difference of its output from the baseline's
(0.0 = bit-exact). Without --model a tiny random model is made.

`--super-res-steps 7,5,4,3 --model models/shapes-toy` instead times the super-res stage at each step count
and reads the 128 px images back with the shapes world's reader (shape, colours, size, position), against
the prompts and against the first step count's reading.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from benchmarks.common import emit, environment, median, model_dir, own_session

PROMPT = "a red circle above a blue square"
VARIANTS = ["baseline", "channels_last", "inference_mode", "threads2", "compile", "thp"]


def _inputs(model):
    """Realistic inputs of the decoder and super-res: the prompt through the encoder, prior and decoder."""
    import torch

    from services.decoder.engine import DecoderEngine
    from services.encoder.engine import EncoderEngine
    from services.prior.engine import PriorEngine
    from unclip.rng import generators_from_seed

    text = EncoderEngine.from_pretrained(model).encode_text([PROMPT], True)
    cond = (text.text_embeds, text.text_encoder_hidden_states, text.text_mask)
    embeds = PriorEngine.from_pretrained(model).sample(*cond, generators_from_seed(0, 1)).image_embeds
    images = DecoderEngine.from_pretrained(model).decode(embeds, *cond, generators_from_seed(0, 1)).images
    del torch
    return embeds, cond, images


def _engine(model, stage: str):
    from services.decoder.engine import DecoderEngine, UpsamplerEngine

    if stage == "decoder":
        return DecoderEngine.from_pretrained(model)
    return UpsamplerEngine.from_pretrained(model, stage=stage)


def _unets(engine) -> list[str]:
    return ["decoder"] if hasattr(engine, "decoder") else ["first", "last"]


def _call(engine, inputs):
    """One request through the stage at its defaults; the output images."""
    from unclip.rng import generators_from_seed

    embeds, cond, images = inputs
    if hasattr(engine, "decoder"):
        return engine.decode(embeds, *cond, generators_from_seed(0, 1)).images
    return engine.upsample(images, generators_from_seed(0, 1)).images


def _prepare(variant: str, engine) -> tuple[object, contextlib.AbstractContextManager | None, float]:
    """The engine changed for `variant`, a context manager to run each call in, and setup seconds."""
    import torch

    began = time.perf_counter()
    context = None
    if variant == "channels_last":
        for name in _unets(engine):
            getattr(engine, name).to(memory_format=torch.channels_last)
    elif variant == "inference_mode":
        context = torch.inference_mode
    elif variant == "threads2":

        @contextlib.contextmanager
        def two_threads():
            before = torch.get_num_threads()
            torch.set_num_threads(2)
            try:
                yield
            finally:
                torch.set_num_threads(before)

        context = two_threads
    elif variant == "compile":
        for name in _unets(engine):
            setattr(engine, name, torch.compile(getattr(engine, name)))
    return engine, context, time.perf_counter() - began


def run_stage(model, stage: str, variants: list[str], repeats: int, inputs) -> list[dict]:
    import torch

    engines = {}
    for variant in variants:
        engine, context, setup = _prepare(variant, _engine(model, stage))
        began = time.perf_counter()
        with context() if context else contextlib.nullcontext():
            first = _call(engine, inputs)  # warm-up (compiles for "compile")
        engines[variant] = (engine, context, setup + time.perf_counter() - began, first)
    baseline = engines[variants[0]][3]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant, (engine, context, _, _) in engines.items():
            wall, cpu = time.perf_counter(), time.process_time()
            with context() if context else contextlib.nullcontext():
                _call(engine, inputs)
            times[variant].append((time.perf_counter() - wall, time.process_time() - cpu))
    rows = []
    base_wall = median([w for w, _ in times[variants[0]]])
    for variant in variants:
        wall = median([w for w, _ in times[variant]])
        rows.append(
            {
                "stage": stage,
                "variant": variant,
                "wall_s": round(wall, 4),
                "cpu_s": round(median([c for _, c in times[variant]]), 4),
                "speedup": round(base_wall / wall, 3),
                "first_call_s": round(engines[variant][2], 2),
                "max_abs_diff": float((engines[variant][3] - baseline).abs().max()),
            }
        )
    del torch
    return rows


def _child(args) -> None:
    """One variant in this process (thp: the allocator reads its variable once, at start)."""
    import torch

    torch.set_num_threads(1)
    model = model_dir(args.model)
    inputs = _inputs(model)
    for stage in args.stages.split(","):
        for row in run_stage(model, stage, ["baseline"], args.repeats, inputs):
            print(json.dumps(row), flush=True)


def _thp_rows(args, model) -> list[dict]:
    """baseline and THP_MEM_ALLOC_ENABLE=1 in alternating child processes (interleaved)."""
    results: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(max(1, args.repeats // 2)):
        for label in ("off", "on"):
            env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if label == "on" else "0")
            argv = [sys.executable, "-m", "benchmarks.compute", "--child", "--model", str(model)]
            argv += ["--stages", args.stages, "--repeats", "2"]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
            results[label] += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rows = []
    for stage in args.stages.split(","):
        walls = {k: median([r["wall_s"] for r in v if r["stage"] == stage]) for k, v in results.items()}
        cpus = {k: median([r["cpu_s"] for r in v if r["stage"] == stage]) for k, v in results.items()}
        rows.append(
            {
                "stage": stage,
                "variant": "thp",
                "wall_s": round(walls["on"], 4),
                "cpu_s": round(cpus["on"], 4),
                "baseline_wall_s": round(walls["off"], 4),
                "baseline_cpu_s": round(cpus["off"], 4),
                "speedup": round(walls["off"] / walls["on"], 3),
            }
        )
    return rows


def super_res_steps(model, steps: list[int], prompts: int, seed: int = 1234) -> list[dict]:
    """Fewer super-res steps: time and prompt fidelity per step count on `prompts` fully specified prompts
    of the bundled shapes world (training.evaluate's prompts, read from pixels by
    training.world.read_attributes), and how often each reading equals the one at the first step count."""
    import random

    import torch

    from services.decoder.engine import DecoderEngine, UpsamplerEngine
    from services.encoder.engine import EncoderEngine
    from services.prior.engine import PriorEngine
    from training.evaluate import fully_specified_prompts
    from training.world import read_attributes
    from unclip.rng import generators_from_seed

    encoder, prior = EncoderEngine.from_pretrained(model), PriorEngine.from_pretrained(model)
    decoder, upsampler = DecoderEngine.from_pretrained(model), UpsamplerEngine.from_pretrained(model)
    cases = fully_specified_prompts(prompts, random.Random(seed))
    small, generators = [], []
    for i, case in enumerate(cases):  # the pipeline up to the decoder, once per prompt
        text = encoder.encode_text([case.prompt], True)
        cond = (text.text_embeds, text.text_encoder_hidden_states, text.text_mask)
        out = prior.sample(*cond, generators_from_seed(seed + i, 1))
        out = decoder.decode(out.image_embeds, *cond, out.generators)
        small.append(out.images)
        generators.append([g.get_state() for g in out.generators])
    readings: dict[int, list[dict]] = {}
    rows, reference = [], None
    for count in steps:
        walls, cpus, images = [], [], []
        for image, states in zip(small, generators, strict=True):
            gens = [torch.Generator().set_state(state) for state in states]
            wall, cpu = time.perf_counter(), time.process_time()
            images.append(upsampler.upsample(image, gens, num_inference_steps=count).images)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        images = torch.cat(images)
        reference = reference if count != steps[0] else images
        # pixels in [0, 1]: how far each step count's images are from the first step count's
        error = ((images - reference) / 2).abs()
        psnr = -10 * torch.log10(error.pow(2).mean().clamp_min(1e-12))
        readings[count] = read_attributes(images)
        got = readings[count]
        first = readings[steps[0]]

        def share(key: str, got=got) -> float:
            pairs = [(g[key], c.expected[key]) for g, c in zip(got, cases, strict=True)]
            pairs = [(a, b) for a, b in pairs if b is not None]
            return round(sum(a == b for a, b in pairs) / max(1, len(pairs)), 3)

        core = [
            all(g[k] == c.expected[k] for k in ("shape", "color", "background"))
            for g, c in zip(got, cases, strict=True)
        ]
        rows.append(
            {
                "stage": "super_res",
                "super_res_steps": count,
                "wall_s": round(median(walls), 4),
                "cpu_s": round(median(cpus), 4),
                "shape_color_background": round(sum(core) / len(core), 3),
                "size_when_given": share("size"),
                "position_when_given": share("position"),
                f"mean_abs_pixel_diff_vs_{steps[0]}_steps": round(float(error.mean()), 4),
                f"psnr_db_vs_{steps[0]}_steps": round(float(psnr), 1),
                f"same_reading_as_{steps[0]}_steps": round(
                    sum(a == b for a, b in zip(got, first, strict=True)) / len(got), 3
                ),
                "images": len(got),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", default="decoder,super_res")
    parser.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "compile"))
    parser.add_argument(
        "--super-res-steps",
        default="",
        help="e.g. 7,5,4,3: fidelity and time of the super-res stage at each step count (shapes model)",
    )
    parser.add_argument("--prompts", type=int, default=16, help="prompts for --super-res-steps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        own_session()  # the in-process side competes for the CPU on the stack's terms
    if args.child:
        return _child(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    model = model_dir(args.model)
    emit({"benchmark": "compute", **environment(), "model": str(model)})
    if args.super_res_steps:
        counts = [int(v) for v in args.super_res_steps.split(",")]
        for row in super_res_steps(model, counts, args.prompts):
            emit(row)
        return
    in_process = ["baseline"] + [v for v in variants if v not in ("baseline", "thp")]
    inputs = _inputs(model)
    for stage in args.stages.split(","):
        for row in run_stage(model, stage, in_process, args.repeats, inputs):
            emit(row)
    if "thp" in variants:
        for row in _thp_rows(args, model):
            emit(row)
    emit({"loadavg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
