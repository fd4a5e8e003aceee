"""Packing several documents into one row, and the document boundaries that every stage respects.

    from distill.pipeline.text.packing import pack_pieces, find_segments, segment_position_ids
    rows = pack_pieces(piece_sizes, seq_len)               # (P,) row of each document piece, first fit
    segments = find_segments(segment_ids[:n], offsets[:n])  # [Segment(token_start, token_end, char_start, char_end)]
    position_ids = segment_position_ids(segment_ids)        # (B, L) positions restarting at 0 per document

[packing note] With ``packing: greedy`` a row holds several *segments*, each one piece of one document
exactly as an unpacked row would hold it: the tokenizer's prefix (its BOS, [input-as-trained note] in
tokens.py) then at most seq_len - len(prefix) of the document's text tokens. The row's ``text`` is the
segments' texts laid end to end and ``offsets`` index that concatenation, so segment s covers
``text[char_start:char_end]`` and its prefix tokens keep the span (0, 0). The per-position
``segment_ids`` field (0, 1, ... within the row) records the boundaries. Nothing crosses one:

- the teacher and the student run each row with position ids restarting at 0 per segment and no 2D
  attention mask; transformers then builds a block-diagonal causal mask from the position ids
  (``find_packed_sequence_indices`` in masking_utils: a new sequence starts wherever the position does
  not grow by one), for its sdpa, eager and flash paths and for sliding-window layers alike, so each
  segment sees only itself, exactly as if it were cached alone;
- no next-token target crosses a boundary: ``target_logprob`` is NaN at each segment's last position and
  the student's lm labels there are ignored (``next_in_segment``);
- alignment pairs positions whose tokens consumed the same text prefix; segments occupy disjoint
  character ranges of ``text`` and the student tokenizes each segment on its own, so a pair never spans
  two segments (align.py), and every loss term reads aligned pairs or in-segment labels only (ALM's chunks
  join consecutive pairs of one segment only, ``find_chunks`` in losses/cross_tokenizer.py);
- eval scores each segment as a row of its own (``split_segments``): its first token is unpredicted
  unless its prefix predicts it, as for any row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.pipeline.text.tokens import check_tokenizer, encode_texts, find_clean_cut

PACKING_MODES = ("none", "greedy")
PACK_WINDOW = 256  # open rows first fit searches; older ones are closed (bounds the planning cost)


def pack_pieces(sizes: np.ndarray, seq_len: int, window: int = PACK_WINDOW) -> np.ndarray:
    """First-fit packing of pieces of ``sizes`` tokens (prefix included, each <= seq_len) into rows of seq_len.

    Each piece, in order, goes to the first of the last ``window`` rows opened that still has room for it,
    else opens a new row. Returns (P,) int64 the row of each piece, rows numbered in the order they were
    opened; the pieces of a row keep their input order. Deterministic.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if (sizes > seq_len).any() or (sizes < 1).any():
        raise ValueError(f"piece sizes must be in [1, {seq_len}]")
    rows = np.empty(len(sizes), dtype=np.int64)
    room = np.empty(0, dtype=np.int64)  # (W,) free tokens of the open rows, oldest first
    first_open = 0  # row index of room[0]
    for i, size in enumerate(sizes.tolist()):
        fits = np.flatnonzero(room >= size)
        if fits.size:
            slot = int(fits[0])
            room[slot] -= size
            rows[i] = first_open + slot
            continue
        room = np.append(room, seq_len - size)
        rows[i] = first_open + len(room) - 1
        if len(room) > window:
            room, first_open = room[1:], first_open + 1
    return rows


@dataclass(frozen=True)
class Segment:
    """One document piece of a row: tokens [token_start, token_end) of the row, text[char_start:char_end]."""

    token_start: int
    token_end: int
    char_start: int
    char_end: int


def find_segments(segment_ids: Any, offsets: Any) -> list[Segment]:
    """The segments of one row from its (n,) segment ids and (n, 2) offsets (real positions only).

    Segment ids are 0, 1, ... in order. A segment's text follows the previous one's and ends where its
    last token ends (tokens consume their text entirely); a segment of prefix tokens only has no text.
    """
    segment_ids = np.asarray(segment_ids, dtype=np.int64).reshape(-1)
    ends = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]
    if segment_ids.size == 0:
        return []
    starts = np.flatnonzero(np.diff(segment_ids, prepend=segment_ids[0] - 1))
    bounds = np.append(starts, segment_ids.size)
    segments, char_start = [], 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        char_end = max(char_start, int(ends[a:b].max()))
        segments.append(Segment(a, b, char_start, char_end))
        char_start = char_end
    return segments


