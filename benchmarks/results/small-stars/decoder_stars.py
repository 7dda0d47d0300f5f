"""The decoder's small stars against the world's: 8 draws of one small-star prompt through the stack's
encoder, prior and decoder at the defaults (float32), read by the strict reader at the decoder's own 32 px,
beside 8 renders of the same scene at 32 px; then the same 8 decoder outputs through each given upsampler
(dpmsolver++, 2 steps), read at 128 px. Prints one JSON line of the star fit's IoUs.

    PYTHONPATH=. python benchmarks/results/small-stars/decoder_stars.py MODEL [UPSAMPLER_MODEL ...]
"""

import json
import sys

import torch

from benchmarks.common import draw_in_process, in_process_engines
from services.decoder.engine import UpsamplerEngine
from training.evaluate_strict import model_defaults
from training.outline import read_strict
from training.world import render, scenes_from_attributes

PROMPT = "a small orange star in the middle on a blue background"
SCENE = dict(shape=3, color=5, background=2, size=0, position=0)  # the same, in world indices
STAR = 3


def main(model: str, upsamplers: list[str]) -> dict:
    engines = in_process_engines(model)
    gens = [torch.Generator().manual_seed(50 + j) for j in range(8)]
    low, _ = draw_in_process(engines, [PROMPT] * 8, gens, model_defaults(model))
    renders = render(scenes_from_attributes([SCENE] * 8, torch.Generator().manual_seed(1)), 32)
    result = dict(
        model=model,
        decoder_at_32px=[read_strict(x, STAR)["iou"] for x in low],
        renders_at_32px=[read_strict(x, STAR)["iou"] for x in renders],
    )
    for folder in upsamplers:
        up = UpsamplerEngine.from_pretrained(folder)
        g = [torch.Generator().manual_seed(9 + j) for j in range(8)]
        high = up.upsample(low, g, num_inference_steps=2, sampler="dpmsolver++").images.float()
        result[f"decoder_through {folder}"] = [read_strict(x.clamp(-1, 1), STAR)["iou"] for x in high]
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
