"""The stack's engines in one process (float32, deterministic, no watermark) at a model's sampling defaults,
optionally overridden, on fully specified prompts; the strict reader on each 128 px picture.

    python benchmarks/results/upsampler-finetune/in_process.py MODEL 96 '{}' '{"decoder_guidance_scale": 3}'

Each JSON argument is one setting (keys of sampling_defaults.json); every setting draws the same prompts
(training.evaluate's fully specified prompts, seed 4321) with the same seeds, so settings and models compare
picture for picture. Prints one JSON line per setting: shape (geometry) + colour + background right, shape
right, clean, median IoU, median largest off-palette blob."""

import json
import random
import statistics
import sys

import torch

from benchmarks.common import draw_in_process, in_process_engines
from training.evaluate import fully_specified_prompts
from training.evaluate_strict import model_defaults
from training.outline import read_strict

BATCH = 8  # images per call (the engines take at most 10)


def run(model: str, n: int, overrides: dict, engines) -> dict:
    sd = model_defaults(model) | overrides
    rows = []
    for i, case_batch in enumerate(batched(fully_specified_prompts(n, random.Random(4321)), BATCH)):
        gens = [torch.Generator().manual_seed(1000 + i * BATCH + j) for j in range(len(case_batch))]
        _, high = draw_in_process(engines, [c.prompt for c in case_batch], gens, sd)
        for image, case in zip(high, case_batch, strict=True):
            want = case.expected
            r = read_strict(image, want["shape"])
            colours = r["color"] == want["color"] and r["background"] == want["background"]
            right = r["shape_right"]
            rows.append(
                dict(
                    core=right and colours,
                    shape=right,
                    clean=r["clean"],
                    iou=r["iou"],
                    blob=r["largest_blob_px"],
                )
            )
    return dict(
        setting=overrides,
        n=n,
        core=sum(r["core"] for r in rows),
        shape=sum(r["shape"] for r in rows),
        clean=sum(r["clean"] for r in rows),
        iou_median=statistics.median(r["iou"] for r in rows),
        blob_median=statistics.median(r["blob"] for r in rows),
    )


def batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


if __name__ == "__main__":
    model, n = sys.argv[1], int(sys.argv[2])
    engines = in_process_engines(model)
    for spec in sys.argv[3:] or ["{}"]:
        print(json.dumps(run(model, n, json.loads(spec), engines)), flush=True)
