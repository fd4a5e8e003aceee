"""How a model's tokenizer turns a row's text into the input the model was trained on.

    from distill.pipeline.text.tokens import check_tokenizer, encode_texts, prefix_ids
    profile = check_tokenizer(tokenizer)          # refuses a tokenizer that cannot reproduce text
    [(ids, spans)] = encode_texts(tokenizer, [text])  # (n,) int64, (n, 2) int64: what each token consumed
    input_ids = profile.prefix + ids.tolist()       # the model's input, its BOS first

[input-as-trained note] A model sees its text the way it was trained: with the tokens its
tokenizer puts before the text (Gemma's and Llama's ``<bos>``; Qwen3 and SmolLM put none)
and nothing else that changes the text (no EOS, no chat template). Those prefix tokens have
the span (0, 0): they consume no text, are never a prediction target and never aligned. The
prediction made *at* the prefix is the model's prediction of the first text token, so a model
with a BOS scores every byte of a row, and one without cannot score its first token.

[real-span note] A token's span is the text it really consumed, computed from the token's own
bytes, not the tokenizer's ``offset_mapping``: ``ByteLevel(trim_offsets=True)`` reports
``'ĊĠĠĠ'`` as consuming only ``"\\n"`` although it consumed ``"\\n   "``. The tokens' bytes are
laid end to end and byte positions are mapped to character positions: a token starts at the
character holding its first byte and ends after the character holding its last byte, so a
token ending inside a multi-byte character overlaps the next token the way HF's offsets do for
byte-split characters (see [clean-end note] in align.py). Spans are exact only because the
bytes are checked to be the text's bytes: once per tokenizer on a probe text
(``check_tokenizer``), and on every text (``encode_texts``). Two differences are allowed and
mapped: the dummy space SentencePiece (Metaspace, ``Prepend('▁')``) or ``add_prefix_space``
puts before the text (it belongs to the first token and consumes nothing), and an NFC
normalizer (Qwen's), whose output is canonically the same text. Anything else (WordPiece,
lowercasing, accent stripping, NFKC, unknown tokens) raises ``TokenizerError``.
"""

from __future__ import annotations

import json
import re
import unicodedata
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from distill.config import ConfigError

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
PLAIN = "plain"

_SP_SPACE = "\u2581"  # '▁'
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_PREFIX_PROBE = "a"
# Whitespace runs, tabs, CRLF, accents (precomposed and combining), CJK, emoji (modifier and ZWJ
# sequences), compatibility characters NFKC would change (ﬁ, ２, ²) and both cases. Starts with a
# letter, so that a dummy prefix space shows as one extra leading byte.
PROBE_TEXT = (
    "Probe: café, cafe\u0301 and naïve; UPPER lower.\n"
    "\tTabbed\tline,\r\nCRLF line,  two  spaces,    four,\n"
    "def f(x):\n    if x:\n        return x  # indented\n\n"
    "日本語の文章。東京 👍🏽 👩\u200d👩\u200d👧 🧪 ﬁ ２ x² end.\n"
)
_CHANGING_NORMALIZERS = {"Lowercase", "BertNormalizer", "StripAccents", "NFKC", "NFKD", "NFD", "Strip", "Precompiled"}


class TokenizerError(ConfigError):
    """A tokenizer cannot be used: its tokens do not reproduce the text they were made from."""


def prefix_ids(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer`` puts before any text when it adds its special tokens (its BOS), else ``[]``.

    Found by comparing the encoding of a probe text with and without special tokens, so it
    follows the tokenizer's own post-processor rather than a ``bos_token`` attribute that many
    tokenizers set without ever adding it. Tokens added after the text (an EOS) are left out.
    """
    plain = tokenizer(_PREFIX_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PREFIX_PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    return []


# --- what vocabulary strings stand for -----------------------------------------------------------


def backend_json(tokenizer: Any) -> dict | None:
    """The tokenizers-library JSON of a fast tokenizer, or None when it has no backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.loads(backend.to_str())


def special_tokens(tokenizer: Any) -> set[str]:
    """Every special token string: the named ones and added tokens flagged special."""
    specials = {str(token) for token in getattr(tokenizer, "all_special_tokens", [])}
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content))
    return specials


