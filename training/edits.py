"""The edit measurement: regenerate the right half of a world image with a prompt, check the object is there.

Through the stack this uses the orchestrator's Edit. In-process, the reference pipelines have no inpainting,
so `inpaint` below runs the same components in one readable loop (RePaint-style: after every step the kept
region is
replaced by the source image noised to that step), at the decoder and then at the upsampler.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from PIL import Image

from training.world import COLOR_NAMES, PALETTE, SHAPES, read_attributes, render, scenes_from_attributes


def _noised(known: torch.Tensor, scheduler, t: int, generator) -> torch.Tensor:
    if t < 0:
        return known
    noise = torch.randn(known.shape, generator=generator).to(known.device)
    return scheduler.add_noise(known, noise, torch.tensor([t]))


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
) -> torch.Tensor:
    """One edited image [1, 3, 128, 128] in [-1, 1].

    image: [1, 3, 128, 128] in [-1, 1]; mask: [1, 1, 128, 128], 1 = keep.
    """
    dev = image.device
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
    # 3. decoder at 32 px, the kept region pinned to the source image
    enc, additive = c["text_proj"](
        image_embeddings=image_embeds,
        prompt_embeds=emb,
        text_encoder_hidden_states=hid,
        do_classifier_free_guidance=True,
    )
    dmask = F.pad(mask_t, (c["text_proj"].clip_extra_context_tokens, 0), value=True)
    size = c["decoder"].config.sample_size
    known = F.interpolate(image, size=(size, size), mode="area")
    keep = (F.interpolate(mask, size=(size, size), mode="area") > 0.5).float()
    sched = c["decoder_scheduler"]
    sched.set_timesteps(steps, device=dev)
    ts = sched.timesteps
    x = torch.randn((1, 3, size, size), generator=generator).to(dev)
    for i, t in enumerate(ts):
        pred = c["decoder"](
            torch.cat([x] * 2), t, encoder_hidden_states=enc, class_labels=additive, attention_mask=dmask
        ).sample
        u, cnd = pred.chunk(2)
        u, _ = u.split(3, dim=1)
        cnd, var = cnd.split(3, dim=1)
        prev = None if i + 1 == len(ts) else ts[i + 1]
        x = sched.step(
            torch.cat([u + decoder_guidance_scale * (cnd - u), var], 1),
            t,
            x,
            prev_timestep=prev,
            generator=generator,
        ).prev_sample
        x = keep * _noised(known, sched, -1 if prev is None else int(prev), generator) + (1 - keep) * x
    small = x.clamp(-1, 1)
    # 4. upsampler, the kept region pinned likewise
    sched = c["super_res_scheduler"]
    sched.set_timesteps(super_res_steps, device=dev)
    ts = sched.timesteps
    big = c["super_res_first"].config.sample_size
    up = F.interpolate(small, size=(big, big), mode="bicubic", align_corners=False, antialias=True)
    x = torch.randn((1, 3, big, big), generator=generator).to(dev)
    for i, t in enumerate(ts):
        unet = c["super_res_last"] if i == len(ts) - 1 else c["super_res_first"]
        pred = unet(torch.cat([x, up], 1), t).sample
        prev = None if i + 1 == len(ts) else ts[i + 1]
        x = sched.step(pred, t, x, prev_timestep=prev, generator=generator).prev_sample
        x = mask * _noised(image, sched, -1 if prev is None else int(prev), generator) + (1 - mask) * x
    return x.clamp(-1, 1)


def score_edits(
    backend, model_dir: str, count: int, rng: random.Random, seed: int, device: str = "cpu", steps: int = 25
) -> dict:
    """Sources: a small object in the left half; the right half is regenerated with a prompt naming a new
    object in the top or bottom right on the same background. Success: that object (shape and colour) is read
    there."""
    from training.evaluate import load_components, to_pil, to_tensor

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
    if getattr(backend, "edit", None) is not None:
        alpha = Image.fromarray((mask[0, 0].numpy() * 255).astype("uint8"))
        masks = [Image.merge("RGBA", (*im.split(), alpha)) for im in to_pil(sources)]
        results = [to_tensor(ims) for ims in backend.edit(to_pil(sources), masks, prompts, 1, seed)]
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
            ).cpu()
            for k, p in enumerate(prompts)
        ]
        how = "in-process RePaint-style loop over the components (the reference pipelines cannot edit)"
    hits = 0
    for a, want, res in zip(attrs, wants, results, strict=True):
        canvas = (PALETTE[a["background"]] * 2 - 1)[:, None, None].expand(3, 128, 128).clone()
        canvas[:, :, 64:] = res[0, :, :, 64:]  # only the regenerated half, on the background colour
        got = read_attributes(canvas[None])[0]
        hits += got["shape"] == want["shape"] and got["color"] == want["color"]
    return dict(edits=count, prompted_object_in_region=round(hits / count, 4), via=how)
