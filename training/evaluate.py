"""Prompt fidelity of a "shapes" model, judged from pixels (no CLIP).

    python -m training.evaluate --model models/shapes-toy [--addr HOST:PORT] [--prompts 200] [--json out.json]

With --addr, images come from the running stack (the orchestrator's ImageService); without it, in-process from
diffusers' reference UnCLIPPipeline / UnCLIPImageVariationPipeline built component by component from the
folder.
Metrics (and the model's targets):
- text-to-image: prompts drawn at random from the fully specified ones (shape × colour × background, with
  and without size/position, every phrasing), 2 images each: share right in shape + colour + background
  (≥ 95 %),
  in size / position where the prompt states them (≥ 90 %);
- variations of rendered world images keep shape and colour (≥ 90 %);
- unspecified attributes vary: over 16 draws, no background colour above 50 %, each size and position seen;
- edits that regenerate the right half with a prompt put the prompted object there (≥ 85 %).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.world import (
    NUM_PHRASINGS,
    Mention,
    caption,
    read_attributes,
    render,
    scenes_from_attributes,
)

COMPONENT_CLASSES = {
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
    "feature_extractor": ("transformers", "CLIPImageProcessor"),
    "prior": ("diffusers", "PriorTransformer"),
    "prior_scheduler": ("diffusers", "UnCLIPScheduler"),
    "text_proj": ("diffusers.pipelines.deprecated.unclip.text_proj", "UnCLIPTextProjModel"),
    "decoder": ("diffusers", "UNet2DConditionModel"),
    "decoder_scheduler": ("diffusers", "UnCLIPScheduler"),
    "super_res_first": ("diffusers", "UNet2DModel"),
    "super_res_last": ("diffusers", "UNet2DModel"),
    "super_res_scheduler": ("diffusers", "UnCLIPScheduler"),
}


def load_components(model_dir: str | Path, device: str = "cpu") -> dict:
    """Every component of a Karlo-layout folder, each loaded with its own from_pretrained."""
    import importlib

    out = {}
    for name, (module, cls) in COMPONENT_CLASSES.items():
        obj = getattr(importlib.import_module(module), cls).from_pretrained(Path(model_dir) / name)
        out[name] = obj.to(device).eval() if isinstance(obj, torch.nn.Module) else obj
    return out


def reference_pipelines(model_dir: str | Path, device: str = "cpu"):
    """diffusers' UnCLIPPipeline and UnCLIPImageVariationPipeline built from the components (the oracle)."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline, UnCLIPPipeline

    c = load_components(model_dir, device)
    t2i = UnCLIPPipeline(
        **{
            k: c[k]
            for k in (
                "prior",
                "decoder",
                "text_encoder",
                "tokenizer",
                "text_proj",
                "super_res_first",
                "super_res_last",
                "prior_scheduler",
                "decoder_scheduler",
                "super_res_scheduler",
            )
        }
    )
    var = UnCLIPImageVariationPipeline(
        **{
            k: c[k]
            for k in (
                "decoder",
                "text_encoder",
                "tokenizer",
                "text_proj",
                "feature_extractor",
                "image_encoder",
                "super_res_first",
                "super_res_last",
                "decoder_scheduler",
                "super_res_scheduler",
            )
        }
    )
    for p in (t2i, var):
        p.set_progress_bar_config(disable=True)
    return t2i, var


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------- back ends
class InProcess:
    """The reference pipelines; image i of a request with seed s uses Generator("cpu").manual_seed(s + i)."""

    name = "in-process diffusers UnCLIPPipeline"

    def __init__(self, model_dir: str, device: str, chunk: int = 32, steps: dict | None = None):
        self.t2i, self.var = reference_pipelines(model_dir, device)
        self.chunk = chunk
        self.steps = steps or {}  # e.g. decoder_num_inference_steps; default: the pipelines' defaults

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Image.Image]]:
        out: list[list[Image.Image]] = []
        for start in range(0, len(prompts), self.chunk):
            batch = prompts[start : start + self.chunk]
            gens = [
                torch.Generator("cpu").manual_seed(seed + (start + k) * n + i)
                for k in range(len(batch))
                for i in range(n)
            ]
            images = self.t2i(batch, num_images_per_prompt=n, generator=gens, **self.steps).images
            out += [images[k * n : (k + 1) * n] for k in range(len(batch))]
        return out

    def variation(self, images: list[Image.Image], n: int, seed: int) -> list[list[Image.Image]]:
        out: list[list[Image.Image]] = []
        for start in range(0, len(images), self.chunk):
            batch = images[start : start + self.chunk]
            gens = [
                torch.Generator("cpu").manual_seed(seed + (start + k) * n + i)
                for k in range(len(batch))
                for i in range(n)
            ]
            steps = {k: v for k, v in self.steps.items() if not k.startswith("prior")}
            res = self.var(image=batch, num_images_per_prompt=n, generator=gens, **steps).images
            out += [res[k * n : (k + 1) * n] for k in range(len(batch))]
        return out

    edit = None  # the reference pipelines have no inpainting


