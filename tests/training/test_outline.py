"""The strict reader (training/outline.py) on renders of the world, and on renders with the defects of the
bundled model injected: a speck, a lighter L-shaped patch, a spiky triangle, a lumpy circle."""

import math

import numpy as np
import pytest
import torch

from training.evaluate import to_pil, to_tensor
from training.outline import StrictConfig, boundary_band, largest_blob, read_strict
from training.world import PALETTE, POSITION_XY, render, scenes_from_attributes


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the fits are many small operations, which more threads only slow down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def as_png(images: torch.Tensor) -> torch.Tensor:
    """Through 8-bit PNG pixels and back, as every picture the product makes."""
    return to_tensor(to_pil(images))


def paint(inside, attrs: dict, res: int = 128, ss: int = 4) -> torch.Tensor:
    """A picture [3, res, res] in [-1, 1]: inside(x, y) -> bool over canvas coordinates (x right, y down,
    [-1, 1]) is the object, antialiased by supersampling ss × ss."""
    c = (np.arange(res * ss) + 0.5) * (2.0 / (res * ss)) - 1.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    cov = inside(xx, yy).astype(np.float32).reshape(res, ss, res, ss).mean((1, 3))
    cov = torch.from_numpy(cov)[None]
    obj, bg = PALETTE[attrs["color"]][:, None, None], PALETTE[attrs["background"]][:, None, None]
    return as_png(((bg * (1 - cov) + obj * cov) * 2 - 1)[None])[0]


SMALL = dict(color=3, background=2, size=0, position=0)  # yellow on blue, centred, small


def test_world_renders_read_right_and_clean():
    rng = np.random.default_rng(0)
    attrs = []
    for k in range(12):  # every kind three times, both sizes, every position, random colours and jitter
        color = int(rng.integers(8))
        size = k % 2
        attrs.append(
            dict(
                shape=k % 4,
                color=color,
                background=(color + 1 + int(rng.integers(7))) % 8,
                size=size,
                position=0 if size else k % 5,
            )
        )
    images = as_png(render(scenes_from_attributes(attrs, torch.Generator().manual_seed(3)), 128))
    for a, im in zip(attrs, images, strict=True):
        r = read_strict(im, a["shape"])
        assert r["shape_right"] and r["iou"] >= 0.95, (a, r)
        assert r["shape"] == a["shape"] and r["outline_ok"], (a, r)
        assert (r["color"], r["background"], r["size"], r["position"]) == (
            a["color"],
            a["background"],
            a["size"],
            a["position"],
        ), (a, r)
        assert r["clean"] and r["largest_blob_px"] <= 2 and r["off_palette_share"] < 0.002, (a, r)
        assert r["background_deviation_mean"] < 0.005


def test_a_speck_on_the_object_is_seen():
    attrs = dict(SMALL, shape=1)
    image = as_png(render(scenes_from_attributes([attrs], torch.Generator().manual_seed(1)), 128))[0]
    assert read_strict(image, 1)["clean"]
    image[:, 60:64, 62:66] = torch.tensor([0.55, 0.25, 0.2])[:, None, None] * 2 - 1  # red-brown, 4 × 4
    r = read_strict(image, 1)
    assert r["shape_right"]  # the outline is intact ...
    assert (
        not r["clean"] and r["largest_blob_px"] == 16 and r["object_blob_px"] == 16
    )  # ... the speck is seen


def test_a_lighter_l_shaped_patch_in_the_background_is_seen():
    attrs = dict(SMALL, shape=0, position=4)
    image = as_png(render(scenes_from_attributes([attrs], torch.Generator().manual_seed(2)), 128))[0]
    faint = 0.04 * 2  # +0.04 per channel (channels in [0, 1]): RGB distance 0.069
    image[:, 10:64, 10:18] += faint  # the upsampler's tile edge: an L along two sides of a 64 px crop
    image[:, 10:18, 18:64] += faint
    r = read_strict(image, 0)
    assert r["shape_right"]
    assert not r["clean"] and r["largest_blob_px"] == 54 * 8 + 8 * 46 and r["object_blob_px"] == 0
    assert r["background_deviation_p99"] > 0.06


def test_a_spiky_triangle_is_not_a_crisp_triangle():
    """Small triangles come out with thin spikes at bent corners: the IoU hardly moves, the outline does."""
    cx, cy, r = POSITION_XY[0][0], POSITION_XY[0][1], 1 / 3 * 1.1  # half side of a small triangle

    def inside(x, y):
        # the world's equilateral triangle, point up, centred on its centroid
        k = math.sqrt(3)
        px, py = x - cx, -(y - cy)
        tri = (py >= -r / k) & (k * px + py <= 2 * r / k) & (-k * px + py <= 2 * r / k)
        spikes = np.zeros_like(tri)
        for corner in range(3):  # a needle from each corner, bent 25° off the radial direction
            a = math.pi / 2 + corner * 2 * math.pi / 3
            vx, vy = 2 * r / k * math.cos(a), 2 * r / k * math.sin(a)
            d = a + math.radians(25)
            ux, uy = math.cos(d), math.sin(d)
            along = (px - vx) * ux + (py - vy) * uy
            across = np.abs(-(px - vx) * uy + (py - vy) * ux)
            spikes |= (along > -0.02) & (along < 0.16) & (across < 0.02 * (1 - along / 0.16))
        return tri | spikes

    reading = read_strict(paint(inside, dict(SMALL, shape=2)), 2)
    assert reading["outline_px"] > StrictConfig().outline_px
    assert not reading["outline_ok"]


def test_a_lumpy_circle_is_not_a_circle():
    cx, cy, r = 0.0, 0.0, 1 / 3

    def inside(x, y):
        theta = np.arctan2(y - cy, x - cx)
        return np.hypot(x - cx, y - cy) <= r * (1 + 0.15 * np.sin(5 * theta + 0.3))

    reading = read_strict(paint(inside, dict(SMALL, shape=0)), 0)
    assert reading["iou"] < 0.9 and not reading["shape_right"]
    # the same circle without lumps is right (the supersampled painter agrees with the world's renderer)
    plain = read_strict(paint(lambda x, y: np.hypot(x - cx, y - cy) <= r, dict(SMALL, shape=0)), 0)
    assert plain["shape_right"] and plain["iou"] >= 0.95 and plain["clean"]


def test_blobs_are_8_connected_and_the_band_is_one_pixel_wide():
    mask = np.zeros((12, 12), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal: one blob of 3
    mask[8:10, 8:12] = True  # 8
    assert largest_blob(mask) == 8 and largest_blob(mask[:5, :5]) == 3 and largest_blob(mask & False) == 0
    obj = np.zeros((8, 8), bool)
    obj[:, 4:] = True
    band = boundary_band(obj)
    assert band[:, 3:5].all() and band.sum() == 16


@pytest.mark.parametrize("shape", [0, 1, 2, 3])
def test_another_kind_is_not_read_as_the_prompted_one(shape):
    attrs = dict(SMALL, shape=shape)
    image = as_png(render(scenes_from_attributes([attrs], torch.Generator().manual_seed(5)), 128))[0]
    for other in {0, 1, 2, 3} - {shape}:
        assert not read_strict(image, other)["shape_right"]


def test_a_picture_without_an_object_shows_no_shape():
    blank = as_png((PALETTE[2] * 2 - 1)[None, :, None, None].expand(1, 3, 128, 128).contiguous())[0]
    r = read_strict(blank, 0)
    assert r["color"] == -1 and not r["shape_right"] and r["clean"]
