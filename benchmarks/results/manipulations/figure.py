"""Draws models/shapes-toy/manipulations.png through a running `unclip up` (the model's defaults, seed 1):

    unclip up --model models/shapes-toy &
    python benchmarks/results/manipulations/figure.py OUT_DIR models/shapes-toy/manipulations.png

Three rows of six 128 px frames: an interpolation between two prompts (fixed noise), one between two rendered
images of the world with inverted noise (a large red circle -> a large red square), and a text diff of the
rendered circle from red to blue, theta 0 to 0.5. The frames come from the CLI's own commands.
"""

import subprocess
import sys
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from benchmarks.manipulations import render_png

FRAMES = 6
SIDE = 128
GAP = 4
LABEL_H = 18
WHITE = {"background": 6, "size": 1, "position": 0}  # large and centred, on white (world indices)
CIRCLE = dict(WHITE, shape=0, color=0)  # a large red circle
SQUARE = dict(WHITE, shape=1, color=0)  # a large red square


def unclip(*args: str) -> None:
    subprocess.run(["unclip", *args, "--seed", "1", "--frames", str(FRAMES), "--overwrite"], check=True)


def frames(folder: Path, prefix: str) -> list[PIL.Image.Image]:
    paths = sorted(folder.glob(f"{prefix}-1-[0-9][0-9].png"))
    assert len(paths) == FRAMES, (folder, prefix, paths)
    return [PIL.Image.open(p).convert("RGB") for p in paths]


def main(work: Path, target: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "circle.png").write_bytes(render_png(CIRCLE, 0))
    (work / "square.png").write_bytes(render_png(SQUARE, 1))
    red, blue = "a red circle on a white background", "a blue square on a white background"
    unclip("interpolate", "--from", red, "--to", blue, "--out", str(work / "prompts"))
    circle, square = str(work / "circle.png"), str(work / "square.png")
    inverted = ["--noise", "inverted", "--out", str(work / "images")]
    unclip("interpolate", "--from", circle, "--to", square, *inverted)
    was, now = "a large red circle on a white background", "a large blue circle on a white background"
    unclip("diff", circle, "--from-caption", was, "--to-caption", now, "--out", str(work / "diff"))
    rows = [
        ("interpolation, prompt ends, fixed noise", frames(work / "prompts", "interpolate")),
        ("interpolation, image ends, inverted noise", frames(work / "images", "interpolate")),
        ("text diff red -> blue circle, theta 0..0.5", frames(work / "diff", "diff")),
    ]
    width = FRAMES * SIDE + (FRAMES - 1) * GAP
    sheet = PIL.Image.new("RGB", (width, len(rows) * (LABEL_H + SIDE + GAP)), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (LABEL_H + SIDE + GAP)
        draw.text((2, top + 3), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.resize((SIDE, SIDE)), (c * (SIDE + GAP), top + LABEL_H))
    sheet.save(target)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
