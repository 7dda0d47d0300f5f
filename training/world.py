"""The "shapes" world: one object on a plain background, rendered on the fly, with captions.

Rendering is a batched signed-distance evaluation in torch (runs on the CPU or a GPU), antialiased by pixel
coverage, so a training step renders its own batch instead of reading a dataset. `read_attributes` reads the
attributes back from pixels (no CLIP): the evaluation and the tests use it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

SHAPES = ["circle", "square", "triangle", "star"]
COLOR_NAMES = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
COLOR_HEX = ["#E53935", "#43A047", "#1E88E5", "#FDD835", "#8E24AA", "#FB8C00", "#FAFAFA", "#212121"]
SIZES = ["small", "large"]
POSITIONS = ["center", "top left", "top right", "bottom left", "bottom right"]
# Centre of a small object per position, in canvas units ([-1, 1], x right, y down).
POSITION_XY = [(0.0, 0.0), (-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)]
# Half the object's extent: a third of the canvas side (small) or two thirds (large).
HALF_EXTENT = [1 / 3, 2 / 3]
# Per shape, its SDF radius parameter for a half-extent of 1 (so the shapes look about as big).
SHAPE_SCALE = [1.0, 0.9, 1.1, 1.2]
STAR_INNER = 0.45  # inner/outer radius ratio of the five-pointed star


def _rgb(hex_code: str) -> tuple[float, float, float]:
    return tuple(int(hex_code[i : i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]


PALETTE = torch.tensor([_rgb(h) for h in COLOR_HEX])  # [8, 3] in [0, 1]


@dataclass
class Scenes:
    """A batch of scenes; every field is a tensor of shape [B]."""

    shape: torch.Tensor  # index into SHAPES
    color: torch.Tensor  # object colour, index into COLOR_NAMES
    background: torch.Tensor  # background colour (never the object colour)
    size: torch.Tensor  # 0 small, 1 large
    position: torch.Tensor  # index into POSITIONS (large objects are always 0, centred)
    dx: torch.Tensor  # position jitter, canvas units
    dy: torch.Tensor
    scale: torch.Tensor  # size jitter, multiplicative
    angle: torch.Tensor  # rotation jitter, radians (±10°)

    def __len__(self) -> int:
        return self.shape.shape[0]

    def to(self, device: torch.device | str) -> Scenes:
        return Scenes(**{k: v.to(device) for k, v in self.__dict__.items()})

    def index(self, i: int) -> dict[str, int]:
        return {k: int(getattr(self, k)[i]) for k in ("shape", "color", "background", "size", "position")}


def sample_scenes(n: int, generator: torch.Generator | None = None, jitter: bool = True) -> Scenes:
    """Draws n scenes uniformly over the world (object colour != background colour)."""
    g = generator

    def ri(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=g)

    def ru(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g) if jitter else torch.full((n,), (lo + hi) / 2)

    color = ri(8)
    background = (color + 1 + ri(7)) % 8  # uniform over the other seven colours
    size = ri(2)
    position = torch.where(size == 1, torch.zeros_like(size), ri(5))
    return Scenes(
        shape=ri(4),
        color=color,
        background=background,
        size=size,
        position=position,
        dx=ru(-0.06, 0.06),
        dy=ru(-0.06, 0.06),
        scale=ru(0.92, 1.08),
        angle=ru(-math.radians(10), math.radians(10)),
    )


def scenes_from_attributes(attrs: list[dict[str, int]], generator: torch.Generator | None = None) -> Scenes:
    """Scenes with the given attributes (keys as Scenes' fields) and random jitter."""
    s = sample_scenes(len(attrs), generator)
    for key in ("shape", "color", "background", "size", "position"):
        getattr(s, key)[:] = torch.tensor([a[key] for a in attrs])
    return s


# ---------------------------------------------------------------- signed distances (math coords, y up)
def _sd_circle(px, py, r):
    return torch.sqrt(px * px + py * py) - r


def _sd_box(px, py, b):
    dx, dy = px.abs() - b, py.abs() - b
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _sd_triangle(px, py, r):
    # Equilateral triangle, point up, centred on its centroid; r is half the side (Inigo Quilez's sdf).
    k = math.sqrt(3.0)
    px = px.abs() - r
    py = py + r / k
    fold = (px + k * py) > 0
    qx = torch.where(fold, (px - k * py) / 2, px)
    qy = torch.where(fold, (-k * px - py) / 2, py)
    qx = qx - torch.clamp(qx, min=-2 * r, max=torch.zeros_like(qx))
    return -torch.sqrt(qx * qx + qy * qy) * torch.sign(qy)


def _sd_star5(px, py, r, rf=STAR_INNER):
    # Five-pointed star, one point up, outer radius r (Inigo Quilez's sdStar5).
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px = px.abs()
    d = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = (k2x * px + k2y * py).clamp(min=0)
    px, py = px - 2 * d * k2x, py - 2 * d * k2y
    px = px.abs()
    py = py - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(min=0)
    h = torch.minimum(h, r)
    ex, ey = px - bax * h, py - bay * h
    return torch.sqrt(ex * ex + ey * ey) * torch.sign(py * bax - px * bay)


def coverage(shape, cx, cy, radius, angle, resolution: int, window=None) -> torch.Tensor:
    """Antialiased object coverage in [0, 1], [B, H, W]; all arguments are [B] tensors on one device.
    window: (top, bottom, left, right) pixel bounds to evaluate only that part of the canvas."""
    sd = signed_distance(shape, cx, cy, radius, angle, resolution, window)
    pixel = 2.0 / resolution
    return (0.5 - sd / pixel).clamp(0.0, 1.0)


def signed_distance(shape, cx, cy, radius, angle, resolution: int, window=None) -> torch.Tensor:
    """Signed distance (canvas units, negative inside) of every pixel centre to the object's outline,
    [B, H, W]; the arguments as for `coverage`."""
    device = cx.device
    coords = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) * (2.0 / resolution) - 1.0
    top, bottom, left, right = window or (0, resolution, 0, resolution)
    yy, xx = torch.meshgrid(coords[top:bottom], coords[left:right], indexing="ij")  # image coords (y down)
    x = xx[None] - cx[:, None, None]
    y = -(yy[None] - cy[:, None, None])  # math coords: y up, so "point up" means towards row 0
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    px, py = c * x + s * y, -s * x + c * y  # rotate the point by -angle == the shape by +angle
    r = radius[:, None, None].expand_as(px)
    sd = torch.empty_like(px)
    for kind, sdf in enumerate((_sd_circle, _sd_box, _sd_triangle, _sd_star5)):  # each row its own kind only
        rows = shape == kind
        if bool(rows.any()):
            sd[rows] = sdf(px[rows], py[rows], r[rows])
    return sd


