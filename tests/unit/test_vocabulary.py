"""A model's vocabulary file: the words of a prompt it does not know, and the bundled model's file in step
with the shapes world it was trained on."""

import subprocess
import sys
from pathlib import Path

from unclip.vocabulary import FILE_NAME, load, unknown_words, warning, words_of

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "shapes-toy"


def test_unknown_words_are_each_named_once_in_order():
    known = frozenset({"a", "red", "circle", "on", "blue", "background"})
    assert words_of("A red circle, on a BLUE background!") == [
        "a",
        "red",
        "circle",
        "on",
        "a",
        "blue",
        "background",
    ]
    assert unknown_words("a pink hexagon on a pink background", known) == ["pink", "hexagon"]
    assert unknown_words("a red circle on a blue background", known) == []
    assert warning(["pink", "hexagon"]).startswith('the model does not know the words "pink", "hexagon"')


def test_the_bundled_vocabulary_is_the_shapes_worlds_words(tmp_path):
    shipped = load(BUNDLED / FILE_NAME)
    # The command that made it (`tests/training` shadows the `training` package inside pytest: a subprocess).
    done = subprocess.run(
        [sys.executable, "-m", "training.vocabulary", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert load(tmp_path / FILE_NAME) == shipped
    assert {"circle", "star", "yellow", "background", "top", "left"} <= shipped
    assert unknown_words("a photo of a cat", shipped) == ["photo", "cat"]
