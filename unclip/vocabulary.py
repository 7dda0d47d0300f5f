"""A model's vocabulary: the words its text encoder saw in training, to tell a person which words of a prompt
it does not know.

A model folder may ship `vocabulary.txt` (one word a line, `#` starts a comment). The orchestrator loads it
(UNCLIP_VOCABULARY; `unclip up` points it at the model folder's file) and answers the words of a prompt
outside it in `ImagesResponse.warnings`: a warning, not a refusal, because an unknown word is not an error;
it just has little or no effect on the picture. A model without the file is not checked.

Import-free (no torch, no grpc), like unclip.limits, so every front door can use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

FILE_NAME = "vocabulary.txt"

# Words as a person writes them: letters and digits, with an inner apostrophe or hyphen ("don't", "x-ray").
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def load(path: str | Path) -> frozenset[str]:
    """The words of a vocabulary file, lower-cased; OSError when it cannot be read."""
    words = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            words.add(word)
    return frozenset(words)


def write(path: str | Path, words: Iterable[str], source: str) -> Path:
    """Writes a vocabulary file (sorted, one word a line) with a comment naming where the words come from."""
    path = Path(path)
    lines = [f"# {source}", *sorted({w.strip().lower() for w in words if w.strip()})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def words_of(prompt: str) -> list[str]:
    """The prompt's words, lower-cased, in order (punctuation dropped)."""
    return [match.group(0) for match in _WORD.finditer(prompt.lower())]


def unknown_words(prompt: str, vocabulary: frozenset[str]) -> list[str]:
    """The prompt's words outside `vocabulary`, each once, in the order they first appear."""
    seen: dict[str, None] = {}
    for word in words_of(prompt):
        if word not in vocabulary:
            seen.setdefault(word)
    return list(seen)


def warning(words: list[str]) -> str:
    """The one-line warning for a response, naming the unknown words."""
    quoted = ", ".join(f'"{word}"' for word in words)
    noun = "word" if len(words) == 1 else "words"
    return f"the model does not know the {noun} {quoted}: expect little or no effect on the picture"
