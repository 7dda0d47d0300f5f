"""The blocklist filter on its own: each evasion technique, and the Scunthorpe cases it must leave alone."""

from __future__ import annotations

import pytest

from services.safety.filters.base import CheckInput
from services.safety.filters.blocklist import BlocklistFilter
from services.safety.policy import PolicyError

TERMS = {"violence": ["kill", "behead"], "profanity": ["ass", "shit", "cunt"], "self_harm": ["kill yourself"]}


@pytest.fixture(scope="module")
def blocklist() -> BlocklistFilter:
    return BlocklistFilter("words", {"terms": TERMS}, ".")


def found(blocklist: BlocklistFilter, text: str) -> set[str]:
    return {t.text for t in blocklist.matches(text)}


@pytest.mark.parametrize(
    "text",
    [
        "KILL",  # case
        "ｋｉｌｌ",  # fullwidth (NFKC)
        "𝐤𝐢𝐥𝐥",  # mathematical bold (NFKC)
        "ⓚⓘⓛⓛ",  # circled letters (NFKC)
        "kіll",  # Cyrillic і
        "κill",  # Greek kappa
        "k1ll",  # leet digit
        "k!ll",  # leet symbol
        "k|ll",  # leet symbol, ambiguous i/l
        "k\u200bi\u200cl\u200dl",  # zero-width characters
        "k\u00adill",  # soft hyphen
        "k\u2060ill\ufeff",  # word joiner, BOM
        "k.i.l.l",  # separators inside the word
        "k-i-l-l",
        "k_i_l_l",
        "k i l l",  # single letters spaced out
        "k. i. l. l.",
        "kiiiiilllll",  # repeated letters
        "kills",  # plural
        "kíll",  # accents
        "k̶i̶l̶l̶",  # combining strike-through
        "(kill)!",  # punctuation around it
        "go k1ll, now",
    ],
)
def test_evasions_are_caught(blocklist, text):
    assert "kill" in found(blocklist, text)


@pytest.mark.parametrize("text", ["a$$", "@ss", "4ss", "a s s", "asses", "sh!t", "$h1t", "5hit!", "c.u.n.t"])
def test_leet_and_spacing_of_other_terms(blocklist, text):
    assert found(blocklist, text) & {"ass", "shit", "cunt"}


def test_phrases_match_across_words_and_joined(blocklist):
    for text in ["kill yourself", "KILL   YOURSELF", "k1ll y0urs3lf", "killyourself", "kill.yourself"]:
        assert "kill yourself" in found(blocklist, text), text
    assert "kill yourself" not in found(blocklist, "kill the lights yourself")


@pytest.mark.parametrize(
    "text",
    [
        "Scunthorpe",  # the Scunthorpe problem itself
        "a skilled skillet",  # a listed word inside innocent words
        "class, classic, grass, glass, bass, passage, assassin, assess, embassy",
        "as",  # repeated-letter tolerance never shortens a term ("as" is not "ass")
        "grass hopper",  # neighbouring words that spell one together
        "his hit song",  # "s hit" across a word boundary
        "the unbeheaded statue",
        "a well-being retreat",
        "Vitamin a, then b",
    ],
)
def test_scunthorpe_cases_are_left_alone(blocklist, text):
    assert found(blocklist, text) == set()


def test_check_reports_category_and_term_for_the_audit(blocklist):
    [scores] = blocklist.check(CheckInput("prompt", prompt="please b.e.h.e.a.d it"))
    assert [(s.category, s.score, s.detail) for s in scores] == [("violence", 1.0, "term:behead")]


def test_terms_from_a_file_relative_to_the_policy(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "hate.txt").write_text("# one term per line\nnazi\n\nswastika  # symbol\n")
    blocklist = BlocklistFilter("w", {"files": {"hate": "lists/hate.txt"}}, str(tmp_path))
    assert {t.text for t in blocklist.matches("a n4z1 sw@stika")} == {"nazi", "swastika"}


def test_a_term_without_letters_is_a_policy_error(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "categories:\n  x: {action: block}\nfilters:\n  w:\n    type: blocklist\n    terms:\n      x: ['!']\n"
    )
    from services.safety.policy import load_policy

    with pytest.raises(PolicyError, match=r"p.yaml:7: filters.w.terms.x: .* needs at least two letters"):
        load_policy(str(policy))
