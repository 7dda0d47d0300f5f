"""docs/interfaces.md prints the table of request limits as `python -m unclip.limits` does."""

from __future__ import annotations

from pathlib import Path

from unclip.limits import LIMITS, check_chars, table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "interfaces.md"


def test_docs_hold_the_limits_table():
    text = DOCS.read_text()
    start = text.index("<!-- limits-table:start -->") + len("<!-- limits-table:start -->")
    end = text.index("<!-- limits-table:end -->")
    assert text[start:end].strip() == table()


def test_check_chars_names_the_field():
    assert check_chars("user_chars", "u" * 256, "user") == "u" * 256
    try:
        check_chars("user_chars", "u" * (LIMITS["user_chars"].high + 1), "user")
    except ValueError as error:
        assert str(error).startswith("user must be 0..256 characters")
    else:
        raise AssertionError("a 257-character user passed")
