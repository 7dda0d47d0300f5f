"""A strict reader of "shapes" pictures: the shape by its outline's geometry at full resolution, and how clean
the picture is.

`read_attributes` (training/world.py) reads a 64 px view and picks the best-overlapping of 20 templates, which
forgives ragged outlines, specks and patches. This reader judges the picture at its own resolution:

- **Shape by geometry.** The object's coverage (each pixel's position between the background's and the
  object's palette colours) is fitted, for each of the four kinds, with the world's own renderer
  (`world.coverage`: position, size and rotation free, gradient ascent on the soft IoU, coarse to fine).
  The IoU reported is the fitted shape's against the pixels nearer the object's colour than the
  background's. A shape is right when the prompted kind fits with IoU ≥ 0.9 and better than the other
  three. The largest distance of an object-coloured pixel outside the fit (or a background-coloured one
  inside it) from the fitted outline is reported too (`outline_px`): thin spikes hardly move an IoU.
- **Cleanliness.** Pixels farther than `off_palette_tol` from both palette colours, away from the one-pixel
  band along the colour boundary (the renderer's antialiasing lives there), are off-palette: their share, the
  largest 8-connected blob of them, and the background's deviation from its palette colour. A picture is
  clean with ≤ 2 % off-palette pixels and no blob > 8 px (at 128 px).

Renders of the world read as right and clean (tests/training/test_outline.py), whatever their jitter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.world import PALETTE, SHAPE_SCALE, SHAPES, UNIT_AREAS, coverage, signed_distance


@dataclass
class StrictConfig:
    """The thresholds of the strict reader (pixel counts are at the picture's own resolution)."""

    iou_right: float = 0.9  # the prompted kind must fit at least this well (soft IoU with the world's render)
    off_palette_tol: float = 0.06  # RGB distance (channels in [0, 1]) beyond which a pixel is neither colour
    max_off_share: float = 0.02  # clean: at most this share of off-palette pixels away from the boundary ...
    max_blob_px: int = 8  # ... and no 8-connected off-palette blob larger than this
    outline_px: float = 2.0  # outline crisp: no misplaced object/background pixel farther from the fit
    fit_steps: tuple[int, ...] = (40, 20, 20)  # gradient steps at 32 px, 64 px, full resolution


# Rotational symmetry of each kind (radians): fits start from angles spread over one period.
_PERIOD = [2 * math.pi, math.pi / 2, 2 * math.pi / 3, 2 * math.pi / 5]
_START_ANGLES = 8


# ---------------------------------------------------------------- colours and coverage
def to_rgb01(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [-1, 1] (the diffusers convention) -> [3, H, W] in [0, 1], float32."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).contiguous()


def read_colours(rgb: torch.Tensor) -> tuple[int, int]:
    """(background, object) palette indices, read as `read_attributes` does, at full resolution."""
    border = torch.cat([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], dim=1)  # [3, 4R]
    bg = int(torch.cdist(border.median(dim=1).values[None], PALETTE).argmin())
    dist = (rgb - PALETTE[bg][:, None, None]).norm(dim=0)
    strong = dist > 0.5 * dist.max()
    if dist.max() < 0.1:  # a flat picture: no object
        return bg, -1
    obj = int(torch.cdist(rgb[:, strong].median(dim=1).values[None], PALETTE).argmin())
    return bg, (obj if obj != bg else -1)  # an object of the background's own colour is none


def object_alpha(rgb: torch.Tensor, bg: int, obj: int) -> torch.Tensor:
    """Each pixel's position on the segment from the background's to the object's palette colour, [H, W] in
    [0, 1]: the renderer's coverage, on a render of the world."""
    b, o = PALETTE[bg][:, None, None], PALETTE[obj][:, None, None]
    d = o - b
    return (((rgb - b) * d).sum(0) / (d * d).sum()).clamp(0, 1)


# ---------------------------------------------------------------- fitting the world's shapes
@dataclass
class Fit:
    """The best pose of one kind: centre (canvas units, y down), SDF radius, rotation (radians), soft IoU."""

    kind: int
    cx: float
    cy: float
    radius: float
    angle: float
    iou: float


def soft_iou(cov: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """[N, H, W] against [H, W] -> [N]: sum(min) / sum(max), as read_attributes' template match."""
    return torch.minimum(cov, alpha).sum((1, 2)) / torch.maximum(cov, alpha).sum((1, 2)).clamp(min=1e-6)


def _window(alpha: torch.Tensor, margin: float = 0.2) -> tuple[int, int, int, int]:
    """Pixel bounds of the object's pixels, widened by `margin` canvas units (the fit moves inside them)."""
    res = alpha.shape[-1]
    rows, cols = (alpha > 0.1).any(1).nonzero(), (alpha > 0.1).any(0).nonzero()
    if not len(rows):
        return 0, res, 0, res
    pad = math.ceil(margin * res / 2)
    return (
        max(int(rows[0]) - pad, 0),
        min(int(rows[-1]) + 1 + pad, res),
        max(int(cols[0]) - pad, 0),
        min(int(cols[-1]) + 1 + pad, res),
    )


def _refine(alpha: torch.Tensor, kinds: torch.Tensor, pose: torch.Tensor, steps: int) -> torch.Tensor:
    """Gradient ascent of the soft IoU over pose [N, 4] = (cx, cy, log radius, angle) at alpha's size
    (evaluated in a window around the object: the IoU is the same, the work far less)."""
    res = alpha.shape[-1]
    win = _window(alpha)
    target = alpha[win[0] : win[1], win[2] : win[3]]
    pose = pose.clone().requires_grad_(True)
    # a step of about a pixel at this resolution; the angle about a pixel at the outline
    opt = torch.optim.Adam([pose], lr=2.0 / res)
    for _ in range(steps):
        cov = coverage(kinds, pose[:, 0], pose[:, 1], pose[:, 2].exp(), pose[:, 3], res, win)
        loss = -soft_iou(cov, target).sum()
        opt.zero_grad()
        loss.backward()
        pose.grad.nan_to_num_(0.0)  # the SDFs' square roots have no gradient at 0
        opt.step()
    return pose.detach()


def fit_kinds(alpha: torch.Tensor, cfg: StrictConfig | None = None) -> list[Fit]:
    """The best fit of each of the four kinds to an object's coverage alpha [R, R] (square)."""
    cfg = cfg or StrictConfig()
    res = alpha.shape[-1]
    solid = alpha > 0.5  # what the reported IoU compares: robust to a faint tint of the background
    alpha = ((alpha - 0.25) / 0.5).clamp(0, 1)  # the fit's target: the same, with the antialiasing ramp
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) * (2.0 / res) - 1.0
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    mass = float(alpha.sum())
    if mass < 4:  # no object: nothing fits
        return [Fit(k, 0.0, 0.0, 0.0, 0.0, 0.0) for k in range(len(SHAPES))]
    cx, cy = float((xx * alpha).sum()) / mass, float((yy * alpha).sum()) / mass
    area = mass * (2.0 / res) ** 2
    kinds, poses = [], []
    for k in range(len(SHAPES)):
        radius = math.sqrt(area / float(UNIT_AREAS[k])) * SHAPE_SCALE[k]
        starts = 1 if k == 0 else _START_ANGLES
        for a in range(starts):
            kinds.append(k)
            poses.append([cx, cy, math.log(radius), _PERIOD[k] * (a / starts - 0.5)])
    kinds_t, pose = torch.tensor(kinds), torch.tensor(poses)
    with torch.enable_grad():
        for level, steps in zip((32, 64, res), cfg.fit_steps, strict=True):
            if level > res or steps == 0:
                continue
            view = F.interpolate(alpha[None, None], size=(level, level), mode="area")[0, 0]
            pose = _refine(view, kinds_t, pose, steps)
            if level == 32:  # keep the best start of each kind for the finer levels
                cov = coverage(kinds_t, pose[:, 0], pose[:, 1], pose[:, 2].exp(), pose[:, 3], level)
                iou = soft_iou(cov, view)
                best = [
                    max((i for i in range(len(kinds)) if kinds[i] == k), key=lambda i: iou[i])
                    for k in range(4)
                ]
                kinds_t, pose = kinds_t[best], pose[best]
                kinds = [kinds[i] for i in best]
    inside = signed_distance(kinds_t, pose[:, 0], pose[:, 1], pose[:, 2].exp(), pose[:, 3], res) < 0
    iou = (inside & solid).sum((1, 2)) / (inside | solid).sum((1, 2)).clamp(min=1)
    return [
        Fit(k, float(p[0]), float(p[1]), float(p[2].exp()), float(p[3]), float(i))
        for k, p, i in zip(kinds, pose, iou, strict=True)
    ]


def fit_inside(fit: Fit, res: int) -> torch.Tensor:
    """The fitted shape's pixels, [R, R] bool."""
    t = [torch.tensor([v]) for v in (fit.kind, fit.cx, fit.cy, fit.radius, fit.angle)]
    return signed_distance(*t, res)[0] < 0


def outline_deviation(
    rgb: torch.Tensor, alpha: torch.Tensor, fit: Fit, bg: int, obj: int, tol: float
) -> float:
    """Largest distance (px) from the fitted outline of a pixel of the object's colour outside the fit, or of
    the background's inside it (off-palette pixels are left to the cleanliness measure)."""
    res = alpha.shape[-1]
    one = lambda v: torch.tensor([v])  # noqa: E731
    sd = signed_distance(one(fit.kind), one(fit.cx), one(fit.cy), one(fit.radius), one(fit.angle), res)[0]
    sd_px = sd / (2.0 / res)
    near_obj = (rgb - PALETTE[obj][:, None, None]).norm(dim=0) <= tol
    near_bg = (rgb - PALETTE[bg][:, None, None]).norm(dim=0) <= tol
    out = torch.cat([sd_px[near_obj & (sd_px > 0)], -sd_px[near_bg & (sd_px < 0)]])
    return round(float(out.max()), 2) if out.numel() else 0.0


# ---------------------------------------------------------------- cleanliness
def largest_blob(mask: np.ndarray) -> int:
    """Size (px) of the largest 8-connected component of a boolean mask (numpy label propagation)."""
    if not mask.any():
        return 0
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.max([p[i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    return int(np.bincount(labels[mask]).max())


def boundary_band(is_object: np.ndarray) -> np.ndarray:
    """Pixels within one pixel (3 × 3) of the boundary between object- and background-labelled pixels."""
    h, w = is_object.shape
    p = np.pad(is_object, 1, mode="edge")
    views = [p[i : i + h, j : j + w] for i in range(3) for j in range(3)]
    return np.any(views, axis=0) & ~np.all(views, axis=0)


def cleanliness(
    rgb: torch.Tensor, bg: int, obj: int, cfg: StrictConfig | None = None, inside: np.ndarray | None = None
) -> dict:
    """Off-palette share and largest blob away from the colour boundary, the background's deviation.
    inside: the fitted object's pixels, if known: the largest off-palette blob among them is reported apart
    (a speck on the object, as against a patch in the background)."""
    cfg = cfg or StrictConfig()
    d_bg = (rgb - PALETTE[bg][:, None, None]).norm(dim=0).numpy()
    d_obj = (rgb - PALETTE[obj][:, None, None]).norm(dim=0).numpy() if obj >= 0 else np.full_like(d_bg, 9.0)
    band = boundary_band(d_obj < d_bg)
    judged = ~band
    off = (np.minimum(d_bg, d_obj) > cfg.off_palette_tol) & judged
    background = (d_bg <= d_obj) & judged
    share = float(off.sum() / max(judged.sum(), 1))
    blob = largest_blob(off)
    bg_dev = d_bg[background] if background.any() else np.zeros(1)
    return dict(
        off_palette_share=round(share, 5),
        largest_blob_px=blob,
        background_deviation_mean=round(float(bg_dev.mean()), 4),
        background_deviation_p99=round(float(np.quantile(bg_dev, 0.99)), 4),
        object_blob_px=None if inside is None else largest_blob(off & inside),
        clean=share <= cfg.max_off_share and blob <= cfg.max_blob_px,
    )


# ---------------------------------------------------------------- one picture
def _position(cx: float, cy: float) -> int:
    """The world's position index of a centre, as read_attributes decides it."""
    if abs(cx) < 0.25 and abs(cy) < 0.25:
        return 0
    return 1 + (cx > 0) + 2 * (cy > 0)


def read_strict(image: torch.Tensor, shape: int | None = None, cfg: StrictConfig | None = None) -> dict:
    """Reads one picture [3, H, W] in [-1, 1] (square). shape: the kind it should show (None: judge the kind
    that fits best). Returns colours, the fits' IoUs, shape_right, outline, size, position, cleanliness."""
    cfg = cfg or StrictConfig()
    rgb = to_rgb01(image)
    bg, obj = read_colours(rgb)
    out: dict = dict(background=bg, color=obj)
    if obj < 0:
        return dict(
            out,
            shape=-1,
            iou=0.0,
            shape_right=False,
            outline_px=None,
            size=-1,
            position=-1,
            **cleanliness(rgb, bg, obj, cfg),
        )
    alpha = object_alpha(rgb, bg, obj)
    fits = fit_kinds(alpha, cfg)
    best = max(fits, key=lambda f: f.iou)
    want = best if shape is None else fits[shape]
    right = want.iou >= cfg.iou_right and want.iou >= max(f.iou for f in fits)
    half_extent = want.radius / SHAPE_SCALE[want.kind]
    out.update(
        shape=best.kind,
        iou=round(want.iou, 4),
        ious=[round(f.iou, 4) for f in fits],
        shape_right=bool(right),
        outline_px=outline_deviation(rgb, alpha, want, bg, obj, cfg.off_palette_tol),
        size=int(half_extent > 0.5),
        position=_position(want.cx, want.cy),
        fit=asdict(want),
    )
    out["outline_ok"] = out["outline_px"] <= cfg.outline_px
    out.update(cleanliness(rgb, bg, obj, cfg, inside=fit_inside(want, rgb.shape[-1]).numpy()))
    return out
