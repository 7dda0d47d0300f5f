"""The edit measurement: regenerate the right half of a world image with a prompt, check the object is there.

Through the stack this uses the orchestrator's Edit. In-process, the reference pipelines have no inpainting,
so `inpaint` below runs the same components in one readable loop with the stack's own masked-sampling
algorithm (services/decoder/inpaint.py's KnownRegion): the schedule an edit walks (RePaint-style jumps back up
at the decoder when resampling is on, re-noised with ``KnownRegion.renoise``), the known region pasted back
after every model step (``KnownRegion.paste``), at the decoder and then at the upsampler.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from PIL import Image

from services.decoder.inpaint import InpaintInput, KnownRegion, UpsamplerKnownRegion
from training.world import COLOR_NAMES, PALETTE, SHAPES, read_attributes, render, scenes_from_attributes


def _walk(sched, known: KnownRegion, steps: int, x: torch.Tensor, generators, model_step) -> torch.Tensor:
    """Walks known.schedule(...) from x: a model step (then the paste) down, a re-noise up.

    model_step(x, t, prev_timestep) -> the scheduler's prev_sample.
    """
    sched.set_timesteps(steps, device=x.device)
    walk = known.schedule([int(t) for t in sched.timesteps])
    for i, t in enumerate(walk):
        prev = None if i + 1 == len(walk) else walk[i + 1]
        if prev is not None and prev > t:  # a jump back up: forward diffusion, no model call
            x = known.renoise(x, sched, t, prev, generators)
            continue
        x = model_step(x, t, prev)
        x = known.paste(x, sched, prev, generators)
    return x


@torch.no_grad()
def inpaint(
    c: dict,
    prompt: str,
    image: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    steps: int = 25,
    prior_guidance_scale: float = 4.0,
    decoder_guidance_scale: float = 8.0,
    super_res_steps: int = 7,
    schedule: dict | None = None,
    upsample: bool = True,
) -> torch.Tensor:
    """One edited image [1, 3, 128, 128] in [-1, 1] ([1, 3, 32, 32], the decoder's, if not upsample).

    image: [1, 3, 128, 128] in [-1, 1]; mask: [1, 1, 128, 128], 1 = keep. schedule: KnownRegion overrides at
    the decoder (jump_length, resample_jumps, resample_until); default: KnownRegion's defaults, as the stack.
    """
    dev = image.device
    edit = InpaintInput(image=image, mask=mask)
    gens = [generator]
    # 1. encode the prompt and "" (the unconditional branch), as UnCLIPPipeline does
    tok = c["tokenizer"](
        ["", prompt],
        padding="max_length",
        max_length=c["tokenizer"].model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    out = c["text_encoder"](tok.input_ids.to(dev))
    emb, hid, mask_t = out.text_embeds, out.last_hidden_state, tok.attention_mask.bool().to(dev)
    # 2. prior: the image embedding
    sched = c["prior_scheduler"]
    sched.set_timesteps(steps, device=dev)
    x = torch.randn((1, c["prior"].config.embedding_dim), generator=generator).to(dev)
    ts = sched.timesteps
    for i, t in enumerate(ts):
        pred = c["prior"](
            torch.cat([x] * 2),
            timestep=t,
            proj_embedding=emb,
            encoder_hidden_states=hid,
            attention_mask=mask_t,
        ).predicted_image_embedding
        u, cnd = pred.chunk(2)
        prev = None if i + 1 == len(ts) else ts[i + 1]
        x = sched.step(
            u + prior_guidance_scale * (cnd - u), t, x, generator=generator, prev_timestep=prev
        ).prev_sample
    image_embeds = c["prior"].post_process_latents(x)
    # 3. decoder at 32 px, the known region pasted back, resampled (RePaint jumps)
    enc, additive = c["text_proj"](
        image_embeddings=image_embeds,
        prompt_embeds=emb,
        text_encoder_hidden_states=hid,
        do_classifier_free_guidance=True,
    )
    dmask = F.pad(mask_t, (c["text_proj"].clip_extra_context_tokens, 0), value=True)
    size = c["decoder"].config.sample_size
    sched = c["decoder_scheduler"]

    def decoder_step(x, t, prev):
        pred = c["decoder"](
            torch.cat([x] * 2), t, encoder_hidden_states=enc, class_labels=additive, attention_mask=dmask
        ).sample
        u, cnd = pred.chunk(2)
        u, _ = u.split(3, dim=1)
        cnd, var = cnd.split(3, dim=1)
        guided = torch.cat([u + decoder_guidance_scale * (cnd - u), var], 1)
        return sched.step(guided, t, x, prev_timestep=prev, generator=generator).prev_sample

    known = KnownRegion.at_size(edit, size, dev, **(schedule or {}))
    x = torch.randn((1, 3, size, size), generator=generator).to(dev)
    small = _walk(sched, known, steps, x, gens, decoder_step).clamp(-1, 1)
    if not upsample:
        return small
    # 4. upsampler, the known region pasted back likewise (plain schedule)
    sched = c["super_res_scheduler"]
    big = c["super_res_first"].config.sample_size
    up = F.interpolate(small, size=(big, big), mode="bicubic", align_corners=False, antialias=True)
    sched.set_timesteps(super_res_steps, device=dev)
    last_t = int(sched.timesteps[-1])

    def super_res_step(x, t, prev):
        unet = c["super_res_last"] if t == last_t else c["super_res_first"]
        pred = unet(torch.cat([x, up], 1), t).sample
        return sched.step(pred, t, x, prev_timestep=prev, generator=generator).prev_sample

    known = UpsamplerKnownRegion.at_size(edit, big, dev)
    x = torch.randn((1, 3, big, big), generator=generator).to(dev)
    return _walk(sched, known, super_res_steps, x, gens, super_res_step).clamp(-1, 1)


def edit_cases(count: int, rng: random.Random, seed: int):
    """Sources: a small object in the left half; the right half to be regenerated with a prompt naming a new
    object in the top or bottom right on the same background.

    Returns (attrs, wants, prompts, sources [count, 3, 128, 128], mask [1, 1, 128, 128], 1 = keep)."""
    attrs, prompts, wants = [], [], []
    for _ in range(count):
        bg = rng.randrange(8)
        color = (bg + 1 + rng.randrange(7)) % 8
        attrs.append(
            dict(shape=rng.randrange(4), color=color, background=bg, size=0, position=rng.choice([1, 3]))
        )
        want = dict(
            shape=rng.randrange(4), color=(bg + 1 + rng.randrange(7)) % 8, position=rng.choice([2, 4])
        )
        wants.append(want)
        where = "top right" if want["position"] == 2 else "bottom right"
        prompts.append(
            f"a small {COLOR_NAMES[want['color']]} {SHAPES[want['shape']]} in the {where} "
            f"on a {COLOR_NAMES[bg]} background"
        )
    sources = render(scenes_from_attributes(attrs, torch.Generator().manual_seed(seed)), 128)
    mask = torch.ones(1, 1, 128, 128)
    mask[..., 64:] = 0  # regenerate the right half
    return attrs, wants, prompts, sources, mask


def edit_hit(source_attrs: dict, want: dict, result: torch.Tensor) -> bool:
    """The prompted object (shape and colour) is read in the regenerated right half of result [3, S, S]."""
    size = result.shape[-1]
    canvas = (PALETTE[source_attrs["background"]] * 2 - 1)[:, None, None].expand(3, size, size).clone()
    canvas[:, :, size // 2 :] = result[:, :, size // 2 :]  # only the regenerated half, on the background
    got = read_attributes(canvas[None])[0]
    return got["shape"] == want["shape"] and got["color"] == want["color"]


def score_edits(
    backend,
    model_dir: str,
    count: int,
    rng: random.Random,
    seed: int,
    device: str = "cpu",
    steps: int = 25,
    schedule: dict | None = None,
    prior_guidance_scale: float = 4.0,
    decoder_guidance_scale: float | None = None,
) -> dict:
    """Regenerates the right half of `count` sources (edit_cases) with a prompt; success: the prompted object
    is read there. schedule: in-process only, KnownRegion overrides at the decoder (default: the stack's).
    decoder_guidance_scale: the decoder's guidance for the edits, sent in the Edit request's params through
    the stack (None: in process 8; through the stack its default, the model folder's
    edit_decoder_guidance_scale: 4 for shapes-toy)."""
    attrs, wants, _, _, _, results, how = run_edits(
        backend,
        model_dir,
        count,
        rng,
        seed,
        device,
        steps,
        schedule,
        prior_guidance_scale,
        decoder_guidance_scale,
    )
    hits = sum(edit_hit(a, w, r[0]) for a, w, r in zip(attrs, wants, results, strict=True))
    return dict(
        edits=count,
        prompted_object_in_region=round(hits / count, 4),
        decoder_guidance_scale=decoder_guidance_scale or "default",
        via=how,
    )


def run_edits(
    backend,
    model_dir: str,
    count: int,
    rng: random.Random,
    seed: int,
    device: str = "cpu",
    steps: int = 25,
    schedule: dict | None = None,
    prior_guidance_scale: float = 4.0,
    decoder_guidance_scale: float | None = None,
) -> tuple:
    """The edits of score_edits: (attrs, wants, prompts, sources, mask, results [each 1, 3, S, S], how)."""
    from training.evaluate import load_components, to_pil, to_tensor

    attrs, wants, prompts, sources, mask = edit_cases(count, rng, seed)
    if getattr(backend, "edit", None) is not None:
        alpha = Image.fromarray((mask[0, 0].numpy() * 255).astype("uint8"))
        masks = [Image.merge("RGBA", (*im.split(), alpha)) for im in to_pil(sources)]
        overrides = (
            {} if decoder_guidance_scale is None else dict(decoder_guidance_scale=decoder_guidance_scale)
        )
        results = [
            to_tensor(ims) for ims in backend.edit(to_pil(sources), masks, prompts, 1, seed, **overrides)
        ]
        how = backend.name
    else:
        c = load_components(model_dir, device)
        results = [
            inpaint(
                c,
                p,
                sources[k : k + 1].to(device),
                mask.to(device),
                torch.Generator("cpu").manual_seed(seed + k),
                steps=steps,
                super_res_steps=min(steps, 7),
                prior_guidance_scale=prior_guidance_scale,
                decoder_guidance_scale=8.0 if decoder_guidance_scale is None else decoder_guidance_scale,
                schedule=schedule,
            ).cpu()
            for k, p in enumerate(prompts)
        ]
        walk = KnownRegion.at_size(InpaintInput(sources[:1], mask), 32, "cpu", **(schedule or {}))
        how = (
            "in-process loop over the components with the stack's KnownRegion "
            f"(jump_length {walk.jump_length}, resample_jumps {walk.resample_jumps}, "
            f"resample_until {walk.resample_until}; the reference pipelines cannot edit)"
        )
    return attrs, wants, prompts, sources, mask, results, how
