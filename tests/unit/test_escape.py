"""unclip.escape: caller text printed on one line, unambiguous; JSON stays the same value."""

from __future__ import annotations

import json

from unclip.escape import printable, printable_json


def test_printable_escapes_controls_formats_and_separators():
    assert printable("plain text, ünïcödé 画像") == "plain text, ünïcödé 画像"
    assert printable("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert printable("\x1b[2K\x00\x7f\x85") == "\\x1b[2K\\x00\\x7f\\x85"
    assert printable("\u202eevil\u2028\u2029\u200b") == "\\u202eevil\\u2028\\u2029\\u200b"
    assert printable("back\\slash\n") == "back\\\\slash\\n"  # a literal "\n" cannot pass for an escaped one
    assert "\n" not in printable("x\n" * 100)


def test_printable_json_is_the_same_value_on_one_line():
    record = {"user": "m\nallory\u2028\x85\u202e\U000e0001", "prompt": "ok"}
    line = printable_json(json.dumps(record, ensure_ascii=False))
    assert json.loads(line) == record
    assert line.isprintable() and len(line.splitlines()) == 1
