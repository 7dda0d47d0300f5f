"""Text that came from a caller, made safe to print on one line of a terminal or a log.

A request's `user` or `prompt` may hold a newline (forging a second audit line), a carriage return or an
ANSI escape (rewriting what the terminal shows), or a bidi override (reordering it). `printable` escapes
every character of Unicode category Cc (C0, DEL, C1), Cf (format: bidi overrides, zero-width), Zl and Zp
(line and paragraph separators), so one record stays one line and reads as what it holds. Import-free.
"""

from __future__ import annotations

import unicodedata

_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object) -> str:
    """`text` (str() of it) with backslashes doubled and control / format / separator characters escaped as
    \\n, \\xNN, \\uNNNN: one line, unambiguous."""
    text = str(text)
    if text.isprintable() and "\\" not in text:  # the common case, in C
        return text
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in _ESCAPED_CATEGORIES:
            out.append(_escape(char))
        else:
            out.append(char)
    return "".join(out)


def printable_json(line: str) -> str:
    """A JSON text (json.dumps(..., ensure_ascii=False)) with the characters json leaves raw that break a
    line or a terminal (C1, format, separators) written as JSON \\uNNNN escapes: the same JSON value."""
    out = []
    for char in line:
        if char != "\\" and unicodedata.category(char) in _ESCAPED_CATEGORIES:
            code = ord(char)
            if code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:  # a surrogate pair, as JSON writes characters beyond the BMP
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(char)
    return "".join(out)
