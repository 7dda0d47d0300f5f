"""Where the upsampler's speck came from: a single-pixel spike that sets GroupNorm's statistics.

For renders of the world (clean 32 px input, bicubic to 128 px, as the stack feeds the upsampler) the
upsampler predicts x0 at three timesteps. Reported per timestep: the strict reader's cleanliness of those
predictions; for every GroupNorm at 128 px, the share of its groups in which one element (of 16,384 per
channel) carries more than 5 % / 20 % of the group's variance; with a mid-block attention, the share of
all attention that its most-attended 32 px cell takes and how often the worst off-palette pixel lies within
8 px of that cell.

    .venv/bin/python benchmarks/results/upsampler-finetune/droplet.py MODEL_DIR [N]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UnCLIPScheduler, UNet2DModel

from training import components as C
from training.outline import boundary_band, cleanliness, read_colours
from training.world import PALETTE, render, sample_scenes


def worst_pixel(rgb: torch.Tensor, bg: int, obj: int) -> tuple[int, int]:
    """The pixel farthest from both palette colours, away from the colour boundary and the canvas border."""
    d_bg = (rgb - PALETTE[bg][:, None, None]).norm(dim=0).numpy()
    d_obj = (rgb - PALETTE[obj][:, None, None]).norm(dim=0).numpy()
    dev = np.minimum(d_bg, d_obj) * ~boundary_band(d_obj < d_bg)
    dev[:4], dev[-4:], dev[:, :4], dev[:, -4:] = 0, 0, 0, 0
    return divmod(int(dev.argmax()), dev.shape[1])


def spike_shares(inputs: dict[str, tuple[torch.Tensor, int]]) -> tuple[float, float]:
    """Over the GroupNorms at 128 px: the share of groups where one element carries > 5 % and > 20 % of the
    group's variance."""
    tops = []
    for h, groups in inputs.values():
        if h.shape[-1] != 128:
            continue
        x = h.reshape(h.shape[0], groups, -1)
        dev = (x - x.mean(-1, keepdim=True)).pow(2)
        tops.append((dev.max(-1).values / dev.sum(-1)).flatten())
    top = torch.cat(tops)
    return float((top > 0.05).float().mean()), float((top > 0.2).float().mean())


def attention_line(attn, h: torch.Tensor, rgbs, colours) -> str:
    n, channels, side = h.shape[0], h.shape[1], h.shape[-1]
    tokens = h.flatten(2).transpose(1, 2)  # [n, 1024, C]; this attention has no norm before it
    q = attn.to_q(tokens).view(n, -1, attn.heads, channels // attn.heads).transpose(1, 2)
    k = attn.to_k(tokens).view(n, -1, attn.heads, channels // attn.heads).transpose(1, 2)
    received = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(2).mean(1)  # [n, 1024], sums to 1
    near, shares = 0, []
    for b in range(n):
        cell = int(received[b].argmax())
        shares.append(float(received[b, cell]))
        sy, sx = divmod(cell, side)
        y, x = worst_pixel(rgbs[b], *colours[b])
        near += abs(4 * sy + 2 - y) <= 8 and abs(4 * sx + 2 - x) <= 8
    return (
        f"; attention: the most-attended cell takes {min(shares):.1%}-{max(shares):.1%} of it "
        f"(uniform {1 / side**2:.2%}), worst off-palette pixel within 8 px of it in {near}/{n} (chance ~2 %)"
    )


def main(model: str, n: int = 16) -> None:
    unet = UNet2DModel.from_pretrained(f"{model}/super_res_first").eval()
    scenes = sample_scenes(n, torch.Generator().manual_seed(5))
    high, low = render(scenes, 128), render(scenes, 32)
    cond = F.interpolate(low, size=(128, 128), mode="bicubic", align_corners=False, antialias=True)
    acp = UnCLIPScheduler(**C.DECODER_SCHEDULER).alphas_cumprod
    norms: dict[str, tuple[torch.Tensor, int]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_pre_hook(
                lambda m, a, _n=name: norms.__setitem__(_n, (a[0].detach(), m.num_groups))
            )
    attn = unet.mid_block.attentions[0]
    if attn is not None:
        attn.register_forward_pre_hook(
            lambda m, a, kw: norms.__setitem__("attn", (a[0] if a else kw["hidden_states"], 0)),
            with_kwargs=True,
        )
    for t in (995, 495, 200):
        a = acp[t]
        x_t = a.sqrt() * high + (1 - a).sqrt() * torch.randn(
            high.shape, generator=torch.Generator().manual_seed(2)
        )
        with torch.no_grad():
            x0 = unet(torch.cat([x_t, cond], 1), torch.tensor(t)).sample
            rgbs = [(x0[b].clamp(-1, 1) + 1) / 2 for b in range(n)]
            colours = [read_colours(rgb) for rgb in rgbs]
            clean = [cleanliness(rgb, *c) for rgb, c in zip(rgbs, colours, strict=True)]
            blobs = sorted(c["largest_blob_px"] for c in clean)
            attn_input = norms.pop("attn", (None, 0))[0]
            over5, over20 = spike_shares(norms)
            line = (
                f"t={t}: clean {sum(c['clean'] for c in clean)}/{n}, largest off-palette blob median "
                f"{blobs[n // 2]} px; GroupNorm groups at 128 px with one element > 5 % of the variance: "
                f"{over5:.0%}, > 20 %: {over20:.0%}"
            )
            print(line + (attention_line(attn, attn_input, rgbs, colours) if attn is not None else ""))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16)
