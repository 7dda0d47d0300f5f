"""Text normalisation for the blocklist: undo the common ways of hiding a listed word, without the Scunthorpe
problem.

Evasions undone (each has a test in tests/safety/test_blocklist.py):
- case and Unicode compatibility forms (NFKC: fullwidth, mathematical bold, circled letters, ligatures);
- confusable look-alike letters (Cyrillic and Greek for Latin), accents and other combining marks;
- zero-width and other invisible characters (removed, they never separate);
- leetspeak digits and symbols (matched as character classes, so an ambiguous "1" can be an "i" or an "l");
- separators inside a word ("b.a.d", "b-a-d") and single letters spaced out ("b a d");
- repeated letters ("baaad") and simple plurals ("bads", "badz", "baddes").

Scunthorpe safety: a term only ever matches a *whole* token — a word, a word with its inner separators
removed, or a run of single letters — never a substring of a longer word, and two ordinary words are never
glued together, so "Scunthorpe", "classic" or "grass hopper" do not match "cunt", "ass" or "asshop".
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Look-alike letters from other scripts, mapped *before* case folding because upper and lower case look-alikes
# differ (Cyrillic "Н" looks like Latin "H", its lower case "н" like a small-caps "h").
_CONFUSABLES = {
    # Cyrillic
    "А": "A", "а": "a", "В": "B", "в": "b", "Е": "E", "е": "e", "Ё": "E", "ё": "e", "К": "K", "к": "k",
    "М": "M", "м": "m", "Н": "H", "н": "h", "О": "O", "о": "o", "Р": "P", "р": "p", "С": "C", "с": "c",
    "Т": "T", "т": "t", "У": "Y", "у": "y", "Х": "X", "х": "x", "Ѕ": "S", "ѕ": "s", "І": "I", "і": "i",
    "Ї": "I", "ї": "i", "Ј": "J", "ј": "j", "Ԛ": "Q", "ԛ": "q", "Ԝ": "W", "ԝ": "w", "ԁ": "d", "Ԁ": "d",
    "һ": "h",
    "Ь": "b", "ь": "b", "Ъ": "b", "ъ": "b", "Ү": "Y", "ү": "y", "Һ": "H", "Ӏ": "l", "ӏ": "l", "п": "n",
    "г": "r", "Г": "r", "З": "3", "з": "3", "Ч": "4", "ч": "4", "Д": "A", "Л": "N", "И": "N", "и": "u",
    "Я": "R", "я": "r", "ш": "w", "Ш": "W", "щ": "w", "Щ": "W", "Ц": "U", "ц": "u", "Ж": "X", "ж": "x",
    # Greek
    "Α": "A", "α": "a", "Β": "B", "β": "b", "Ε": "E", "ε": "e", "Ζ": "Z", "Η": "H", "η": "n", "Ι": "I",
    "ι": "i", "Κ": "K", "κ": "k", "Μ": "M", "μ": "u", "ϰ": "k",
    "Ν": "N", "ν": "v", "Ο": "O", "ο": "o", "Ρ": "P",
    "ρ": "p", "Τ": "T", "τ": "t", "Υ": "Y", "υ": "u", "Χ": "X", "χ": "x", "ϲ": "c", "Ϲ": "C", "ς": "s",
    "σ": "o", "Σ": "E", "ω": "w", "γ": "y", "δ": "d", "θ": "o", "Θ": "O", "λ": "A", "π": "n", "ψ": "w",
    "Π": "N", "Ω": "O", "Δ": "A", "Λ": "A", "ϳ": "j",
    # Latin extensions and IPA that NFKC keeps
    "ı": "i", "ȷ": "j", "ɡ": "g", "ɑ": "a", "ɩ": "i", "ʟ": "l", "ɪ": "i", "ʀ": "r", "ʏ": "y", "ᴀ": "a",
    "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ᴊ": "j", "ᴋ": "k", "ᴍ": "m", "ɴ": "n",
    "ᴏ": "o", "ᴘ": "p", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ø": "o", "Ø": "O",
    "đ": "d", "Đ": "D", "ħ": "h", "ł": "l", "Ł": "L", "ŧ": "t", "ß": "ss", "æ": "ae", "œ": "oe",
    # Armenian and Cherokee look-alikes seen in evasion kits
    "օ": "o", "ո": "n", "ս": "u", "ց": "g", "հ": "h", "ք": "p", "Ꭺ": "A", "Ꮯ": "C", "Ꭼ": "E", "Ꮋ": "H",
    "Ꮶ": "K", "Ꮮ": "L", "Ꮇ": "M", "Ꮲ": "P", "Ꭲ": "T", "Ꮃ": "W", "Ꮪ": "S",
}  # fmt: skip

# Characters that stand for a letter in leetspeak. Each letter of a listed term becomes a character class of
# itself and these stand-ins; a stand-in may serve several letters ("1" is "i" or "l").
LEET = {
    "a": "4@^", "b": "8", "c": "(<¢", "e": "3€£", "g": "96", "h": "#", "i": "1!|", "l": "1|", "o": "0",
    "s": "5$§", "t": "7+", "z": "2", "x": "%", "k": "", "u": "", "q": "9",
}  # fmt: skip
LEET_CHARS = frozenset("".join(LEET.values()))

# Code points that render as nothing but are not in Unicode category Cf (which is removed wholesale).
# Leet symbols that are also punctuation: stripped from a piece's ends as one more candidate.
_EDGE_SYMBOLS = "".join(sorted(LEET_CHARS - set("0123456789")))
# Longest run of single letters considered ("s p a c e d" words); bounds the quadratic sub-run enumeration.
_MAX_RUN = 40
_INVISIBLE_EXTRA = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5\u180e")


def fold(text: str) -> str:
    """NFKC, look-alikes to Latin, case fold, accents and invisible characters removed."""
    # Look-alikes before NFKC too: NFKC turns some of them into other letters (lunate sigma "ϲ" into "ς").
    text = "".join(_CONFUSABLES.get(ch, ch) for ch in text)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(_CONFUSABLES.get(ch, ch) for ch in text)
    text = text.casefold()
    # NFD splits accents off their letters (and NFKC may have built new ones); marks and invisibles are
    # dropped.
    kept = []
    for ch in unicodedata.normalize("NFD", text):
        category = unicodedata.category(ch)
        if category in ("Mn", "Me", "Cf") or ch in _INVISIBLE_EXTRA:
            continue
        kept.append(ch)
    text = "".join(kept)
    # Folding may have produced new look-alikes (e.g. a fullwidth Cyrillic letter); one more pass is cheap.
    return "".join(_CONFUSABLES.get(ch, ch) for ch in text).casefold()


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch in LEET_CHARS


@dataclass(frozen=True)
class Token:
    """One candidate a term is matched against, whole. `text` is folded but still holds leet characters."""

    text: str
    start: int  # index of the first piece this token covers
    end: int  # one past the last piece


def tokenize(text: str) -> tuple[list[str], list[Token]]:
    """Folds `text` and returns (its pieces, in order; candidate tokens).

    Pieces are the maximal runs of letters, digits and leet symbols; separators (".", "-", "_", "*", ...)
    split a chunk into pieces. Candidates are: every piece (also with leet symbols stripped from its ends,
    which are more often punctuation: "bad!"), every chunk with its separators removed ("b.a.d" -> "bad"), and
    every run of consecutive single-character pieces, over whitespace too ("b a d" -> "bad").
    """
    folded = fold(text)
    chunks: list[list[str]] = []
    for chunk in folded.split():
        pieces, current = [], []
        for ch in chunk:
            if _is_word_char(ch):
                current.append(ch)
            elif current:
                pieces.append("".join(current))
                current = []
        if current:
            pieces.append("".join(current))
        if pieces:
            chunks.append(pieces)

    flat: list[str] = [p for pieces in chunks for p in pieces]
    # A piece counts as a single letter of a spaced-out word when it is one character, or one with
    # punctuation-like leet symbols around it ("(s", "e!").
    singles = [next((v for v in piece_variants(p) if len(v) == 1), "") for p in flat]
    candidates: list[Token] = []
    seen: set[tuple[str, int, int]] = set()

    def add(text: str, start: int, end: int) -> None:
        if text and (text, start, end) not in seen:
            seen.add((text, start, end))
            candidates.append(Token(text, start, end))

    index = 0
    for pieces in chunks:
        for piece in pieces:
            add(piece, index, index + 1)
            for variant in piece_variants(piece)[1:]:
                add(variant, index, index + 1)
            index += 1
        if len(pieces) > 1:
            for variant in piece_variants("".join(pieces)):
                add(variant, index - len(pieces), index)

    # Runs of single characters ("b a d", "b.a.d", "k 1 l l"): every contiguous sub-run is a candidate, so a
    # stray single letter in front ("a b a d") does not hide the word. Runs never include longer words, so two
    # ordinary words are never glued together.
    run_start = None
    for i in range(len(flat) + 1):
        single = i < len(flat) and len(singles[i]) == 1
        if single and run_start is None:
            run_start = i
        elif not single and run_start is not None:
            for a in range(run_start, i):
                for b in range(a + 2, min(i, a + _MAX_RUN) + 1):
                    add("".join(singles[a:b]), a, b)
            run_start = None
    return flat, candidates


def piece_variants(piece: str) -> list[str]:
    """`piece`, and without up to two leet symbols at either end: those are as often punctuation as letters
    ("(bad)!" -> "bad", but "(@@ss" -> "@@ss" keeps the "@" that stands for "a")."""
    lead = len(piece) - len(piece.lstrip(_EDGE_SYMBOLS))
    trail = len(piece) - len(piece.rstrip(_EDGE_SYMBOLS))
    variants = [piece]
    for j in range(min(trail, 2) + 1):  # leading symbols first: "($" is more likely "(" + "s" than "c" + ")"
        for i in range(min(lead, 2) + 1):
            if i + j and i + j < len(piece):
                variants.append(piece[i : len(piece) - j])
    return list(dict.fromkeys(variants))


def term_pattern(term: str) -> str:
    """A regular expression (no anchors) matching a folded, leet-written, letter-repeated, pluralised `term`.

    Each run of one letter in the term (the "ll" of "kill") becomes a character class of the letter and its
    leet stand-ins, repeated at least as often as in the term: "kiiilll" matches "kill", but "as" does not
    match "ass".
    """
    letters = [c for c in fold(term) if _is_word_char(c)]
    if not letters:
        raise ValueError(f"blocklist term {term!r} has no letters")
    parts = []
    i = 0
    while i < len(letters):
        j = i
        while j < len(letters) and letters[j] == letters[i]:
            j += 1
        parts.append(_char_class(letters[i]) + ("+" if j - i == 1 else f"{{{j - i},}}"))
        i = j
    s, e = _char_class("s"), _char_class("e")
    # Simple plurals and their spellings in evasion: -s, -es, -z.
    # Exactly one plural ending: "asses" is "ass" + "es", but "assess" is not.
    plural = f"(?:{s}|{e}{s}|{_char_class('z')})?"
    return "".join(parts) + plural


def _char_class(letter: str) -> str:
    stand_ins = LEET.get(letter, "")
    return "[" + re.escape(letter + stand_ins) + "]"


def phrase_words(term: str) -> list[str]:
    """The words of a phrase after folding ("Kill  yourself" -> ["kill", "yourself"])."""
    return [w for w in re.split(r"[^\w" + re.escape("".join(LEET_CHARS)) + r"]+", fold(term)) if w]
