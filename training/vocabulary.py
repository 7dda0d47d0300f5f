"""Writes the shapes world's words as a model folder's vocabulary.txt (unclip.vocabulary):

    python -m training.vocabulary models/shapes-toy

The words are every word a training caption can contain (training.world.vocabulary), so the orchestrator can
tell a person which words of a prompt the model never saw. The trainer writes the file with the tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.world import vocabulary
from unclip.vocabulary import FILE_NAME, write

SOURCE = "every word of the shapes world's captions (training/world.py); python -m training.vocabulary DIR"


def write_vocabulary(model_dir: str | Path) -> Path:
    """`model_dir`/vocabulary.txt from the shapes world's caption words (punctuation left out)."""
    words = [word for word in vocabulary() if word.isalnum()]
    return write(Path(model_dir) / FILE_NAME, words, SOURCE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.vocabulary", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model_dir", help="the model folder to write vocabulary.txt into")
    args = parser.parse_args(argv)
    print(write_vocabulary(args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
