"""Cross-tokenizer alignment: teacher rows from the cache vs the student's own tokenization.

The student reads each cached row's `text` with its own tokenizer (`tokenize_for_student`: its
prefix ids, then the text's tokens, see [input-as-trained note] in tokens.py). Two positions,
teacher `t` and student `s`, are *aligned* when the tokens 0..t and 0..s consumed exactly the
same text prefix `text[:e]`: then their next-token predictions (and hidden states) are
comparable. Offsets are character spans `[start, end)` in `text` of what each token really
consumed, computed from the tokens' bytes ([real-span note] in tokens.py), not the tokenizer's
`offset_mapping`, which trims whitespace for some tokenizers. Prefix tokens have the span (0, 0)
and are never aligned.

    from distill.pipeline.text.align import align_batch, load_or_build_vocab_map
    batch = align_batch(texts, teacher_offsets, teacher_lengths, student_tokenizer, max_length=2048)
    teacher_rows = topk_ids[batch.batch_idx, batch.teacher_pos]      # (A, K)
    student_rows = logits[batch.batch_idx, batch.student_pos]         # (A, V_s)
    vocab_map = load_or_build_vocab_map(teacher_tokenizer, student_tokenizer, cache_dir)
    student_ids = vocab_map[teacher_rows]                             # (A, K), -1 = tail bin

[clean-end note] A token closes a clean prefix only when the next token starts at or
after its end. Byte-level BPE (and SentencePiece byte fallback) splits a character into
several byte tokens that all get the character's span, and a token may even end in the middle
of one character and start the next (`'¥æ'` = last bytes of 日 + first byte of 本, span of
both): such a token ends *inside* a character, the next token then starts before its end, and
the position is skipped. Among clean tokens ending at the same character the last one counts
(it consumed everything up to there). Tokens with the span (0, 0) (prefix, a lone dummy-prefix
'▁') consume nothing and are ignored. The last token of a row has no next token, so rows are
only ever cut at clean ends: stage 1 cuts documents there ([cut note] in data.py) and
`tokenize_for_student` moves a context cut inside a character back to the last clean end.

A packed row ([packing note] in packing.py) holds several document segments; the student reads each
segment's text on its own (its prefix, then the segment's tokens) and the student row lays them end
to end with their spans in the row's text, so student and teacher segments occupy the same disjoint
character ranges and no aligned pair spans two documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.pipeline.text.packing import build_packed_student_rows, is_packed
from distill.pipeline.text.tokens import (  # noqa: F401  (BYTE_LEVEL ... are part of this module's interface)
    BYTE_LEVEL,
    PLAIN,
    SENTENCEPIECE,
    backend_json,
    build_byte_decoder,
    check_tokenizer,
    detect_token_style,
    encode_texts,
    find_clean_cut,
    is_byte_fallback,
    normalize_token_bytes,
    special_tokens,
)

_CALL_TIME_KEYS = ("truncation", "padding")  # backend state that tokenizer calls mutate; not identity
VOCAB_MAP_VERSION = 1  # bump when build_vocab_map changes, so cached maps are rebuilt


# --- position alignment ---------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """Aligned position pairs of one row.

    teacher_pos: (A,) int64 teacher positions, strictly increasing.
    student_pos: (A,) int64 student positions, strictly increasing; pair i = (teacher_pos[i], student_pos[i]).
    num_student: number of real (non-padding) student tokens of the row.
    num_teacher: number of real (non-padding) teacher tokens of the row.
    """

    teacher_pos: np.ndarray
    student_pos: np.ndarray
    num_student: int
    num_teacher: int

    @property
    def num_aligned(self) -> int:
        return int(self.teacher_pos.shape[0])

    @property
    def student_coverage(self) -> float:
        """Share of student positions that have a teacher partner (0.0 for an empty row)."""
        return self.num_aligned / self.num_student if self.num_student else 0.0


def _to_offsets(offsets: Any, length: int) -> np.ndarray:
    """(L, 2) array-like (numpy, torch, nested lists) -> (length, 2) int64 numpy array."""
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().numpy()
    array = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return array[: max(int(length), 0)]


def find_clean_ends(offsets: Any, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions after which the consumed text is exactly `text[:end]`, see [clean-end note].

    offsets: (L, 2) character spans; positions >= length are padding.
    Returns (positions (P,) int64, ends (P,) int64), both strictly increasing.
    """
    spans = _to_offsets(offsets, length)
    positions = np.flatnonzero(spans[:, 1] > 0)  # (0, 0) = special token
    starts, ends = spans[positions, 0], spans[positions, 1]
    clean = np.ones(positions.shape[0], dtype=bool)
    clean[:-1] = starts[1:] >= ends[:-1]
    # a token that ends before an earlier token did has not consumed text[:end]
    clean[1:] &= ends[1:] >= np.maximum.accumulate(ends)[:-1]
    positions, ends = positions[clean], ends[clean]
    last_at_end = np.ones(positions.shape[0], dtype=bool)
    last_at_end[:-1] = ends[1:] != ends[:-1]
    return positions[last_at_end].astype(np.int64), ends[last_at_end].astype(np.int64)


