"""The stack's engines in one process (float32, no watermark) at a model's sampling defaults on
`in_process.py`'s 96 fully specified prompts (seed 4321, the same generators), read by the strict reader and
counted per shape × stated size. MODE "prior": the prior's embeddings (as the stack); "oracle": the CLIP image
embedding of a world render of the prompted scene instead (what a perfect prior could give). Prints one JSON
line: right (shape by geometry + colours), clean, and per cell pictures / right / the prompted kind's median
IoU.

    PYTHONPATH=. python benchmarks/results/small-stars/by_kind.py MODEL [prior|oracle]
"""

import json
import random
import statistics
import sys
from collections import Counter, defaultdict

import torch
from PIL import Image

from benchmarks.common import draw_in_process, in_process_engines
from services.encoder.engine import EncoderEngine
from training.evaluate import fully_specified_prompts
from training.evaluate_strict import model_defaults
from training.outline import read_strict
from training.world import render, scenes_from_attributes

KINDS = ("circle", "square", "triangle", "star")
SIZES = {0: "small", 1: "large", None: "unstated"}


def oracle_embeds(enc: EncoderEngine, cases, first: int) -> torch.Tensor:
    """CLIP image embeddings of renders of the prompted scenes (unstated size: alternating; position: 0)."""

    def stated(key: str, value, j: int) -> int:
        return value if value is not None else 0 if key == "position" else (first + j) % 2

    attrs = [{k: stated(k, v, j) for k, v in c.expected.items()} for j, c in enumerate(cases)]
    images = render(scenes_from_attributes(attrs, torch.Generator().manual_seed(first)), 224)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    return enc.encode_image([Image.fromarray(p) for p in pixels])


def main(model: str, mode: str = "prior", n: int = 96) -> dict:
    engines = in_process_engines(model)
    sd = model_defaults(model)
    cases = fully_specified_prompts(n, random.Random(4321))
    count, ious = Counter(), defaultdict(list)
    for i in range(0, n, 8):
        batch = cases[i : i + 8]
        gens = [torch.Generator().manual_seed(1000 + i + j) for j in range(len(batch))]
        embeds = None if mode == "prior" else oracle_embeds(engines[0], batch, i)
        _, high = draw_in_process(engines, [c.prompt for c in batch], gens, sd, embeds)
        for image, case in zip(high, batch, strict=True):
            want = case.expected
            r = read_strict(image, want["shape"])
            right = r["shape_right"] and r["color"] == want["color"] and r["background"] == want["background"]
            cell = f"{KINDS[want['shape']]}-{SIZES[want['size']]}"
            count["right"] += right
            count["clean"] += r["clean"]
            count[cell + " pictures"] += 1
            count[cell + " right"] += right
            ious[cell + " median IoU"].append(r["iou"])
    medians = {k: round(statistics.median(v), 4) for k, v in ious.items()}
    return dict(model=model, mode=mode, n=n, **dict(sorted((count | medians).items())))


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
