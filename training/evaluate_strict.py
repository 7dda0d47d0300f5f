"""The strict evaluation of a "shapes" model: the outline reader (training/outline.py) beside today's measures
(training/evaluate.py), on the same images.

    python -m training.evaluate_strict --model models/shapes-toy [--addr HOST:PORT] [--prompts 48] \\
        [--variations 12] [--edits 12] [--json out.json] [--save-dir DIR]

Without --addr, in process (diffusers' reference pipelines; edits through training/edits.py's loop) at the
model folder's own sampling defaults (`sampling_defaults.json`: prior guidance 2, decoder guidance 2,
edits 4); with --addr, the running stack at its defaults; with --from-dir, the pictures an earlier run saved
with --save-dir, read again (no generation). The same prompts, seeds and cases as `training.evaluate` with
the same --seed and counts. Measures (targets from the issue of crisp, clean pictures):
- text-to-image: shape by geometry + colour + background right (≥ 95 %), size / position by the fitted pose,
  outlines crisp, pictures clean (≥ 90 %: ≤ 2 % off-palette pixels away from the edge, no blob > 8 px);
- variations of rendered world images keep shape (by geometry) and colour (≥ 90 %), and are clean;
- edits keep the unmasked pixels and draw the prompted object (by geometry) in the regenerated half (≥ 85 %).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from training.edits import run_edits
from training.evaluate import (
    InProcess,
    Stack,
    fully_specified_prompts,
    score_text_to_image,
    to_pil,
    to_tensor,
    variation_sources,
)
from training.outline import StrictConfig, read_strict
from training.world import PALETTE


def _share(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def _picture_summary(readings: list[dict]) -> dict:
    """Cleanliness over a set of readings."""
    offs = [r["off_palette_share"] for r in readings]
    blobs = [r["largest_blob_px"] for r in readings]
    specks = [r["object_blob_px"] for r in readings if r.get("object_blob_px") is not None]
    return dict(
        clean=_share([r["clean"] for r in readings]),
        clean_count=sum(r["clean"] for r in readings),
        off_palette_share_median=round(statistics.median(offs), 4),
        largest_blob_px_median=statistics.median(blobs),
        object_speck_px_median=statistics.median(specks) if specks else None,
        background_deviation_mean=round(statistics.mean(r["background_deviation_mean"] for r in readings), 4),
    )


def strict_text_to_image(cases, images: list[list[Image.Image]], cfg: StrictConfig) -> dict:
    readings, rows = [], []
    for case, ims in zip(cases, images, strict=True):
        e = case.expected
        for im in to_tensor(ims):
            r = read_strict(im, e["shape"], cfg)
            readings.append(r)
            colours = r["color"] == e["color"] and r["background"] == e["background"]
            rows.append(
                dict(
                    core=r["shape_right"] and colours,
                    crisp=r["shape_right"] and colours and bool(r.get("outline_ok")),
                    shape=r["shape_right"],
                    size=None if e["size"] is None else r["size"] == e["size"],
                    position=None if e["position"] is None else r["position"] == e["position"],
                )
            )
    return dict(
        images=len(rows),
        shape_geometry_color_background=_share([r["core"] for r in rows]),
        shape_geometry=_share([r["shape"] for r in rows]),
        also_outline_crisp=_share([r["crisp"] for r in rows]),
        iou_median=round(statistics.median(r["iou"] for r in readings), 4),
        size_when_given=_share([r["size"] for r in rows]),
        position_when_given=_share([r["position"] for r in rows]),
        **_picture_summary(readings),
    )


def strict_variations(attrs: list[dict], results: list[list[Image.Image]], cfg: StrictConfig) -> dict:
    readings, kept = [], []
    for a, ims in zip(attrs, results, strict=True):
        for im in to_tensor(ims):
            r = read_strict(im, a["shape"], cfg)
            readings.append(r)
            kept.append(r["shape_right"] and r["color"] == a["color"])
    return dict(images=len(kept), shape_geometry_and_color_kept=_share(kept), **_picture_summary(readings))


def strict_edits(attrs, wants, sources, mask, results, cfg: StrictConfig) -> dict:
    """Unmasked pixels kept (≥ 99 % within the off-palette tolerance of the source) and the prompted object
    drawn by geometry in the regenerated half (read on the source's background, as training/edits.py does);
    cleanliness of the regenerated half, read the same way."""
    kept, drawn, readings = [], [], []
    for a, w, src, res in zip(attrs, wants, sources, results, strict=True):
        out = res[0].float()
        keep = mask[0, 0].bool()
        diff = ((out - src) / 2).norm(dim=0)[keep]  # RGB distance, channels in [0, 1]
        kept.append(float((diff <= cfg.off_palette_tol).float().mean()) >= 0.99)
        size = out.shape[-1]
        canvas = (PALETTE[a["background"]] * 2 - 1)[:, None, None].expand(3, size, size).clone()
        canvas[:, :, size // 2 :] = out[:, :, size // 2 :]
        r = read_strict(canvas, w["shape"], cfg)
        drawn.append(r["shape_right"] and r["color"] == w["color"])
        readings.append(
            r
        )  # cleanliness of the regenerated half (the kept half is the source's, checked above)
    return dict(
        edits=len(kept),
        unmasked_kept=_share(kept),
        prompted_object_by_geometry=_share(drawn),
        **_picture_summary(readings),
    )


class Saved:
    """The pictures of an earlier run's --save-dir, in the order that run made them (same seed and counts):
    re-reads them without generating anything."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.name = f"pictures saved in {folder}"
        self.generated = 0  # text-to-image prompts handed out so far (main asks 8 at a time)

    def _load(self, prefix: str, count: int, first: int = 0) -> list[list[Image.Image]]:
        out = []
        for k in range(first, first + count):
            files = sorted(self.folder.glob(f"{prefix}-{k:03d}-*.png"))
            if not files:
                raise FileNotFoundError(f"--from-dir: no {prefix}-{k:03d}-*.png in {self.folder}")
            out.append([Image.open(f).convert("RGB") for f in files])
        return out

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Image.Image]]:
        self.generated += len(prompts)
        return self._load("t2i", len(prompts), self.generated - len(prompts))

    def variation(self, images: list[Image.Image], n: int, seed: int) -> list[list[Image.Image]]:
        return self._load("var", len(images))

    def edit(self, images, masks, prompts, n: int, seed: int, **overrides) -> list[list[Image.Image]]:
        return self._load("edit", len(images))