def match_sorted_ends(ends_a: np.ndarray, ends_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) with ends_a[ia] == ends_b[ib]; both inputs strictly increasing. O(len a + len b)."""
    a, b = ends_a.tolist(), ends_b.tolist()
    matched_a: list[int] = []
    matched_b: list[int] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            matched_a.append(i)
            matched_b.append(j)
            i += 1
            j += 1
        elif a[i] < b[j]:
            i += 1
        else:
            j += 1
    return np.asarray(matched_a, dtype=np.int64), np.asarray(matched_b, dtype=np.int64)


def align_offsets(teacher_offsets: Any, teacher_length: int, student_offsets: Any) -> Alignment:
    """Align one row: teacher (L_t, 2) spans with the first `teacher_length` real, student (L_s, 2) spans.

    Student offsets are all real tokens (cut to the student's context beforehand); the
    student's own special tokens, if any, have span (0, 0) and are never aligned.
    """
    teacher_spans = _to_offsets(teacher_offsets, teacher_length)
    student_spans = _to_offsets(student_offsets, len(student_offsets))
    teacher_positions, teacher_ends = find_clean_ends(teacher_spans, teacher_spans.shape[0])
    student_positions, student_ends = find_clean_ends(student_spans, student_spans.shape[0])
    it, js = match_sorted_ends(teacher_ends, student_ends)
    return Alignment(
        teacher_pos=teacher_positions[it],
        student_pos=student_positions[js],
        num_student=int(student_spans.shape[0]),
        num_teacher=int(teacher_spans.shape[0]),
    )


def teacher_to_student_span(
    teacher_offsets: Any, teacher_length: int, student_offsets: Any, num_student: int
) -> np.ndarray:
    """For each teacher position, the student token holding the teacher token's last character.

    Used to pool the teacher's cached attention keys onto student key spans.
    teacher_offsets: (L_t, 2); student_offsets: (L_s, 2), the first `num_student` real.
    Returns (L_t,) int64: the first student token ending after that character (the one
    containing it; for whitespace that trimmed offsets leave out of every span, the token
    that swallowed it), or -1 for special/padding teacher tokens and characters beyond the
    kept student tokens. Within byte tokens sharing one span, the first of the group.
    """
    teacher_spans = _to_offsets(teacher_offsets, len(teacher_offsets))
    result = np.full(teacher_spans.shape[0], -1, dtype=np.int64)
    student_spans = _to_offsets(student_offsets, num_student)
    real_students = np.flatnonzero(student_spans[:, 1] > 0)  # (0, 0) = special token
    if real_students.size == 0:
        return result
    student_ends = np.maximum.accumulate(student_spans[real_students, 1])  # sorted for searchsorted
    length = min(int(teacher_length), teacher_spans.shape[0])
    teacher_real = np.flatnonzero(teacher_spans[:length, 1] > 0)
    last_chars = teacher_spans[teacher_real, 1] - 1
    candidate = np.searchsorted(student_ends, last_chars, side="right")  # first student end > char
    inside = candidate < real_students.size
    result[teacher_real[inside]] = real_students[candidate[inside]]
    return result


# --- tokenizer identity -----------------------------------------------------------------------


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 hex of the canonical backend JSON + special tokens; independent of folder and name.

    Call-time state (truncation, padding) is left out, so a tokenizer hashes the same
    before and after it was called with `truncation=True`.
    """
    backend = backend_json(tokenizer)
    if backend is None:
        backend = {"vocab": sorted(tokenizer.get_vocab().items()), "class": type(tokenizer).__name__}
    for key in _CALL_TIME_KEYS:
        backend.pop(key, None)
    named = {key: str(value) for key, value in getattr(tokenizer, "special_tokens_map", {}).items()}
    payload = {"backend": backend, "special_tokens": sorted(special_tokens(tokenizer)), "named_special": named}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def is_same_tokenizer(a: Any, b: Any) -> bool:
    """True when both tokenize identically (same object, or same `tokenizer_hash`); names do not matter."""
    return a is b or tokenizer_hash(a) == tokenizer_hash(b)


# --- vocabulary map ---------------------------------------------------------------------------


def list_token_keys(tokenizer: Any) -> list[tuple[int, tuple[str, Any], int]]:
    """Every vocabulary entry as (id, key, rank).

    key: ("special", string) for special tokens, else ("bytes", raw bytes); added tokens are
    stored as raw text, so their bytes are their utf-8. rank 1 marks SentencePiece byte
    fallback pieces (<0x41> and 'A' share bytes; the ordinary piece wins), else 0.
    """
    style = detect_token_style(tokenizer)
    specials = special_tokens(tokenizer)
    added_ids = set(getattr(tokenizer, "added_tokens_decoder", {}))
    entries = []
    for token, token_id in tokenizer.get_vocab().items():
        if token in specials:
            entries.append((token_id, ("special", token), 0))
        elif token_id in added_ids:
            entries.append((token_id, ("bytes", token.encode("utf-8")), 0))
        else:
            is_fallback = style == SENTENCEPIECE and is_byte_fallback(token)
            entries.append((token_id, ("bytes", normalize_token_bytes(token, style)), int(is_fallback)))
    return entries


def build_vocab_map(teacher_tokenizer: Any, student_tokenizer: Any) -> np.ndarray:
    """Teacher id -> student id of the token with identical bytes (specials: identical special), else -1.

    Returns (V_t,) int64, V_t = len(teacher_tokenizer). Injective on matched entries. Two
    passes, each in id order: first ordinary pieces match ordinary pieces and byte-fallback
    pieces match byte-fallback pieces (so identical tokenizers give the identity), then the
    teacher tokens left over take any student token with the same bytes not yet taken
    (a lone byte 'Ã' of a byte-level BPE and '<0xC3>' of SentencePiece).
    """
    student_entries = sorted(list_token_keys(student_tokenizer), key=lambda entry: (entry[2], entry[0]))
    teacher_entries = sorted(list_token_keys(teacher_tokenizer), key=lambda entry: entry[0])
    size = max([len(teacher_tokenizer)] + [token_id + 1 for token_id, _, _ in teacher_entries])
    vocab_map = np.full(size, -1, dtype=np.int64)
    taken: set[int] = set()
    same_kind: dict[tuple[tuple[str, Any], int], int] = {}
    any_kind: dict[tuple[str, Any], list[int]] = {}
    for token_id, key, rank in student_entries:
        same_kind.setdefault((key, rank), token_id)
        any_kind.setdefault(key, []).append(token_id)
    for token_id, key, rank in teacher_entries:
        student_id = same_kind.get((key, rank))
        if student_id is not None and student_id not in taken:
            vocab_map[token_id] = student_id
            taken.add(student_id)
    for token_id, key, _ in teacher_entries:
        if vocab_map[token_id] >= 0:
            continue
        student_id = next((candidate for candidate in any_kind.get(key, ()) if candidate not in taken), None)
        if student_id is not None:
            vocab_map[token_id] = student_id
            taken.add(student_id)
    return vocab_map


def pad_vocab_map(vocab_map: np.ndarray, teacher_vocab_size: int) -> np.ndarray:
    """Extend the map to the teacher MODEL's vocabulary (embedding rows can outnumber tokenizer entries,
    e.g. Qwen: 151,936 rows, ~151.7k tokens): ids past the tokenizer map to -1 (no student token)."""
    if len(vocab_map) >= teacher_vocab_size:
        return vocab_map
    return np.concatenate([vocab_map, np.full(teacher_vocab_size - len(vocab_map), -1, dtype=vocab_map.dtype)])


def load_or_build_vocab_map(teacher_tokenizer: Any, student_tokenizer: Any, cache_dir: Path) -> np.ndarray:
    """`build_vocab_map`, kept in `cache_dir/vocab_map-v<version>-<teacher hash>-<student hash>.npy`.

    Hashes are the first 16 hex digits of `tokenizer_hash`; the file is written atomically.
    """
    cache_dir = Path(cache_dir)
    teacher_key, student_key = tokenizer_hash(teacher_tokenizer)[:16], tokenizer_hash(student_tokenizer)[:16]
    name = f"vocab_map-v{VOCAB_MAP_VERSION}-{teacher_key}-{student_key}.npy"
    path = cache_dir / name
    if path.exists():
        return np.load(path)
    vocab_map = build_vocab_map(teacher_tokenizer, student_tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npy.tmp", delete=False) as handle:
        np.save(handle, vocab_map)
    os.replace(handle.name, path)
    return vocab_map


# --- student batches --------------------------------------------------------------------------


def tokenize_for_student(
    student_tokenizer: Any, texts: list[str], max_length: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The student's input for each text: its prefix ids + text tokens, cut at its context `max_length`.

    Returns (input_ids: list of (L_s,) int64, offsets: list of (L_s, 2) int64), L_s <= max_length
    counting the prefix ([input-as-trained note] in tokens.py); prefix tokens have the span (0, 0),
    text tokens the span they really consumed ([real-span note]). A cut that would fall inside a
    character (byte-split tokens) moves back so that the last kept token ends cleanly. Cutting here
    (not via `truncation=True`) leaves the tokenizer's backend state untouched.
    """
    prefix = check_tokenizer(student_tokenizer).prefix
    if max_length <= len(prefix):
        raise ValueError(f"max_length must be > {len(prefix)} (the student's prefix tokens), got {max_length}")
    input_ids, offsets = [], []
    for ids, spans in encode_texts(student_tokenizer, list(texts)):
        keep = find_clean_cut(spans, 0, max_length - len(prefix))
        input_ids.append(np.concatenate([np.asarray(prefix, dtype=np.int64), ids[:keep]]))
        offsets.append(np.concatenate([np.zeros((len(prefix), 2), dtype=np.int64), spans[:keep]]))
    return input_ids, offsets


@dataclass
class AlignedBatch:
    """A student batch and its alignment with the teacher rows.

    input_ids: (B, L_s) int64 student tokens (its prefix first, then the text's), right-padded.
    attention_mask: (B, L_s) int64, 1 on real tokens.
    batch_idx, teacher_pos, student_pos: (A,) int64, pair i gathers teacher[batch_idx[i], teacher_pos[i]]
        and student[batch_idx[i], student_pos[i]]. Prefix positions of either side are never paired.
    aligned_share: aligned student positions / student text positions over the batch (for logging).
    student_offsets: B arrays (L_s_b, 2) of character spans of the student tokens in each row's text
        ((0, 0) for the prefix).
    num_prefix: number of prefix tokens at the start of every student row (its BOS; 0 for none).
    text_end: (B,) int64, the student input of row b consumed exactly `text[b][:text_end[b]]` (the
        row's text, unless the student's context cut it, always at a character boundary).
    segment_ids: (B, L_s) int64 document segment of each student position for packed rows ([packing
        note]; the student runs them with `segment_position_ids` and no 2D mask), None when every row is
        one document.
    target_mask: (B, L_s) bool, False where a student position may carry no target (its next token is
        still prompt: `restrict_to_continuation`), None when every position may.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    batch_idx: torch.Tensor
    teacher_pos: torch.Tensor
    student_pos: torch.Tensor
    aligned_share: float
    student_offsets: list[np.ndarray]
    num_prefix: int
    text_end: torch.Tensor
    segment_ids: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None


def _pad_id(tokenizer: Any) -> int:
    """The student's pad id, else its eos id, else 0 (masked out either way)."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def _pad_rows(rows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (L_i,) int arrays -> (B, max L_i) ids right-padded with pad_id, and the (B, max L_i) mask."""
    width = max([row.shape[0] for row in rows] + [1])
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for b, row in enumerate(rows):
        input_ids[b, : row.shape[0]] = torch.from_numpy(row.astype(np.int64))
        attention_mask[b, : row.shape[0]] = 1
    return input_ids, attention_mask


def _to_numpy(array: Any) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _reuse_teacher_rows(
    teacher_ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, prefix: Sequence[int], max_length: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[Alignment]]:
    """Same tokenizer: the student input is the teacher row (its prefix included), cut cleanly at
    `max_length`; student position t is teacher position t for every kept text position."""
    rows, spans, alignments = [], [], []
    for b, length in enumerate(lengths.tolist()):
        ids, row_spans = teacher_ids[b, : int(length)], offsets[b, : int(length)].reshape(-1, 2)
        if length > 0 and ids[: len(prefix)].tolist() != list(prefix):
            raise ValueError(
                f"row {b}: the cached teacher row does not start with the tokenizer's prefix ids {list(prefix)}; "
                "the cache was made without them, make it again"
            )
        keep = find_clean_cut(row_spans, len(prefix), max_length) if length > 0 else 0
        kept = np.arange(min(len(prefix), keep), keep, dtype=np.int64)
        rows.append(ids[:keep])
        spans.append(row_spans[:keep])
        alignments.append(Alignment(kept, kept.copy(), num_student=keep, num_teacher=int(length)))
    return rows, spans, alignments


def _concat_pairs(alignments: Sequence[Alignment]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row alignments -> flat (A,) int64 index tensors (batch_idx, teacher_pos, student_pos)."""
    batch_idx = [np.full(a.num_aligned, b, dtype=np.int64) for b, a in enumerate(alignments)]
    teacher_pos = [a.teacher_pos for a in alignments]
    student_pos = [a.student_pos for a in alignments]
    empty = np.zeros(0, dtype=np.int64)
    return tuple(torch.from_numpy(np.concatenate(parts or [empty])) for parts in (batch_idx, teacher_pos, student_pos))


def align_batch(
    texts: Sequence[str],
    teacher_offsets: Any,
    teacher_lengths: Any,
    student_tokenizer: Any,
    max_length: int,
    *,
    teacher_input_ids: Any = None,
    same_tokenizer: bool = False,
    teacher_segments: Any = None,
) -> AlignedBatch:
    """Tokenize a batch of cached rows for the student and align it with the teacher positions.

    texts: B row texts; teacher_offsets: (B, L, 2); teacher_lengths: (B,); max_length: student
    context, counting its prefix tokens.
    same_tokenizer: the identity fast path (decide once with `is_same_tokenizer` or the cache
    manifest's tokenizer hash): the student reuses `teacher_input_ids` (B, L), prefix included,
    and text position t aligns with t; no re-tokenization.
    teacher_segments: (B, L) the `segment_ids` of packed rows ([packing note] in packing.py), or None;
    when a row holds several segments, each is read on its own and the batch carries `segment_ids`.
    """
    lengths = _to_numpy(teacher_lengths).astype(np.int64).reshape(-1)
    offsets = _to_numpy(teacher_offsets)
    prefix = check_tokenizer(student_tokenizer).prefix
    if max_length <= len(prefix):
        raise ValueError(f"max_length must be > {len(prefix)} (the student's prefix tokens), got {max_length}")
    if same_tokenizer and teacher_input_ids is None:
        raise ValueError("same_tokenizer=True needs teacher_input_ids (the cached `input_ids` field)")
    segment_ids, num_segments = None, [1] * len(lengths)
    if is_packed(teacher_segments):
        reused = _to_numpy(teacher_input_ids) if same_tokenizer else None
        rows, student_offsets, segments, text_positions = build_packed_student_rows(
            student_tokenizer, texts, reused, offsets, lengths, _to_numpy(teacher_segments), max_length
        )
        alignments = [
            Alignment(kept, kept.copy(), len(rows[b]), int(lengths[b]))
            if same_tokenizer
            else align_offsets(offsets[b], lengths[b], student_offsets[b])
            for b, kept in enumerate(text_positions)
        ]
        segment_ids = _pad_rows(segments, 0)[0]
        num_segments = [int(row.max(initial=-1)) + 1 for row in segments]
    elif same_tokenizer:
        rows, student_offsets, alignments = _reuse_teacher_rows(
            _to_numpy(teacher_input_ids), offsets, lengths, prefix, max_length
        )
    else:
        rows, student_offsets = tokenize_for_student(student_tokenizer, list(texts), max_length)
        alignments = [align_offsets(offsets[b], lengths[b], student_offsets[b]) for b in range(len(rows))]
    input_ids, attention_mask = _pad_rows(rows, _pad_id(student_tokenizer))
    batch_idx, teacher_pos, student_pos = _concat_pairs(alignments)
    text_positions = sum(max(a.num_student - len(prefix) * k, 0) for a, k in zip(alignments, num_segments))
    aligned_share = sum(a.num_aligned for a in alignments) / text_positions if text_positions else 0.0
    text_end = torch.tensor([int(spans[:, 1].max(initial=0)) for spans in student_offsets], dtype=torch.int64)
    return AlignedBatch(
        input_ids,
        attention_mask,
        batch_idx,
        teacher_pos,
        student_pos,
        aligned_share,
        list(student_offsets),
        num_prefix=len(prefix),
        text_end=text_end,
        segment_ids=segment_ids,
    )


# --- continuation-only rows -------------------------------------------------------------------


def segment_boundaries(spans: np.ndarray, segments: np.ndarray, context: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Per document segment of a row: the character where it starts in the row's text and where its prompt ends.

    spans: (n, 2) the row's real spans; segments: (n,) the segment of each position (zeros for one document);
    context: the prompt characters at the start of each segment ([prompt-context note] in data.py)."""
    count = max(int(segments.max(initial=0)) + 1, len(context))
    ends = np.array([spans[segments == k, 1].max(initial=0) for k in range(count)], dtype=np.int64)
    starts = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]]).astype(np.int64)
    prompt = np.zeros(count, dtype=np.int64)
    prompt[: len(context)] = np.asarray(context, dtype=np.int64)
    return starts, starts + prompt


def restrict_to_continuation(
    aligned: AlignedBatch,
    teacher_offsets: Any,
    teacher_lengths: Any,
    teacher_segments: Any,
    context_chars: Sequence[Sequence[int]],
) -> AlignedBatch:
    """The batch with targets on the continuations only: a pair, or a student label, whose position has consumed
    less than its document's prompt predicts prompt text, which the teacher was given, not the student's own
    writing ([prompt-context note] in data.py). Such positions stay in the input as context.

    A position counts as continuation when the text it consumed reaches the prompt's end: the position that has
    read exactly the prompt predicts the first continuation token. Prefix tokens (span (0, 0)) consumed nothing of
    their segment. Returns the pairs that are kept and ``target_mask`` (B, L_s) for the student's labels.
    """
    offsets = _to_numpy(teacher_offsets)
    lengths = _to_numpy(teacher_lengths).astype(np.int64).reshape(-1)
    segments = None if teacher_segments is None else _to_numpy(teacher_segments)
    batch_idx, teacher_pos = aligned.batch_idx.numpy(), aligned.teacher_pos.numpy()
    keep = np.ones(len(batch_idx), dtype=bool)
    target_mask = torch.ones(aligned.attention_mask.shape, dtype=torch.bool)
    for b, context in enumerate(context_chars):
        n = int(lengths[b])
        spans = offsets[b, :n].reshape(-1, 2).astype(np.int64)
        seg = np.zeros(n, dtype=np.int64) if segments is None else segments[b, :n].astype(np.int64)
        starts, bounds = segment_boundaries(spans, seg, context)
        pairs = np.flatnonzero(batch_idx == b)
        keep[pairs] = spans[teacher_pos[pairs], 1] >= bounds[seg[teacher_pos[pairs]]]
        student = aligned.student_offsets[b].astype(np.int64)
        m = len(student)
        s_seg = np.zeros(m, dtype=np.int64) if aligned.segment_ids is None else aligned.segment_ids[b, :m].numpy()
        s_seg = np.minimum(s_seg, len(starts) - 1)
        consumed = np.maximum(student[:, 1], starts[s_seg])
        target_mask[b, :m] = torch.from_numpy(consumed >= bounds[s_seg])
    kept = torch.from_numpy(keep)
    return dataclasses.replace(
        aligned,
        batch_idx=aligned.batch_idx[kept],
        teacher_pos=aligned.teacher_pos[kept],
        student_pos=aligned.student_pos[kept],
        target_mask=target_mask,
    )