def segment_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, L) int64 position ids that restart at 0 where the segment id changes.

    Padding positions continue the last segment (they are never read, and a causal query never sees them).
    """
    index = torch.arange(segment_ids.shape[-1], device=segment_ids.device).expand_as(segment_ids)
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    starts = torch.where(change, index, torch.zeros_like(index)).cummax(dim=-1).values
    return (index - starts).long()


def next_in_segment(segment_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position t has a next token t + 1 that is real and in the same segment."""
    width = segment_ids.shape[-1]
    positions = torch.arange(width, device=segment_ids.device)[None, :]
    same = torch.zeros_like(segment_ids, dtype=torch.bool)
    same[:, :-1] = segment_ids[:, 1:] == segment_ids[:, :-1]
    return same & (positions < lengths[:, None].to(segment_ids.device) - 1)


def build_segment_ids(sizes: list[int]) -> np.ndarray:
    """Segments of ``sizes`` tokens laid end to end -> (sum,) int64 segment id of each position."""
    return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)


def shift_spans(spans: np.ndarray, char_start: int) -> np.ndarray:
    """(n, 2) spans in a segment's own text -> spans in the row's text; (0, 0) (consumes nothing) stays."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return np.where(spans[:, 1:] > 0, spans + char_start, 0)


def is_packed(segment_ids: Any) -> bool:
    """True when some row of a (B, L) segment-id array holds more than one segment."""
    if segment_ids is None:
        return False
    array = segment_ids if isinstance(segment_ids, torch.Tensor) else torch.as_tensor(np.asarray(segment_ids))
    return bool((array != 0).any())


def split_segments(data: dict[str, Any], seq_len: int) -> tuple[dict[str, Any], np.ndarray]:
    """Rows read from a packed store -> one row per segment, in the same format (what eval scores).

    data: ``CacheReader.read_rows`` output holding ``segment_ids``, ``length``, ``offsets`` and ``text``;
    every (B, L, ...) field is cut per segment and padded back to seq_len (``target_logprob`` with NaN,
    which a segment's last position already holds; others with 0), ``offsets`` are made relative to the
    segment's text, ``attn_ids/<l>`` relative to its first position; (B,) fields are repeated.
    Returns the per-segment data (``segment_ids`` all 0) and (S,) int64 the row index of each segment.
    """
    lengths = data["length"].tolist()
    parts: list[tuple[int, Segment]] = []
    for b, n in enumerate(lengths):
        segs = find_segments(data["segment_ids"][b, :n].numpy(), data["offsets"][b, :n].numpy())
        parts += [(b, s) for s in segs]
    source = np.asarray([b for b, _ in parts], dtype=np.int64)
    out: dict[str, Any] = {}
    for name, value in data.items():
        if value is None:  # a field this store's kind does not have (target_multiplier of a top-K head)
            out[name] = None
        elif name == "text":
            out[name] = [value[b][s.char_start : s.char_end] for b, s in parts]
        elif name == "length":
            out[name] = torch.tensor([s.token_end - s.token_start for _, s in parts], dtype=torch.int64)
        elif isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
            out[name] = torch.stack([cut_segment(name, value[b], s, seq_len) for b, s in parts]) if parts else value[:0]
        elif isinstance(value, torch.Tensor):
            out[name] = value[torch.from_numpy(source)]
        else:
            out[name] = [value[b] for b in source.tolist()]
    return out, source


def cut_segment(name: str, row: torch.Tensor, s: Segment, seq_len: int) -> torch.Tensor:
    """(L, ...) one row's field -> (L, ...) the segment's positions first, padded as the store pads."""
    piece = row[s.token_start : s.token_end].clone()
    if name == "offsets":
        piece = torch.where(piece[:, 1:] > 0, piece - s.char_start, torch.zeros_like(piece))
    elif name == "segment_ids":
        piece = torch.zeros_like(piece)
    elif name.startswith("attn_ids/"):
        piece = (piece - s.token_start).clamp_min(0)
    fill = float("nan") if name == "target_logprob" else 0
    padded = torch.full((seq_len, *row.shape[1:]), fill, dtype=row.dtype)
    padded[: piece.shape[0]] = piece
    return padded


# --- the student's packed rows -----------------------------------------------------------------------


def pack_student_segments(
    pieces: list[tuple[np.ndarray, np.ndarray]], prefix: tuple[int, ...], max_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One packed student row from its segments' text tokens: (ids (m,), spans (m, 2) in the row's text) each.

    Each segment gets `prefix` first; the row stops at `max_length`, cutting the segment that reaches it at
    a clean end ([clean-end note] in align.py) and dropping it if none of its tokens fits. Returns ids (N,),
    spans (N, 2), segment ids (N,) and the positions of text tokens (the prefixes left out), all int64.
    """
    ids, spans, segments, text_positions = [], [], [], []
    used = 0
    for s, (piece_ids, piece_spans) in enumerate(pieces):
        room = max_length - used - len(prefix)
        keep = find_clean_cut(piece_spans, 0, room) if room > 0 else 0
        if keep == 0:
            break
        ids += [np.asarray(prefix, dtype=np.int64), np.asarray(piece_ids[:keep], dtype=np.int64)]
        spans += [np.zeros((len(prefix), 2), dtype=np.int64), piece_spans[:keep]]
        segments.append(np.full(len(prefix) + keep, s, dtype=np.int64))
        text_positions.append(np.arange(used + len(prefix), used + len(prefix) + keep, dtype=np.int64))
        used += len(prefix) + keep
        if keep < len(piece_ids):
            break
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.concatenate(ids or [empty]),
        np.concatenate(spans or [empty.reshape(0, 2)]).reshape(-1, 2),
        np.concatenate(segments or [empty]),
        np.concatenate(text_positions or [empty]),
    )