def model_defaults(model_dir: str) -> dict:
    """The model folder's sampling_defaults.json ({} when absent)."""
    path = Path(model_dir) / "sampling_defaults.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(images: list[list[Image.Image]], folder: Path, prefix: str, first: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, ims in enumerate(images, start=first):
        for i, im in enumerate(ims):
            im.save(folder / f"{prefix}-{k:03d}-{i}.png")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model folder (Karlo layout)")
    p.add_argument("--addr", default=None, help="orchestrator HOST:PORT; default: in process")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--variations", type=int, default=12)
    p.add_argument("--edits", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true", help="2 denoising steps per stage (smoke tests only)")
    p.add_argument("--decoder-steps", type=int, default=None, help="in process: the decoder's steps")
    p.add_argument("--super-res-steps", type=int, default=None, help="in process: the upsampler's steps")
    p.add_argument("--decoder-guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--save-dir", default=None, help="write every generated picture here (PNG)")
    p.add_argument(
        "--from-dir", default=None, help="re-read the pictures of an earlier --save-dir (same seed, counts)"
    )
    args = p.parse_args(argv)
    defaults = {} if args.addr else model_defaults(args.model)
    edit_guidance = defaults.pop("edit_decoder_guidance_scale", None)
    sampling = dict(defaults)
    if args.quick:
        sampling.update(
            prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2
        )
    if args.decoder_steps:
        sampling["decoder_num_inference_steps"] = args.decoder_steps
    if args.super_res_steps:
        sampling["super_res_num_inference_steps"] = args.super_res_steps
    if args.decoder_guidance_scale is not None:
        sampling["decoder_guidance_scale"] = args.decoder_guidance_scale
    if args.from_dir:
        backend = Saved(args.from_dir)
    elif args.addr:
        backend = Stack(args.addr, sampling)
    else:
        backend = InProcess(args.model, args.device, steps=sampling)
    cfg, rng, t0 = StrictConfig(), random.Random(args.seed), time.time()
    save = Path(args.save_dir) if args.save_dir else None
    result: dict = dict(backend=backend.name, sampling=sampling or "the stack's defaults", seed=args.seed)
    cases = fully_specified_prompts(args.prompts, rng)
    if cases:
        if save:
            save.mkdir(parents=True, exist_ok=True)
            (save / "prompts.json").write_text(json.dumps([c.__dict__ for c in cases], indent=0))
        images = []
        for start in range(
            0, len(cases), 8
        ):  # 8 prompts at a time, saved as they come (a cut run keeps them)
            batch = backend.generate([c.prompt for c in cases[start : start + 8]], 2, args.seed + 2 * start)
            if save:
                _save(batch, save, "t2i", start)
            images += batch
        result["text_to_image"] = dict(
            strict=strict_text_to_image(cases, images, cfg), lenient=score_text_to_image(cases, images)
        )
        print(json.dumps(result["text_to_image"]), flush=True)
    if args.variations:
        attrs, sources = variation_sources(args.variations, rng, args.seed)
        results = backend.variation(sources, 2, args.seed)
        if save:
            _save(results, save, "var")
        result["variations"] = strict_variations(attrs, results, cfg)
        print(json.dumps(result["variations"]), flush=True)
    if args.edits:
        steps = 2 if args.quick else 25
        attrs, wants, _, sources, mask, results, how = run_edits(
            backend,
            args.model,
            args.edits,
            rng,
            args.seed,
            args.device,
            steps=steps,
            prior_guidance_scale=sampling.get("prior_guidance_scale", 4.0),
            decoder_guidance_scale=edit_guidance,
        )
        if save:
            _save([to_pil(r) for r in results], save, "edit")
        if args.from_dir:
            how = backend.name
        result["edits"] = dict(strict_edits(attrs, wants, sources, mask, results, cfg), via=how)
        print(json.dumps(result["edits"]), flush=True)
    result["world_renders"] = "right and clean by construction: tests/training/test_outline.py"
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
