"""Draws models/shapes-toy/samples.png and edit-example.png.

    python -m training.evaluate_strict --model models/shapes-toy --addr ADDR --prompts 48 --variations 12 \
        --edits 0 --seed 1234 --save-dir STRICT_DIR                       # beside a running `unclip up`
    python benchmarks/results/decoder-guidance/figures.py STRICT_DIR WORK_DIR models/shapes-toy

samples.png: the first 16 prompts of the strict run, both images of each, 4 x 4 pairs. edit-example.png:
the README's generate and edit commands through the running stack (`unclip generate ... --seed 7`, then the
edit with examples/mask-center.png at --seed 3, with the whole picture described and with "a yellow star").
"""

import subprocess
import sys
from pathlib import Path

import PIL.Image

SIDE = 128
GAP = 8  # white gap between the edit example's three pictures
PROMPT = "a small red circle in the center on a blue background"
EDIT = "a small yellow star in the center on a blue background"


def samples(strict_dir: Path, target: Path) -> None:
    sheet = PIL.Image.new("RGB", (8 * SIDE, 4 * SIDE))
    for i in range(16):
        for j in range(2):
            image = PIL.Image.open(strict_dir / f"t2i-{i:03d}-{j}.png").convert("RGB")
            sheet.paste(image, ((i % 4) * 2 * SIDE + j * SIDE, (i // 4) * SIDE))
    sheet.save(target)


def edit_example(work: Path, target: Path) -> None:
    def unclip(folder: str, *args: str) -> Path:  # one folder per command: the edits share a file name
        out = work / folder
        done = subprocess.run(
            ["unclip", *args, "--out", str(out), "--overwrite"], check=True, capture_output=True, text=True
        )
        return Path([line for line in done.stdout.split() if line.endswith(".png")][-1])

    source = unclip("generate", "generate", PROMPT, "--seed", "7", "-n", "1")
    mask = ["--mask", "examples/mask-center.png", "--seed", "3"]
    edited = unclip("edit", "edit", str(source), *mask, EDIT)
    short = unclip("edit-short", "edit", str(source), *mask, "a yellow star")
    sheet = PIL.Image.new("RGB", (3 * SIDE + 2 * GAP, SIDE), "white")
    for k, path in enumerate([source, edited, short]):
        sheet.paste(PIL.Image.open(path).convert("RGB"), (k * (SIDE + GAP), 0))
    sheet.save(target)


if __name__ == "__main__":
    strict_dir, work, model = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    samples(strict_dir, model / "samples.png")
    edit_example(work, model / "edit-example.png")
