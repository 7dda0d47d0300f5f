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

from services.decoder.engine import DecoderEngine, UpsamplerEngine
from services.encoder.engine import EncoderEngine
from services.prior.engine import PriorEngine
from training.evaluate import fully_specified_prompts
from training.evaluate_strict import model_defaults
from training.outline import read_strict

BATCH = 8  # images per call (the engines take at most 10)


def run(model: str, n: int, overrides: dict, engines) -> dict:
    enc, pri, dec, up = engines
    sd = model_defaults(model) | overrides
    rows = []
    for i, case_batch in enumerate(batched(fully_specified_prompts(n, random.Random(4321)), BATCH)):
        e = enc.encode_text([c.prompt for c in case_batch], True)
        gens = [torch.Generator().manual_seed(1000 + i * BATCH + j) for j in range(len(case_batch))]
        text = (e.text_embeds, e.text_encoder_hidden_states, e.text_mask)
        p = pri.sample(
            *text,
            gens,
            num_inference_steps=sd["prior_num_inference_steps"],
            guidance_scale=sd["prior_guidance_scale"],
            sampler=sd["prior_sampler"],
        )
        d = dec.decode(
            p.image_embeds,
            *text,
            p.generators,
            num_inference_steps=sd["decoder_num_inference_steps"],
            guidance_scale=sd["decoder_guidance_scale"],
            sampler=sd["decoder_sampler"],
        )
        u = up.upsample(
            d.images,
            d.generators,
            num_inference_steps=sd["super_res_num_inference_steps"],
            sampler=sd["super_res_sampler"],
        )
        for image, case in zip(u.images.float(), case_batch, strict=True):
            want = case.expected
            r = read_strict(image.clamp(-1, 1), want["shape"])
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
    engines = (EncoderEngine.from_pretrained(model), PriorEngine.from_pretrained(model),
               DecoderEngine.from_pretrained(model), UpsamplerEngine.from_pretrained(model))  # fmt: skip
    for spec in sys.argv[3:] or ["{}"]:
        print(json.dumps(run(model, n, json.loads(spec), engines)), flush=True)
