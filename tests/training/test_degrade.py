"""The upsampler's training input: the decoder-like colour errors it learns to undo."""

import pytest
import torch

from training import train
from training.train import (
    PRESETS,
    add_noise,
    colour_errors,
    degrade,
    edge_weights,
    noise_schedule,
    round_shapes,
    shape_errors,
)
from training.world import PALETTE, render, sample_scenes, scenes_from_attributes


def _flat_canvases(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 32 px canvases of one palette colour each, [-1, 1], and their colour indices."""
    idx = torch.arange(n) % len(PALETTE)
    return (PALETTE[idx] * 2 - 1)[:, :, None, None].expand(n, 3, 32, 32).clone(), idx


def test_colour_errors_are_of_the_asked_size_and_keep_the_colour_unambiguous():
    torch.manual_seed(0)
    flat, idx = _flat_canvases(512)
    noisy = colour_errors(flat, 0.04)
    err = (noisy - flat) / 2  # [0, 1] units
    assert 0.02 < err.std().item() < 0.06  # E[U(0, 2)²] = 4/3: the per-channel std is about 0.046
    per_image = err.flatten(1).std(1)
    assert per_image.min() < 0.01 and per_image.max() > 0.06  # some inputs nearly exact, some well off
    rgb = ((noisy + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(rgb, PALETTE).argmin(1).reshape(512, -1)
    assert (nearest == idx[:, None]).float().mean() > 0.995  # still read as the colour it was
    assert torch.equal(colour_errors(flat, 0.0), flat)


def test_degrade_blurs_without_colour_errors_and_adds_them_when_asked():
    torch.manual_seed(1)
    low = render(sample_scenes(64), 32, "cpu")
    border = torch.cat([low[..., 0, :], low[..., -1, :]], -1)  # flat background rows, [B, 3, 64]
    plain = degrade(low)
    shifted = degrade(low, 0.04)
    rows = [torch.cat([x[..., 0, :], x[..., -1, :]], -1) for x in (plain, shifted)]
    off = [(r - border).abs().mean().item() for r in rows]
    assert off[0] < 0.02 < off[1]  # blur and the slight noise keep a flat border; colour errors move it
    assert PRESETS["cpu"].super_res_colour_error == 0.0  # the shipped recipe is unchanged
    for name in ("finetune", "gpu-canvas"):  # the upsampler's fine-tuning recipe
        assert PRESETS[name].super_res_colour_error > 0 and PRESETS[name].super_res_loss == "l1"


def test_shape_errors_move_outlines_by_about_the_asked_size_and_keep_flat_colours():
    torch.manual_seed(2)
    n, h = 256, 32
    ramp = ((torch.arange(h) + 0.5) / h * 2 - 1).expand(n, 3, h, h).clone()  # x, in [-1, 1] units
    moved = shape_errors(ramp, 0.3)
    shift_px = ((moved - ramp) / 2 * h)[..., 4:-4, 4:-4]  # away from the clamped border
    assert 0.1 < shift_px.std().item() < 0.6  # about 0.3 px; the per-image scale makes some much larger
    assert shift_px.abs().max().item() < 4  # bent, not scrambled
    flat, _ = _flat_canvases(8)
    assert torch.allclose(shape_errors(flat, 0.3), flat, atol=1e-5)


def _rounded(shape: int, size: int, n: int, size_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n copies of one 32 px render (blue object on white) and their rounded versions, as object coverage."""
    attrs = [dict(shape=shape, color=2, background=6, size=size, position=0)] * n
    scenes = scenes_from_attributes(attrs, torch.Generator().manual_seed(0))
    scenes.dx[:], scenes.dy[:], scenes.scale[:], scenes.angle[:] = 0.0, 0.0, 1.0, 0.0
    low = render(scenes, 32)
    bg, obj = PALETTE[scenes.background], PALETTE[scenes.color]
    out = round_shapes(low, bg, obj, size_px)
    span = (obj - bg)[:, :, None, None]

    def alpha(x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2 - bg[:, :, None, None]).mul(span).sum(1) / span.square().sum(1)

    rgb = (out + 1) / 2
    on_line = bg[:, :, None, None] + alpha(out)[:, None] * span
    assert torch.allclose(rgb, on_line, atol=1e-5)  # every pixel stays between the two palette colours
    return alpha(low), alpha(out)


def test_round_shapes_blunts_star_points_and_keeps_edges_one_pixel_wide():
    torch.manual_seed(4)
    before, after = _rounded(shape=3, size=0, n=64, size_px=0.5)  # small stars, σ = U(0, 1) px
    far = torch.ones(32, 32, dtype=torch.bool)
    ys, xs = torch.nonzero(before[0] > 0.01, as_tuple=True)
    far[max(ys.min() - 4, 0) : ys.max() + 5, max(xs.min() - 4, 0) : xs.max() + 5] = False
    assert (after[:, far] - before[:, far]).abs().max() < 1e-5  # the background away from the object is exact
    # the star's points: covered pixels farthest from its centre lose coverage as σ grows
    weights = before[0].clamp(min=0)
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    centre = (grid * weights).flatten(1).sum(1) / weights.sum()
    dist = (grid - centre[:, None, None]).norm(dim=0)
    tips = (before[0] > 0.3) & (dist > dist[before[0] > 0.3].quantile(0.85))
    loss = (before[:, tips] - after[:, tips]).mean(1)  # [n]
    assert loss.max() > 0.2 and loss.min() < 0.02  # some copies blunted hard, some nearly exact
    partial = ((after > 0.05) & (after < 0.95)).flatten(1).sum(1).float()
    partial_before = ((before[0] > 0.05) & (before[0] < 0.95)).sum().float()
    assert partial.max() <= 1.5 * partial_before  # cut again: the edge stays about a pixel wide
    _, circles = _rounded(shape=0, size=1, n=16, size_px=0.5)
    circle, _ = _rounded(shape=0, size=1, n=1, size_px=0.0)
    area = circles.flatten(1).sum(1) / circle.sum()
    assert (area - 1).abs().max() < 0.03  # a large disc keeps its size: rounding changes corners, not areas
    unchanged, same = _rounded(3, 0, 4, 0.0)
    assert torch.allclose(same, unchanged, atol=1e-5)  # size 0: the render as it was


def test_edge_weights_weigh_the_outline_and_leave_flat_canvases_at_one():
    flat, _ = _flat_canvases(8)
    assert torch.equal(edge_weights(flat, 5.0), torch.ones(8, 1, 32, 32))
    attrs = [dict(shape=3, color=2, background=6, size=0, position=0)]
    star = render(scenes_from_attributes(attrs, torch.Generator().manual_seed(0)), 32)
    weights = edge_weights(star, 5.0)[0, 0]
    span = (PALETTE[2] - PALETTE[6])[:, None, None]
    coverage = ((star[0] + 1) / 2 - PALETTE[6][:, None, None]).mul(span).sum(0) / span.square().sum()
    edge = (coverage > 0.05) & (coverage < 0.95)
    assert (weights[edge] == 6.0).all()  # every partly covered pixel is on the outline
    assert (weights == 6.0).sum() < 4 * edge.sum()  # a band along it, not the whole object
    assert (weights[0] == 1.0).all() and (weights[:, 0] == 1.0).all()  # far from the object: 1
    assert torch.equal(edge_weights(star, 0.0), torch.ones(1, 1, 32, 32))


def test_focus_draws_half_of_the_batch_at_the_given_timesteps():
    torch.manual_seed(3)
    acp = noise_schedule("cpu")
    x0 = torch.zeros(1000, 3, 4, 4)
    _, t = add_noise(x0, acp, (995, 495))
    assert set(t[::2].tolist()) == {995, 495}  # alternate rows at the grid, both of its steps
    assert len(set(t[1::2].tolist())) > 300  # the others uniform over the schedule
    _, t = add_noise(x0, acp)
    assert ((t == 995) | (t == 495)).float().mean() < 0.01


@pytest.mark.parametrize(
    "flags",
    [
        ["--super-res-focus", "995,x"],
        ["--super-res-focus", "1000"],
        ["--super-res-colour-error", "-0.1"],
        ["--super-res-shape-error", "-1"],
        ["--super-res-rounding", "-0.5"],
        ["--super-res-small-share", "2"],
        ["--super-res-loss", "huber"],
        ["--lr-scale", "-0.1"],
        ["--decoder-small-share", "1.5"],
        ["--decoder-edge-weight", "-1"],
        ["--decoder-focus", "995,-5"],
    ],
)
def test_bad_training_flags_are_usage_errors(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        paths = ["--out", str(tmp_path / "m"), "--work", str(tmp_path / "w")]
        train.main([*paths, "--components", "super_res", *flags])
    assert stop.value.code == 2 and flags[0] in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # nothing written