def backend_components(tokenizer: Any) -> dict | None:
    """The backend's normalizer, pre_tokenizer, decoder and post_processor JSON (None when absent) and
    its model's type and byte_fallback, read without serializing the vocabulary (`backend_json` of a
    262k-token tokenizer takes seconds); None when there is no backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    components: dict[str, Any] = {}
    for name in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        component = getattr(backend, name)
        components[name] = None if component is None else json.loads(component.__getstate__())
    model = backend.model
    components["model"] = {"type": type(model).__name__, "byte_fallback": bool(getattr(model, "byte_fallback", False))}
    return components


@lru_cache(maxsize=1)
def build_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in table.items()}


def collect_types(component: Any) -> set[str]:
    """All `type` values in a (possibly nested Sequence) pre-tokenizer/decoder/normalizer JSON."""
    if isinstance(component, dict):
        found = {component["type"]} if isinstance(component.get("type"), str) else set()
        for value in component.values():
            found |= collect_types(value)
        return found
    if isinstance(component, list):
        return set().union(*(collect_types(item) for item in component)) if component else set()
    return set()


def detect_token_style(tokenizer: Any) -> str:
    """How vocabulary strings encode bytes: BYTE_LEVEL ('Ġ'), SENTENCEPIECE ('▁', <0xNN>) or PLAIN (utf-8).

    Read from the backend's pre-tokenizer/decoder/model; falls back to counting 'Ġ' and '▁'
    prefixes in the vocabulary when there is no backend JSON.
    """
    backend = backend_components(tokenizer)
    if backend is not None:
        types = collect_types(backend.get("pre_tokenizer")) | collect_types(backend.get("decoder"))
        if "ByteLevel" in types:
            return BYTE_LEVEL
        uses_sp_space = _SP_SPACE in json.dumps(backend.get("decoder"), ensure_ascii=False)
        if "Metaspace" in types or "ByteFallback" in types or uses_sp_space:
            return SENTENCEPIECE
        if backend.get("model", {}).get("byte_fallback"):
            return SENTENCEPIECE
        return PLAIN
    vocab = tokenizer.get_vocab()
    byte_level = sum(token.startswith("Ġ") for token in vocab)
    sentencepiece = sum(token.startswith(_SP_SPACE) for token in vocab)
    if max(byte_level, sentencepiece) < 0.01 * max(len(vocab), 1):
        return PLAIN
    return BYTE_LEVEL if byte_level > sentencepiece else SENTENCEPIECE


def is_byte_fallback(token: str) -> bool:
    """True for a SentencePiece byte-fallback piece like '<0x41>'."""
    return _BYTE_FALLBACK.match(token) is not None


def normalize_token_bytes(token: str, style: str) -> bytes:
    """The raw bytes a vocabulary string stands for.

    BYTE_LEVEL: each character maps back through GPT-2's table ('ĠCafÃ©' -> b' Caf\\xc3\\xa9');
    characters outside the table mean the string is raw text, then utf-8.
    SENTENCEPIECE: '▁' is a space, '<0xNN>' is the byte NN ('▁Café' -> b' Caf\\xc3\\xa9').
    PLAIN: utf-8.
    """
    if style == BYTE_LEVEL:
        decoder = build_byte_decoder()
        if all(char in decoder for char in token):
            return bytes(decoder[char] for char in token)
        return token.encode("utf-8")
    if style == SENTENCEPIECE:
        byte_token = _BYTE_FALLBACK.match(token)
        if byte_token:
            return bytes([int(byte_token.group(1), 16)])
        return token.replace(_SP_SPACE, " ").encode("utf-8")
    return token.encode("utf-8")


def build_token_bytes(tokenizer: Any) -> list[bytes]:
    """id -> the bytes that token consumes from the text it was made from.

    Vocabulary pieces through `normalize_token_bytes`; added tokens (special or not) are matched
    on the raw text, so their bytes are their utf-8. Ids without an entry have b"".
    """
    style = detect_token_style(tokenizer)
    added_ids = set(getattr(tokenizer, "added_tokens_decoder", {}))
    vocab = tokenizer.get_vocab()
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, token_id in vocab.items():
        table[token_id] = token.encode("utf-8") if token_id in added_ids else normalize_token_bytes(token, style)
    return table


# --- real spans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerProfile:
    """What `encode_texts` needs to know about a tokenizer, found once by `check_tokenizer`.

    name: how errors name the tokenizer. prefix: `prefix_ids`. token_bytes: `build_token_bytes`,
    byte_lengths its (V,) int64 lengths. dummy_prefix: the tokenizer may put one space before the
    text (SentencePiece, add_prefix_space). nfc: its normalizer applies NFC (Qwen).
    """

    name: str
    prefix: tuple[int, ...]
    token_bytes: list[bytes]
    byte_lengths: np.ndarray
    dummy_prefix: bool
    nfc: bool


_PROFILES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer(tokenizer: Any) -> TokenizerProfile:
    """The tokenizer's profile, after checking on `PROBE_TEXT` that its tokens reproduce text.

    Raises TokenizerError (one line, naming the tokenizer and the reason) when they do not.
    Cached per tokenizer object (recomputed if tokens were added since).
    """
    cached = _PROFILES.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    backend = backend_components(tokenizer) or {}
    table = build_token_bytes(tokenizer)
    profile = TokenizerProfile(
        name=tokenizer_name(tokenizer),
        prefix=tuple(prefix_ids(tokenizer)),
        token_bytes=table,
        byte_lengths=np.fromiter((len(piece) for piece in table), dtype=np.int64, count=len(table)),
        dummy_prefix=True,
        nfc="NFC" in collect_types(backend.get("normalizer")),
    )
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    got = _join_bytes(profile, ids)
    target = (unicodedata.normalize("NFC", PROBE_TEXT) if profile.nfc else PROBE_TEXT).encode("utf-8")
    if got not in (target, b" " + target):
        raise TokenizerError(_refusal(profile.name, _refusal_reason(tokenizer), got, target))
    profile = TokenizerProfile(**{**profile.__dict__, "dummy_prefix": got != target})
    _PROFILES[tokenizer] = (len(tokenizer), profile)
    return profile


def _join_bytes(profile: TokenizerProfile, ids: list[int]) -> bytes:
    table, size = profile.token_bytes, len(profile.token_bytes)
    return b"".join(table[i] if 0 <= i < size else b"" for i in ids)


def _refusal_reason(tokenizer: Any) -> str:
    """Why a tokenizer failed the probe, read from its backend components."""
    backend = backend_components(tokenizer) or {}
    model = backend.get("model", {}).get("type")
    changing = sorted(collect_types(backend.get("normalizer")) & _CHANGING_NORMALIZERS)
    if model == "WordPiece":
        reason = "it is a WordPiece tokenizer (its '##' pieces drop the whitespace between words)"
    elif changing:
        reason = f"its normalizer ({', '.join(changing)}) changes the text"
    else:
        reason = "its tokens' bytes are not the text's bytes (unknown tokens, or a normalizer that changes text)"
    return reason


def _refusal(name: str, reason: str, got: bytes, want: bytes) -> str:
    """One line: which tokenizer, why it cannot be used, and where its bytes first differ from the text."""
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    seen = got[max(0, at - 8) : at + 8].decode("utf-8", "replace")
    expected = want[max(0, at - 8) : at + 8].decode("utf-8", "replace")
    return (
        f"tokenizer {name!r} cannot be used: {reason}; at byte {at} its tokens read {seen!r} where the text "
        f"has {expected!r}. Alignment and bits per byte need tokens that reproduce the text byte for byte "
        "(byte-level BPE, or SentencePiece with byte fallback)"
    )


def _char_byte_bounds(text: str) -> np.ndarray:
    """(len(text) + 1,) int64: the utf-8 byte offset where each character starts, then the total."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


