"""The upsampler's ceiling: exact 32 px world renders (optionally blunted by `training.train.blunt` with
one fixed σ) through a model's upsampler at the stack's defaults (dpmsolver++, 2 steps, float32),
each 128 px picture read by the strict reader. Prints one JSON line: per shape × size, pictures, shape right,
clean.

    PYTHONPATH=. python benchmarks/results/small-stars/ceiling.py MODEL [PER_CELL=8] [STEPS=2] [SIGMA=0]
"""

import json
import sys
from collections import defaultdict

import torch

from services.decoder.engine import UpsamplerEngine
from training.outline import read_strict
from training.train import blunt
from training.world import PALETTE, render, scenes_from_attributes

KINDS = ("circle", "square", "triangle", "star")


def main(model: str, per: int = 8, steps: int = 2, sigma: float = 0.0) -> dict:
    up = UpsamplerEngine.from_pretrained(model)
    attrs = []
    for shape in range(4):
        for size in range(2):
            for k in range(per):
                c = (k * 3 + shape) % 8
                bg = (c + 1 + (k * 5 + size) % 7) % 8
                position = 0 if size else k % 5
                attrs.append(dict(shape=shape, color=c, background=bg, size=size, position=position))
    scenes = scenes_from_attributes(attrs, torch.Generator().manual_seed(7))
    low = render(scenes, 32)
    if sigma > 0:
        low = blunt(low, PALETTE[scenes.background], PALETTE[scenes.color], torch.full((len(low),), sigma))
    table = defaultdict(lambda: [0, 0, 0])
    for i in range(0, len(attrs), 8):
        gens = [torch.Generator().manual_seed(100 + i + j) for j in range(len(attrs[i : i + 8]))]
        out = up.upsample(low[i : i + 8], gens, num_inference_steps=steps, sampler="dpmsolver++").images
        for image, a in zip(out.float(), attrs[i : i + 8], strict=True):
            r = read_strict(image.clamp(-1, 1), a["shape"])
            cell = table[f"{KINDS[a['shape']]}-{'small' if a['size'] == 0 else 'large'}"]
            cell[0] += 1
            cell[1] += r["shape_right"]
            cell[2] += r["clean"]
    return dict(model=model, steps=steps, sigma=sigma, cells="pictures, shape right, clean", **table)


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], *(int(a) for a in args[1:3]), *(float(a) for a in args[3:4]))))