class Stack:
    """The running stack: the orchestrator's ImageService over gRPC."""

    def __init__(
        self, addr: str, sampling: dict | None = None, concurrency: int = 1, api_key: str | None = None
    ):
        import grpc

        from unclip.v1 import orchestrator_pb2, orchestrator_pb2_grpc

        self.pb = orchestrator_pb2
        sampling = dict(sampling or {})
        if "super_res_num_inference_steps" in sampling:  # a repeated field: one entry per upsampler stage
            sampling["super_res_num_inference_steps"] = [sampling["super_res_num_inference_steps"]]
        # text-to-image and edits; variations have no prior, so they take the stack's defaults but for steps
        self.params = orchestrator_pb2.SamplingParams(**sampling)
        self.variation_params = orchestrator_pb2.SamplingParams(
            **{k: v for k, v in sampling.items() if not k.startswith("prior")}
        )
        from unclip.access.client import resolve_key, with_key

        # The key: `api_key`, else UNCLIP_API_KEY, else the running `unclip up` stack's (when addr is its).
        channel = with_key(grpc.insecure_channel(addr), resolve_key(api_key, addr))
        self.stub = orchestrator_pb2_grpc.ImageServiceStub(channel)
        self.name = f"the stack at {addr}"
        # Requests in flight at once: each image keeps its seed, so the images are the same whatever the
        # concurrency (up to the float rounding of cross-request batching); > 1 keeps every stage busy.
        self.concurrency = concurrency

    @staticmethod
    def _pngs(resp) -> list[Image.Image]:
        return [Image.open(io.BytesIO(im.png)).convert("RGB") for im in resp.images]

    @staticmethod
    def _png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    def _map(self, call, items: list) -> list:
        """[call(k, item) ...] in order, `concurrency` at a time."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(call, range(len(items)), items))

    def generate(self, prompts: list[str], n: int, seed: int) -> list[list[Image.Image]]:
        def one(k: int, p: str) -> list[Image.Image]:
            images: list[Image.Image] = []
            for first in range(0, n, 10):  # a request holds at most 10; image i of seed s is seed s + i
                req = self.pb.GenerateRequest(
                    prompt=p, n=min(10, n - first), seed=seed + k * n + first, params=self.params
                )
                images += self._pngs(self.stub.Generate(req, timeout=600))
            # one line per prompt, so that a run cut short still leaves its readings in the log
            got = read_attributes(to_tensor(images))
            print(f"[{k + 1}/{len(prompts)} {time.strftime('%H:%M:%S')}] {p!r} -> {got}", flush=True)
            return images

        return self._map(one, prompts)

    def variation(self, images: list[Image.Image], n: int, seed: int) -> list[list[Image.Image]]:
        def one(k: int, im: Image.Image) -> list[Image.Image]:
            request = self.pb.VariationRequest(
                image=self._png(im), n=n, seed=seed + k * n, params=self.variation_params
            )
            return self._pngs(self.stub.CreateVariation(request, timeout=600))

        return self._map(one, images)

    def edit(
        self,
        images: list[Image.Image],
        masks: list[Image.Image],
        prompts: list[str],
        n: int,
        seed: int,
        **overrides: float,
    ) -> list[list[Image.Image]]:
        """overrides: SamplingParams fields for these requests only (e.g. decoder_guidance_scale)."""
        params = self.pb.SamplingParams()
        params.CopyFrom(self.params)
        params.ClearField("decoder_guidance_scale")  # edits: the stack's own default or an override
        for key, value in overrides.items():
            setattr(params, key, value)
        return [
            self._pngs(
                self.stub.Edit(
                    self.pb.EditRequest(
                        image=self._png(im),
                        mask=self._png(m),
                        prompt=p,
                        n=n,
                        seed=seed + k * n,
                        params=params,
                    ),
                    timeout=600,
                )
            )
            for k, (im, m, p) in enumerate(zip(images, masks, prompts, strict=True))
        ]


# ---------------------------------------------------------------- the measurements
@dataclass
class Case:
    prompt: str
    expected: dict[str, int | None]  # None: not stated by the prompt


def fully_specified_prompts(n: int, rng: random.Random) -> list[Case]:
    cases = []
    for _ in range(n):
        color = rng.randrange(8)
        attrs = dict(
            shape=rng.randrange(4),
            color=color,
            background=(color + 1 + rng.randrange(7)) % 8,
            size=rng.randrange(2),
            position=0,
        )
        if attrs["size"] == 0:
            attrs["position"] = rng.randrange(5)
        m = Mention(color=True, background=True, size=rng.random() < 0.5, position=rng.random() < 0.5)
        text = caption(attrs, m, rng.randrange(NUM_PHRASINGS), rng)
        expected = dict(
            attrs, size=attrs["size"] if m.size else None, position=attrs["position"] if m.position else None
        )
        cases.append(Case(text, expected))
    return cases


def score_text_to_image(cases: list[Case], images: list[list[Image.Image]]) -> dict:
    rows = []
    for case, ims in zip(cases, images, strict=True):
        for got in read_attributes(to_tensor(ims)):
            e = case.expected
            rows.append(
                dict(
                    core=got["shape"] == e["shape"]
                    and got["color"] == e["color"]
                    and got["background"] == e["background"],
                    shape=got["shape"] == e["shape"],
                    color=got["color"] == e["color"],
                    background=got["background"] == e["background"],
                    size=None if e["size"] is None else got["size"] == e["size"],
                    position=None if e["position"] is None else got["position"] == e["position"],
                    swapped=got["color"] == e["background"] and got["background"] == e["color"],
                )
            )

    def share(key: str) -> float:
        vals = [r[key] for r in rows if r[key] is not None]
        return round(sum(vals) / max(len(vals), 1), 4)

    return dict(
        images=len(rows),
        shape_color_background=share("core"),
        shape=share("shape"),
        object_color=share("color"),
        background=share("background"),
        size_when_given=share("size"),
        position_when_given=share("position"),
        colours_swapped=share("swapped"),
    )


def variation_sources(count: int, rng: random.Random, seed: int) -> tuple[list[dict], list[Image.Image]]:
    """`count` rendered world images (128 px) to make variations of, and their attributes."""
    attrs = []
    for _ in range(count):
        color = rng.randrange(8)
        size = rng.randrange(2)
        attrs.append(
            dict(
                shape=rng.randrange(4),
                color=color,
                background=(color + 1 + rng.randrange(7)) % 8,
                size=size,
                position=0 if size else rng.randrange(5),
            )
        )
    return attrs, to_pil(render(scenes_from_attributes(attrs, torch.Generator().manual_seed(seed)), 128))


def score_variations(backend, count: int, rng: random.Random, seed: int) -> dict:
    attrs, sources = variation_sources(count, rng, seed)
    results = backend.variation(sources, 2, seed)
    kept = both = total = 0
    for a, ims in zip(attrs, results, strict=True):
        for got in read_attributes(to_tensor(ims)):
            total += 1
            kept += got["shape"] == a["shape"] and got["color"] == a["color"]
            both += (
                got["shape"] == a["shape"]
                and got["color"] == a["color"]
                and got["background"] == a["background"]
            )
    return dict(
        images=total,
        shape_and_color_kept=round(kept / total, 4),
        shape_color_background_kept=round(both / total, 4),
    )


# Under-specified prompts -> the attributes they leave free. The first four leave size out, so half the draws
# of a perfect model are large (centred) and each corner has only a 10 % chance per draw: over 16 draws such a
# model sees all five positions only ~41 % of the time. The "small ..." prompts leave only position free (each
# 20 %): the fair test of position variety (a perfect model passes ~86 %). `perfect_model_pass` reports it.
DIVERSITY_PROMPTS = {
    "a red circle": ("background", "size", "position"),
    "a blue star": ("background", "size", "position"),
    "a white triangle on a black background": ("size", "position"),
    "a square on a yellow background": ("color", "size", "position"),
    "a small red circle": ("background", "position"),
    "a small blue star": ("background", "position"),
    "a small white triangle on a black background": ("position",),
    "a small square on a yellow background": ("color", "position"),
}


def _diversity_checks(got: list[dict[str, int]], free: tuple[str, ...]) -> dict:
    draws = len(got)
    counts = {key: Counter(g[key] for g in got) for key in ("background", "color", "size", "position")}
    checks: dict = {}
    for key in ("background", "color"):
        if key in free:
            checks[f"{key}_max_share"] = round(max(counts[key].values()) / draws, 3)
    if "size" in free:
        checks["sizes_seen"] = sorted(counts["size"])
    if "position" in free:
        checks["positions_seen"] = sorted(counts["position"])
    ok = all(v <= 0.5 for k, v in checks.items() if k.endswith("max_share"))
    ok = ok and set(checks.get("sizes_seen", [0, 1])) >= {0, 1}
    checks["ok"] = ok and set(checks.get("positions_seen", range(5))) >= set(range(5))
    return checks


def perfect_model_pass(prompt: str, free: tuple[str, ...], draws: int, trials: int = 4000) -> float:
    """The chance that a perfect model of the world (draws from the world given what the prompt states)
    passes the prompt's diversity check, estimated from `trials` simulated sets of draws."""
    from training.world import parse_caption

    stated = parse_caption(prompt)
    rng = random.Random(0)
    passes = 0
    for _ in range(trials):
        got = []
        for _ in range(draws):
            color = stated["color"] if stated["color"] is not None else rng.randrange(8)
            if stated["background"] is not None:
                background = stated["background"]
                if stated["color"] is None:  # object colour uniform over the other seven
                    color = (background + 1 + rng.randrange(7)) % 8
            else:
                background = (color + 1 + rng.randrange(7)) % 8
            size = stated["size"] if stated["size"] is not None else rng.randrange(2)
            position = 0 if size == 1 else rng.randrange(5)
            got.append(dict(shape=0, color=color, background=background, size=size, position=position))
        passes += _diversity_checks(got, free)["ok"]
    return round(passes / trials, 3)