def _nfc_segments(text: str, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Segments NFC maps on their own: boundaries in `text` (S+1,), in NFC(text) (S+1,), and NFC(text).

    A segment starts at each character that combines with nothing before it (canonical combining
    class 0, not a Hangul vowel/trailing jamo); checked by re-joining the normalized segments.
    """
    starts = [0] + [
        i for i in range(1, len(text)) if unicodedata.combining(text[i]) == 0 and not 0x1161 <= ord(text[i]) <= 0x11C2
    ]
    bounds = starts + [len(text)]
    pieces = [unicodedata.normalize("NFC", text[a:b]) for a, b in zip(bounds, bounds[1:])]
    normalized = "".join(pieces)
    if normalized != unicodedata.normalize("NFC", text):
        raise TokenizerError(f"tokenizer {name!r}: cannot map its NFC normalization back onto a text")
    normalized_bounds = np.concatenate([[0], np.cumsum([len(piece) for piece in pieces])]).astype(np.int64)
    return np.asarray(bounds, dtype=np.int64), normalized_bounds, normalized


def compute_spans(profile: TokenizerProfile, ids: np.ndarray, text: str) -> np.ndarray:
    """(n, 2) int64 character spans each token of `ids` really consumed from `text`, see [real-span note].

    Raises TokenizerError when the tokens' bytes are not the text's (beyond the dummy prefix and NFC).
    """
    seen = text
    segments = None
    if profile.nfc and not unicodedata.is_normalized("NFC", text):
        original_bounds, normalized_bounds, seen = _nfc_segments(text, profile.name)
        segments = (original_bounds, normalized_bounds)
    target = seen.encode("utf-8")
    got = _join_bytes(profile, ids.tolist())
    if got == target:
        dummy = 0
    elif profile.dummy_prefix and len(got) == len(target) + 1 and got[:1] == b" " and got[1:] == target:
        dummy = 1
    else:
        reason = "its tokens do not reproduce this text (unknown tokens?)"
        raise TokenizerError(_refusal(profile.name, reason, got, target))
    lengths = profile.byte_lengths[np.clip(ids, 0, len(profile.byte_lengths) - 1)]
    ends_b = np.cumsum(lengths) - dummy  # (n,) byte positions in `seen`
    starts_b = np.maximum(ends_b - lengths, 0)
    char_bounds = _char_byte_bounds(seen)
    starts = np.searchsorted(char_bounds, starts_b, side="right") - 1  # char holding the first byte
    ends = np.searchsorted(char_bounds, np.maximum(ends_b, 0), side="left")  # after the char holding the last
    if segments is not None:
        original_bounds, normalized_bounds = segments
        starts = original_bounds[np.searchsorted(normalized_bounds, starts, side="right") - 1]
        ends = original_bounds[np.searchsorted(normalized_bounds, ends, side="left")]
    starts = np.minimum(starts, ends)
    return np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2)


def encode_texts(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each text's tokens, without special tokens: [(ids (n,) int64, spans (n, 2) int64)].

    spans are the character spans each token really consumed ([real-span note]); a token
    consuming nothing (a lone dummy-prefix '▁') has (0, 0). The model's input is
    `check_tokenizer(tokenizer).prefix` + ids ([input-as-trained note]).
    """
    profile = check_tokenizer(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    result = []
    for ids, text in zip(encoded, texts):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        result.append((ids, compute_spans(profile, ids, text)))
    return result


def find_clean_cut(spans: np.ndarray, start: int, end: int) -> int:
    """The largest cut in (start, end] where no character is split, else `start`; len(spans) if end reaches it.

    spans: (n, 2) real spans. Tokens [start, cut) end on a character boundary when the token
    after the cut starts at or after the end of the token before it ([cut note] in data.py).
    """
    if end >= len(spans):
        return len(spans)
    cut = end
    while cut > start and spans[cut, 0] < spans[cut - 1, 1]:
        cut -= 1
    return cut
