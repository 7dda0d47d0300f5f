"""Fidelity against denoising compute for each sampler and step count, on a model of the "shapes" world.

    python -m benchmarks.sampler_sweep [--model models/shapes-toy] [--prompts 200] [--images 2]
        [--settings "unclip:25,25,7;dpmsolver++:10,10,7;..."] [--json sweep.json] [--plot sweep.png]

One stack (`unclip up` on the model: its sampling_defaults.json guidance) answers every setting; each setting
draws the same fully specified prompts with the same seeds (training.evaluate's text-to-image cases), so the
settings are compared image by image (paired). Per setting:
- fidelity: the share of images whose shape, colour and background read from the pixels match the prompt
  (training.evaluate's `shape_color_background`), and the paired difference to the first setting (the
  baseline, today's default) with its 95 % interval (normal approximation over the paired images);
- compute: CPU seconds per image of the denoising stages' processes (prior, decoder, upsamplers), read from
  /proc before and after the setting, and its ratio to the baseline's; wall seconds per image beside it.
A setting is `SAMPLER:PRIOR,DECODER,SUPER_RES` (one sampler for every stage) or
`PRIOR_SAMPLER/DECODER_SAMPLER/SUPER_RES_SAMPLER:PRIOR,DECODER,SUPER_RES`. With `--dtypes float32,bfloat16`
one stack per weights' precision (UNCLIP_DTYPE) answers every setting, the rows are named `SETTING@DTYPE`,
and the baseline is the first setting at the first dtype.

CPU seconds are what the stages spent, so other load on the machine matters less than for wall time, but a
busy machine still slows every kernel: record the load with the numbers (the first JSON line has it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

from benchmarks.common import emit, environment, own_session, start_stack

DEFAULT_SETTINGS = (
    "unclip:25,25,7;unclip:10,10,7;ddim:10,10,7;dpmsolver++:10,10,7;dpmsolver++:8,8,4;ddim:8,8,4;"
    "dpmsolver++:6,6,3"
)
DENOISING = ("prior", "decoder", "super_res", "super_res_2")


def parse_setting(text: str) -> dict:
    """'dpmsolver++:10,10,7' or 'unclip/ddim/ddim:25,10,7' -> SamplingParams fields."""
    samplers, _, steps = text.partition(":")
    names = samplers.split("/")
    if len(names) == 1:
        names = names * 3
    prior, decoder, super_res = (int(s) for s in steps.split(","))
    return dict(
        prior_sampler=names[0],
        decoder_sampler=names[1],
        super_res_sampler=names[2],
        prior_num_inference_steps=prior,
        decoder_num_inference_steps=decoder,
        super_res_num_inference_steps=super_res,
    )


def denoising_cpu(stack) -> float:
    """CPU seconds (user + system) the denoising stages' processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for process in stack.processes:
        if process.name.split("-")[0] not in DENOISING and process.name not in DENOISING:
            continue
        fields = Path(f"/proc/{process.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def correct_per_image(cases, images) -> list[int]:
    """1 where shape, colour and background read from the image match the prompt, image by image."""
    from training.evaluate import to_tensor
    from training.world import read_attributes

    out = []
    for case, ims in zip(cases, images, strict=True):
        for got in read_attributes(to_tensor(ims)):
            e = case.expected
            out.append(int(all(got[k] == e[k] for k in ("shape", "color", "background"))))
    return out


def paired_interval(a: list[int], b: list[int]) -> tuple[float, float, float]:
    """Mean of b - a and its 95 % interval (normal approximation)."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    half = 1.96 * math.sqrt(var / n)
    return mean, mean - half, mean + half


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.errorbar(
            row["compute_ratio"],
            row["fidelity"],
            yerr=[[row["fidelity"] - row["fidelity_low"]], [row["fidelity_high"] - row["fidelity"]]],
            fmt="o",
            capsize=3,
        )
        ax.annotate(row["setting"], (row["compute_ratio"], row["fidelity"]), fontsize=7)
    ax.axvline(0.4, linestyle=":", color="grey")
    ax.set_xlabel("denoising CPU seconds per image / today's default")
    ax.set_ylabel("shape + colour + background correct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep_setting(stack, backend_class, cases, text: str, args) -> tuple[dict, list[int], float]:
    """One setting on one stack: (row without the comparison, correct per image, CPU s per image)."""
    backend = backend_class(stack.address, parse_setting(text), args.concurrency, stack.api_key)
    cpu, began = denoising_cpu(stack), time.perf_counter()
    images = backend.generate([c.prompt for c in cases], args.images, args.seed)
    wall, cpu = time.perf_counter() - began, denoising_cpu(stack) - cpu
    correct = correct_per_image(cases, images)
    count = len(correct)
    row = {"images": count, "fidelity": round(sum(correct) / count, 4)}
    row["cpu_s_per_image"] = round(cpu / count, 3)
    row["wall_s_per_image"] = round(wall / count, 3)
    return row, correct, cpu / count


def versus(baseline: tuple[list[int], float], correct: list[int], cpu_per_image: float) -> dict:
    """The paired fidelity difference to the baseline (95 % interval) and the compute ratio."""
    diff, low, high = paired_interval(baseline[0], correct)
    base_fidelity = sum(baseline[0]) / len(correct)
    return dict(
        fidelity_low=round(base_fidelity + low, 4),
        fidelity_high=round(base_fidelity + high, 4),
        vs_baseline=round(diff, 4),
        vs_baseline_95=[round(low, 4), round(high, 4)],
        compute_ratio=round(cpu_per_image / baseline[1], 3),
    )


def main(argv: list[str] | None = None) -> list[dict]:
    from training.evaluate import Stack as StackBackend
    from training.evaluate import fully_specified_prompts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/shapes-toy")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument(
        "--images", type=int, default=2, help="images per prompt (seeds paired across settings)"
    )
    parser.add_argument(
        "--settings", default=DEFAULT_SETTINGS, help="';'-separated; the first is the baseline"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--concurrency", type=int, default=1, help="requests in flight (1: compute per image)"
    )
    parser.add_argument(
        "--dtypes", default=None, help="','-separated UNCLIP_DTYPE values, one stack each (default: as set)"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    from unclip.runtime.settings import DTYPES

    for dtype in (args.dtypes or "float32").split(","):
        if dtype not in DTYPES:
            parser.error(f"--dtypes: each must be one of {', '.join(DTYPES)}, got {dtype!r}")
    own_session()
    emit({"benchmark": "sampler_sweep", **environment(), "model": args.model, "prompts": args.prompts})
    cases = fully_specified_prompts(args.prompts, random.Random(args.seed))
    rows: list[dict] = []
    baseline: tuple[list[int], float] | None = None
    dtypes = args.dtypes.split(",") if args.dtypes else [None]
    for dtype in dtypes:
        if dtype is not None:
            os.environ["UNCLIP_DTYPE"] = dtype  # every model stage of the next stack
        stack = start_stack(Path(args.model))
        try:
            for text in args.settings.split(";"):
                name = text if len(dtypes) == 1 else f"{text}@{dtype}"
                row, correct, cpu = sweep_setting(stack, StackBackend, cases, text, args)
                if baseline is None:
                    baseline = (correct, cpu)
                row = {"setting": name, **row, **versus(baseline, correct, cpu)}
                emit(row)
                rows.append(row)
        finally:
            stack.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    print("| setting | fidelity | vs today (95 % interval) | CPU s/image | compute vs today | wall s/image |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        low, high = row["vs_baseline_95"]
        print(
            f"| `{row['setting']}` | {row['fidelity']:.3f} | {row['vs_baseline']:+.3f} "
            f"({low:+.3f}..{high:+.3f}) | {row['cpu_s_per_image']} | {row['compute_ratio']:.2f} "
            f"| {row['wall_s_per_image']} |"
        )
    return rows


if __name__ == "__main__":
    main()