def score_diversity(backend, seed: int, draws: int = 16) -> dict:
    if draws < 1:
        return {}
    out = {}
    for k, (prompt, free) in enumerate(DIVERSITY_PROMPTS.items()):
        got = read_attributes(to_tensor(backend.generate([prompt], draws, seed + 1000 * k)[0]))
        checks = _diversity_checks(got, free)
        checks["perfect_model_pass"] = perfect_model_pass(prompt, free, draws)
        out[prompt] = checks
    out["all_ok"] = all(v["ok"] for v in out.values())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model folder (Karlo layout)")
    p.add_argument(
        "--addr", default=None, help="orchestrator HOST:PORT; default: in-process reference pipeline"
    )
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--variations", type=int, default=50)
    p.add_argument("--edits", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--draws", type=int, default=16, help="draws per under-specified prompt (diversity)")
    p.add_argument("--quick", action="store_true", help="2 denoising steps per stage (smoke tests only)")
    p.add_argument(
        "--prior-guidance-scale",
        type=float,
        default=None,
        help="the prior's guidance for text-to-image and edits (default: the pipeline's / stack's, 4.0)",
    )
    p.add_argument(
        "--decoder-guidance-scale",
        type=float,
        default=None,
        help="the decoder's guidance for text-to-image and variations (default: the pipeline's / stack's, 8)",
    )
    p.add_argument(
        "--edit-decoder-guidance-scale",
        type=float,
        default=None,
        help="the decoder's guidance for the edits (default: the stack's / the in-process loop's, 8.0)",
    )
    p.add_argument(
        "--concurrency", type=int, default=1, help="with --addr: requests in flight at once (same images)"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--save-grid", default=None, help="write a contact sheet of some generated images here")
    p.add_argument(
        "--skip-text-to-image",
        action="store_true",
        help="draw the --prompts cases but do not generate them (the random stream, and so the variation and "
        "edit cases, stay those of the full run): the rest of a run split over two invocations",
    )
    args = p.parse_args(argv)
    quick = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
    sampling = dict(quick) if args.quick else {}
    if args.prior_guidance_scale is not None:
        sampling["prior_guidance_scale"] = args.prior_guidance_scale
    if args.decoder_guidance_scale is not None:
        sampling["decoder_guidance_scale"] = args.decoder_guidance_scale
    backend = (
        Stack(args.addr, sampling, args.concurrency)
        if args.addr
        else InProcess(args.model, args.device, steps=sampling or None)
    )
    rng = random.Random(args.seed)
    t0 = time.time()
    cases = fully_specified_prompts(args.prompts, rng)
    images = [] if args.skip_text_to_image else backend.generate([c.prompt for c in cases], 2, args.seed)
    result: dict = dict(backend=backend.name, sampling=sampling or "defaults")
    if images:
        result["text_to_image"] = score_text_to_image(cases, images)
        print(json.dumps(result, indent=1), flush=True)
    if args.save_grid and images:
        flat = [im for ims in images[:16] for im in ims][:32]
        sheet = Image.new("RGB", (128 * 8, 128 * 4))
        for i, im in enumerate(flat):
            sheet.paste(im.resize((128, 128)), (128 * (i % 8), 128 * (i // 8)))
        sheet.save(args.save_grid)
        result["grid_prompts"] = [c.prompt for c in cases[:16]]
    if args.variations:
        result["variations"] = score_variations(backend, args.variations, rng, args.seed)
        print(json.dumps(result["variations"]), flush=True)
    result["diversity"] = score_diversity(backend, args.seed, args.draws)
    print(json.dumps(result["diversity"]), flush=True)
    if args.edits:
        from training.edits import score_edits

        result["edits"] = score_edits(
            backend,
            args.model,
            args.edits,
            rng,
            args.seed,
            args.device,
            steps=2 if args.quick else 25,
            prior_guidance_scale=sampling.get("prior_guidance_scale", 4.0),
            decoder_guidance_scale=args.edit_decoder_guidance_scale,
        )
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
