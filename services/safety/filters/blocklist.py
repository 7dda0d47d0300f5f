"""Blocklist: words and phrases per category, matched after normalisation (services/safety/textnorm.py).

Policy entry:
    words:
      type: blocklist
      terms:                      # category -> words and phrases
        violence: [kill yourself, behead]
      files:                      # category -> a file of terms, one per line (# comments),
        hate: lists/hate.txt      # relative to the policy file
A match scores 1.0 in its category. The matched term goes to the audit log only, never to the caller.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from services.safety.filters.base import CheckInput, Filter, Score, SpecError
from services.safety.textnorm import fold, phrase_words, piece_variants, term_pattern, tokenize


@dataclass
class _Term:
    category: str
    text: str  # as listed (audit only)
    whole: re.Pattern[str]  # the term (a phrase with its spaces removed) as one token
    words: list[re.Pattern[str]]  # a phrase's words, each a token in a row (empty for a single word)


class BlocklistFilter(Filter):
    type = "blocklist"
    accepts = frozenset({"text"})
    spec_keys = frozenset({"terms", "files"})

    def __init__(self, name: str, spec: dict[str, Any], policy_dir: str):
        super().__init__(name, spec, policy_dir)
        lists: dict[str, list[str]] = {}
        terms = spec.get("terms", {})
        if not isinstance(terms, dict):
            raise SpecError("terms", "must be a mapping of category -> list of words and phrases")
        for category, words in terms.items():
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise SpecError(f"terms.{category}", "must be a list of strings")
            lists.setdefault(str(category), []).extend(words)
        files = spec.get("files", {})
        if not isinstance(files, dict):
            raise SpecError("files", "must be a mapping of category -> file path")
        for category, path in files.items():
            full = os.path.join(policy_dir, str(path))
            try:
                with open(full, encoding="utf-8") as f:
                    words = [line.split("#", 1)[0].strip() for line in f]
            except OSError as error:
                raise SpecError(f"files.{category}", f"cannot read {full}: {error.strerror}") from error
            lists.setdefault(str(category), []).extend(w for w in words if w)
        if not lists:
            raise SpecError("terms", "a blocklist needs at least one term (in `terms` or `files`)")

        self.terms: list[_Term] = []
        for category, words in lists.items():
            for word in words:
                self.terms.append(self._compile(category, word))
        self.categories = sorted(lists)

    @staticmethod
    def _compile(category: str, text: str) -> _Term:
        words = phrase_words(text)
        if not words or len("".join(words)) < 2:
            raise SpecError(f"terms.{category}", f"term {text!r} needs at least two letters")
        whole = re.compile(term_pattern("".join(words)))
        if len(words) == 1:
            return _Term(category, text, whole, [])
        # Inner words of a phrase take no plural; the last one may.
        inner = [re.compile(term_pattern(w).rsplit("(?:", 1)[0]) for w in words[:-1]]
        return _Term(category, text, whole, [*inner, re.compile(term_pattern(words[-1]))])

    def matches(self, text: str) -> list[_Term]:
        """The listed terms `text` contains, after normalisation (each at most once)."""
        pieces, candidates = tokenize(text)
        variants = [piece_variants(p) for p in pieces]
        found: dict[int, _Term] = {}
        for index, term in enumerate(self.terms):
            if any(term.whole.fullmatch(c.text) for c in candidates):
                found[index] = term
            elif term.words and self._phrase_in(term.words, variants):
                found[index] = term
        return list(found.values())

    @staticmethod
    def _phrase_in(words: list[re.Pattern[str]], variants: list[list[str]]) -> bool:
        n = len(words)
        for start in range(len(variants) - n + 1):
            if all(any(w.fullmatch(v) for v in variants[start + k]) for k, w in enumerate(words)):
                return True
        return False

    def check(self, item: CheckInput) -> list[list[Score]]:
        assert item.prompt is not None
        return [[Score(t.category, 1.0, None, f"term:{t.text}") for t in self.matches(item.prompt)]]


__all__ = ["BlocklistFilter", "fold"]