def build_packed_student_rows(
    student_tokenizer: Any,
    texts: list[str],
    teacher_ids: np.ndarray | None,
    offsets: np.ndarray,
    lengths: np.ndarray,
    teacher_segments: np.ndarray,
    max_length: int,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The student's rows of packed teacher rows, segment by segment ([packing note]).

    texts: B row texts; offsets (B, L, 2), lengths (B,), teacher_segments (B, L) as stored. teacher_ids
    None: the student reads each segment's text with its own tokenizer; else (B, L) the cached ids, which a
    student with the teacher's tokenizer reuses segment by segment. Returns per row ids (N,), spans (N, 2)
    in the row's text, segment ids (N,) and the positions of its text tokens (N',).
    """
    prefix = check_tokenizer(student_tokenizer).prefix
    rows_segments = [
        find_segments(teacher_segments[b, : int(n)], offsets[b, : int(n)]) for b, n in enumerate(lengths.tolist())
    ]
    if teacher_ids is None:
        seg_texts = [texts[b][s.char_start : s.char_end] for b, segs in enumerate(rows_segments) for s in segs]
        encoded = iter(encode_texts(student_tokenizer, seg_texts))
    out: tuple[list, list, list, list] = ([], [], [], [])
    for b, segs in enumerate(rows_segments):
        pieces = []
        for s in segs:
            if teacher_ids is None:
                piece_ids, piece_spans = next(encoded)
                pieces.append((piece_ids, shift_spans(piece_spans, s.char_start)))
                continue
            if teacher_ids[b, s.token_start : s.token_start + len(prefix)].tolist() != list(prefix):
                raise ValueError(
                    f"row {b}: a cached segment does not start with the tokenizer's prefix ids {list(prefix)}; "
                    "the cache was made without them, make it again"
                )
            text = slice(s.token_start + len(prefix), s.token_end)
            pieces.append((teacher_ids[b, text], offsets[b, text].reshape(-1, 2)))
        for part, value in zip(out, pack_student_segments(pieces, prefix, max_length)):
            part.append(value)
    return out


def check_packed_forward(model: Any, name: str, num_tokens: int = 8) -> None:
    """Refuse a model whose forward lets packed documents see each other ([packing note]).

    Two random documents packed in one row (position ids restarting, no 2D mask) must give the second one
    the last hidden states it has alone; a model whose attention ignores the position ids (remote code that
    does not build its mask with transformers' masking_utils) fails this, and packing would leak.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    weight = model.get_input_embeddings().weight
    ids = torch.randint(weight.shape[0], (1, 2 * num_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(weight.device)
    positions = torch.arange(num_tokens, device=weight.device).repeat(2)[None]
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            alone = base(input_ids=ids[:, num_tokens:], use_cache=False).last_hidden_state[0].float()
            packed = base(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0].float()
    finally:
        model.train(training)
    error = (packed[num_tokens:] - alone).abs().max().item()
    tolerance = (1e-4 if weight.dtype == torch.float32 else 3e-2) * (1.0 + alone.abs().max().item())
    if not error <= tolerance:
        raise ValueError(
            f"{name}: its forward does not keep packed documents apart (a document's hidden states change by "
            f"{error:.3g} when another is packed before it); use a store made with --packing none"
        )


def read_document_rows(reader: Any, rows: np.ndarray, fields: list[str]) -> dict[str, Any]:
    """``reader.read_rows`` (a CacheReader); for a packed store, one row per document segment, so that nothing a
    caller computes along a row (alignment, scores, next tokens) crosses a document boundary ([packed-eval note]
    in evaluate.py)."""
    if not reader.packed:
        return reader.read_rows(rows, fields)
    data, _ = split_segments(reader.read_rows(rows, [*fields, "segment_ids"]), reader.layout["seq_len"])
    return data
