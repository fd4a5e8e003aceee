"""Token categories shared by `distill cache audit` and the per-category bits per byte of `distill eval`.

A piece of text (a token's bytes, or a span of text every model scores) is, with its leading whitespace set
aside: ``words`` (ASCII letters and digits, at least one letter), ``digits``, ``punctuation`` (only the prose
marks ``.,;:!?'"()-``), ``code`` (only other ASCII symbols), ``whitespace`` (nothing left), ``multibyte``
(any byte >= 0x80: accents, CJK, emoji), ``special`` (a special token), else ``other`` (mixed, e.g. ``->``
or ``x.y``).
"""

from __future__ import annotations

import string
from typing import Any

CATEGORIES = ("words", "whitespace", "digits", "punctuation", "code", "multibyte", "special", "other")
_PROSE = frozenset(".,;:!?'\"()-")
_CODE = frozenset(string.punctuation) - _PROSE
_LETTERS = frozenset(string.ascii_letters)
_ALNUM = _LETTERS | frozenset(string.digits)


def categorize_bytes(data: bytes) -> str:
    """Category of a piece of text given as bytes (see the module doc); never "special"."""
    if any(byte >= 0x80 for byte in data):
        return "multibyte"
    text = data.decode("ascii").lstrip(" \t\n\r\f\v")
    chars = set(text)
    if not text:
        return "whitespace"
    if text.isdigit():
        return "digits"
    if chars <= _ALNUM and chars & _LETTERS:
        return "words"
    if chars <= _PROSE:
        return "punctuation"
    if chars <= _CODE:
        return "code"
    return "other"


def categorize_token(key: tuple[str, Any]) -> str:
    """Category of one vocabulary entry (a `list_token_keys` key: ("special", str) or ("bytes", bytes))."""
    return "special" if key[0] == "special" else categorize_bytes(key[1])