def render(scenes: Scenes, resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Renders scenes to images [B, 3, H, W] in [-1, 1] (the diffusers convention)."""
    s = scenes.to(device) if device is not None else scenes
    dev = s.shape.device
    pos = torch.tensor(POSITION_XY, device=dev)[s.position]  # [B, 2]
    half = torch.tensor(HALF_EXTENT, device=dev)[s.size] * s.scale
    radius = half * torch.tensor(SHAPE_SCALE, device=dev)[s.shape]
    cov = coverage(s.shape, pos[:, 0] + s.dx, pos[:, 1] + s.dy, radius, s.angle, resolution)[:, None]
    palette = PALETTE.to(dev)
    obj = palette[s.color][:, :, None, None]
    bg = palette[s.background][:, :, None, None]
    return (bg * (1 - cov) + obj * cov) * 2.0 - 1.0


# ---------------------------------------------------------------- captions
POSITION_IN = {
    "center": ["in the center", "in the middle"],
    "top left": ["in the top left", "in the top left corner"],
    "top right": ["in the top right", "in the top right corner"],
    "bottom left": ["in the bottom left", "in the bottom left corner"],
    "bottom right": ["in the bottom right", "in the bottom right corner"],
}
NUM_PHRASINGS = 4
EXTRA_WORDS = ["a", "an", "on", "with", "in", "the", "corner", "background", "picture", "of", ","]


@dataclass
class Mention:
    """Which attributes a caption states (shape is always stated)."""

    color: bool = True
    background: bool = True
    size: bool = True
    position: bool = True


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: dict[str, int], mention: Mention, phrasing: int, rng: random.Random) -> str:
    """One caption for a scene's attributes; phrasings 0..NUM_PHRASINGS-1."""
    shape, color = SHAPES[attrs["shape"]], COLOR_NAMES[attrs["color"]]
    bg, size, pos = COLOR_NAMES[attrs["background"]], SIZES[attrs["size"]], POSITIONS[attrs["position"]]
    noun = " ".join(w for w in (size if mention.size else "", color if mention.color else "", shape) if w)
    where = rng.choice(POSITION_IN[pos]) if mention.position else ""
    if phrasing == 0:  # "a small red circle in the top left on a blue background"
        parts = [_a(noun), noun, where, f"on {_a(bg)} {bg} background" if mention.background else ""]
    elif phrasing == 1:  # "a blue background with a large yellow star in the middle"
        if mention.background:
            parts = [f"{_a(bg)} {bg} background with {_a(noun)}", noun, where]
        else:
            parts = [f"a picture of {_a(noun)}", noun, where]
    elif phrasing == 2:  # "purple square, top right, white background"
        bits = (
            [noun]
            + ([pos] if mention.position else [])
            + ([f"{bg} background"] if mention.background else [])
        )
        return ", ".join(bits)
    else:  # "a small red circle, top left, blue background" / "small red circle on blue"
        parts = [noun, where, f"on {bg}" if mention.background else ""]
    return " ".join(p for p in parts if p)


def random_mention(rng: random.Random) -> Mention:
    """Training-time omissions: each attribute is sometimes left out, so the prior learns to vary it."""
    return Mention(
        color=rng.random() < 0.9,
        background=rng.random() < 0.85,
        size=rng.random() < 0.7,
        position=rng.random() < 0.7,
    )


def random_captions(scenes: Scenes, rng: random.Random) -> tuple[list[str], list[Mention]]:
    texts, mentions = [], []
    for i in range(len(scenes)):
        m = random_mention(rng)
        texts.append(caption(scenes.index(i), m, rng.randrange(NUM_PHRASINGS), rng))
        mentions.append(m)
    return texts, mentions


def vocabulary() -> list[str]:
    words = set(EXTRA_WORDS) | set(SHAPES) | set(COLOR_NAMES) | set(SIZES)
    for p in POSITIONS:
        words |= set(p.split())
    words |= {"middle"}
    return sorted(words)


def parse_caption(text: str) -> dict[str, int | None]:
    """The attributes a caption states (None where it leaves one out)."""
    words = text.lower().replace(",", " , ").split()
    out: dict[str, int | None] = dict(shape=None, color=None, background=None, size=None, position=None)
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in SHAPES:
            out["shape"] = SHAPES.index(w)
        elif w in SIZES:
            out["size"] = SIZES.index(w)
        elif w in COLOR_NAMES:
            is_bg = nxt == "background" or (i > 0 and words[i - 1] == "on")
            out["background" if is_bg else "color"] = COLOR_NAMES.index(w)
        elif w in ("center", "middle"):
            out["position"] = 0
        elif w in ("top", "bottom") and nxt in ("left", "right"):
            out["position"] = POSITIONS.index(f"{w} {nxt}")
    return out


# ---------------------------------------------------------------- reading attributes back from pixels
_TEMPLATE_ANGLES = [math.radians(a) for a in (-10, -5, 0, 5, 10)]


def _unit_areas(resolution: int = 256) -> torch.Tensor:
    """Area (canvas units²) of each shape at half-extent 1 / 2, so size can be read from an area."""
    n = len(SHAPES)
    cov = coverage(
        torch.arange(n),
        torch.zeros(n),
        torch.zeros(n),
        torch.tensor(SHAPE_SCALE) * 0.5,
        torch.zeros(n),
        resolution,
    )
    return cov.sum(dim=(1, 2)) * (2.0 / resolution) ** 2 * 4.0  # area at half-extent 1


UNIT_AREAS = _unit_areas()


def read_attributes(images: torch.Tensor, resolution: int = 64) -> list[dict[str, int]]:
    """Reads shape, colours, size and position from images [B, 3, H, W] in [-1, 1] (no CLIP).

    Background: the palette colour nearest the median border pixel. Object: pixels far from the background
    colour; its colour is the palette colour nearest their median; its shape the best-overlapping rendered
    template (4 shapes × 5 rotations, scaled to the object's area, at its centroid); size from its area;
    position from its centroid.
    """
    img = torch.nn.functional.interpolate(images.float().cpu(), size=(resolution, resolution), mode="area")
    rgb = (img.clamp(-1, 1) + 1) / 2  # [B, 3, R, R]
    b = rgb.shape[0]
    border = torch.cat([rgb[:, :, 0], rgb[:, :, -1], rgb[:, :, :, 0], rgb[:, :, :, -1]], dim=2)  # [B, 3, 4R]
    bg_rgb = border.median(dim=2).values  # [B, 3]
    bg = torch.cdist(bg_rgb, PALETTE).argmin(dim=1)
    dist = (rgb - PALETTE[bg][:, :, None, None]).norm(dim=1)  # [B, R, R]
    mask = (dist > 0.25).float()
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) * (2.0 / resolution) - 1.0
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    results = []
    for i in range(b):
        m = mask[i]
        area_px = float(m.sum())
        if area_px < 3:
            results.append(dict(shape=-1, color=-1, background=int(bg[i]), size=-1, position=-1))
            continue
        strong = dist[i] > 0.5 * dist[i].max()
        obj_rgb = rgb[i][:, strong].median(dim=1).values
        color = int(torch.cdist(obj_rgb[None], PALETTE).argmin())
        cx, cy = float((xx * m).sum() / area_px), float((yy * m).sum() / area_px)
        area = area_px * (2.0 / resolution) ** 2
        n = len(SHAPES) * len(_TEMPLATE_ANGLES)
        shapes = torch.arange(len(SHAPES)).repeat_interleave(len(_TEMPLATE_ANGLES))
        half = torch.sqrt(area / UNIT_AREAS[shapes])
        tmpl = coverage(
            shapes,
            torch.full((n,), cx),
            torch.full((n,), cy),
            half * torch.tensor(SHAPE_SCALE)[shapes],
            torch.tensor(_TEMPLATE_ANGLES).repeat(len(SHAPES)),
            resolution,
        )
        inter = torch.minimum(tmpl, m[None]).sum(dim=(1, 2))
        union = torch.maximum(tmpl, m[None]).sum(dim=(1, 2))
        shape = int(shapes[(inter / union).argmax()])
        half_extent = float(math.sqrt(area / float(UNIT_AREAS[shape])))
        size = int(half_extent > 0.5)
        if abs(cx) < 0.25 and abs(cy) < 0.25:
            position = 0
        else:
            position = 1 + (cx > 0) + 2 * (cy > 0)
        results.append(dict(shape=shape, color=color, background=int(bg[i]), size=size, position=position))
    return results
