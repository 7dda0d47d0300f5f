"""`unclip generate --sampler` through the shared stack: the flag reaches every stage, a stage's own flag
wins, and a sampler edits cannot run is refused with exit 2 naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

UNCLIP = [sys.executable, "-m", "unclip"]
STEPS = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "3", "--size", "32"]


def generate(stack, out: Path, *flags: str) -> np.ndarray:
    done = subprocess.run(
        [
            *UNCLIP,
            "generate",
            "a red circle",
            "--seed",
            "5",
            "--out",
            str(out),
            "--no-progress",
            *STEPS,
            *flags,
        ],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return np.asarray(Image.open(next(out.glob("*.png"))), dtype=np.float32)


def test_sampler_flags_choose_the_stages_samplers(stack, tmp_path):
    dpm = generate(stack, tmp_path / "dpm", "--sampler", "dpmsolver++")
    again = generate(
        stack, tmp_path / "again", "--decoder-sampler", "dpmsolver++", "--prior-sampler", "dpmsolver++"
    )
    default = generate(stack, tmp_path / "default")
    assert np.array_equal(dpm, again)  # 32 px: the decoder's output, the prior and decoder samplers decide it
    assert np.abs(dpm - default).max() > 10  # not the default sampler's picture


def test_edit_with_another_image_sampler_exits_2_naming_the_field(stack, tmp_path):
    image = tmp_path / "in.png"
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[8:16, 8:16, 3] = 0
    Image.fromarray(rgba, "RGBA").save(image)
    done = subprocess.run(
        [*UNCLIP, "edit", str(image), "a red circle", "--sampler", "ddim", "--out", str(tmp_path), *STEPS],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "params.decoder_sampler" in done.stderr
