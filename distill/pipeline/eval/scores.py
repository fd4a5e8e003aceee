"""The scores of ``distill eval``: bits per byte on identical bytes, bootstrap intervals, calibration, gap closed.

Pure functions on per-row NLLs and boundaries (numpy), plus ``teacher_scores``, which reads the teacher's
cached ``target_logprob``; evaluate.py runs the students and writes the report.

[scored-bytes note] Bits per byte = total NLL in nats / (ln 2 x UTF-8 bytes of the scored
text), and every model of a report (the teacher and each student) is scored on identical
bytes. A model can score text from a *boundary* on: a character position c where its tokens
so far consumed exactly ``text[:c]`` (a clean end, see align's [clean-end note]; a model whose
tokenizer puts a prefix such as ``<bos>`` before the text also has c = 0, a model without one
cannot predict its first token). Per row, the scored range is [first, last] of the boundaries
that every model has among the tokens it reads: it starts at or after the end of the first
token of each model without a prefix (at 0 when all have one) and ends where the shortest
context stops (a student cut at its context is scored only on what it predicted; the cut
token's end counts only if the next, dropped token starts at or after it). Each model's NLL
is the sum over its tokens inside the range; the bytes are those of ``text[start:end]``. A row
where fewer than two boundaries are shared scores nothing. Adding a model to a report can
shrink the range of the others (a few bytes per row).

[bootstrap note] Intervals resample documents with replacement (fixed seed, 1,000 resamples), the
same documents for every model in a resample, and recompute each bits per byte as a ratio of sums
and gap closed from them; the interval is the 2.5th-97.5th percentile. Resamples where the
teacher is not better than the baseline leave gap closed undefined and are left out of its interval.
The unit is the document, not the row, because a document longer than a row spans several rows whose
scores move together: resampling rows would count them as independent and give too narrow intervals.
Rows are grouped by the stored ``doc_id`` (``sum_by_document``). A packed row stores only its first
segment's document, so its later segments stay with that one (units coarser than documents, still
independent of each other), except that a long document's last piece packed after another document
is not joined to its earlier rows (the store does not say whose piece it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Any

import numpy as np

from distill.cache.reader import CacheReader
from distill.pipeline.text.align import find_clean_ends
from distill.pipeline.text.packing import read_document_rows

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass
class RowScores:
    """Where one model can start and stop being scored in each row, and its NLL up to there.

    ends[r]: (P_r,) int64 boundaries of row r (character positions, strictly increasing), see
    [scored-bytes note]; cum_nll[r]: (P_r,) float64, NLL in nats of the model's tokens from the
    start of the row up to each boundary. NLL of the text between two boundaries = difference.
    """

    ends: list[np.ndarray]
    cum_nll: list[np.ndarray]


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """[scored-bytes note] total NLL in nats / (ln 2 x bytes)."""
    return nll_nats / (math.log(2) * num_bytes) if num_bytes else float("nan")


# --- identical bytes ----------------------------------------------------------------------------


def find_boundaries(spans: Any, kept: int) -> tuple[np.ndarray, np.ndarray]:
    """The boundaries of one model's row among the first ``kept`` positions it reads, see [scored-bytes note].

    spans: (N, 2) character spans of every position of the model's sequence, N >= kept: the
    prefix first as (0, 0), then its text tokens, through the end of the row even where the
    model reads only ``kept`` of them (a cut token is clean only if the next one starts after it).
    Returns (positions (P,), ends (P,)), int64: after position p the model consumed text[:end];
    a prefix gives (last prefix position, 0).
    """
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    positions, ends = find_clean_ends(spans, spans.shape[0])
    inside = positions < kept
    positions, ends = positions[inside], ends[inside]
    text_tokens = np.flatnonzero((spans != 0).any(axis=1))
    prefix = min(int(text_tokens[0]) if text_tokens.size else spans.shape[0], kept)
    if prefix:
        positions = np.concatenate([[prefix - 1], positions]).astype(np.int64)
        ends = np.concatenate([[0], ends]).astype(np.int64)
    return positions, ends


def find_scored_range(ends: list[np.ndarray]) -> tuple[int, int] | None:
    """(start, end) characters of a row that every model scores: the first and last shared boundary."""
    common = reduce(np.intersect1d, ends)
    return (int(common[0]), int(common[-1])) if common.size >= 2 else None


def score_row(spans: Any, kept: int, token_nll: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries of a row (see ``find_boundaries``) and the cumulative NLL at each.

    token_nll: (kept - 1,) NLL of the tokens at positions 1..kept-1 (position 0 is never predicted).
    Returns (ends (P,) int64, cum_nll (P,) float64).
    """
    positions, ends = find_boundaries(spans, kept)
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(token_nll, dtype=np.float64))])  # (kept,): tokens 1..p
    return ends, cum[positions]


def nll_between(ends: np.ndarray, cum_nll: np.ndarray, start: int, end: int) -> float:
    """NLL of a model's tokens covering text[start:end]; start and end are boundaries of that model."""
    return float(cum_nll[np.searchsorted(ends, end)] - cum_nll[np.searchsorted(ends, start)])


def build_student_spans(ids: np.ndarray, offsets: Any, prefix: list[int]) -> np.ndarray:
    """(N, 2) spans of every position of a student row: its prefix (when the row starts with it) as (0, 0).

    ids: (N,) the row as the model reads it; offsets: the spans align_batch gave, for its text
    tokens only or for every position (both are accepted).
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n = len(ids)
    k = len(prefix) if prefix and np.asarray(ids[: len(prefix)]).tolist() == prefix else 0
    if offsets.shape[0] == n:
        text = offsets[k:]
    elif offsets.shape[0] == n - k:
        text = offsets
    else:
        raise ValueError(f"{offsets.shape[0]} student offsets for a row of {n} positions (prefix {k})")
    return np.concatenate([np.zeros((k, 2), dtype=np.int64), text])


def teacher_scores(
    reader: CacheReader, rows: np.ndarray, batch_size: int = 64
) -> tuple[list[str], RowScores, np.ndarray]:
    """Row texts, the teacher's boundaries and cumulative NLL (from the cached ``target_logprob``), and the (R,)
    int64 stored ``doc_id`` of each row (of a packed row's segments: the row's first document, [bootstrap note])."""
    texts, scores, documents = [], RowScores([], []), []
    for start in range(0, len(rows), batch_size):
        data = read_document_rows(
            reader, rows[start : start + batch_size], ["target_logprob", "length", "offsets", "text", "doc_id"]
        )
        documents.append(data["doc_id"].numpy())
        for i, text in enumerate(data["text"]):
            n = int(data["length"][i])
            token_nll = -data["target_logprob"][i, : max(n - 1, 0)].double().numpy()  # position q predicts q + 1
            ends, cum = score_row(data["offsets"][i, :n].numpy(), n, token_nll)
            texts.append(text)
            scores.ends.append(ends)
            scores.cum_nll.append(cum)
    return texts, scores, np.concatenate(documents or [np.zeros(0, dtype=np.int64)]).astype(np.int64)


def score_identical_bytes(texts: list[str], scores: list[RowScores]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, every model's NLL over the shared scored range and its bytes, see [scored-bytes note].

    Returns (nll (M, R) float64 nats, bytes (R,) int64); a row without a shared range counts 0 and 0.
    """
    nll = np.zeros((len(scores), len(texts)))
    nbytes = np.zeros(len(texts), dtype=np.int64)
    for r, text in enumerate(texts):
        span = find_scored_range([s.ends[r] for s in scores])
        if span is None:
            continue
        nbytes[r] = len(text[span[0] : span[1]].encode("utf-8"))
        for m, s in enumerate(scores):
            nll[m, r] = nll_between(s.ends[r], s.cum_nll[r], *span)
    return nll, nbytes


# --- intervals ----------------------------------------------------------------------------------


def sum_by_document(values: np.ndarray, documents: np.ndarray, axis: int) -> np.ndarray:
    """[bootstrap note] ``values`` per row along ``axis`` (R rows) -> summed per document (D distinct ids, sorted)."""
    _, index = np.unique(documents, return_inverse=True)
    moved = np.moveaxis(values, axis, 0)
    out = np.zeros((int(index.max(initial=-1)) + 1, *moved.shape[1:]), dtype=values.dtype)
    np.add.at(out, index, moved)
    return np.moveaxis(out, 0, axis)


def bootstrap_bpb(
    nll: np.ndarray, nbytes: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """[bootstrap note] (M, U) NLL per model and unit, (U,) bytes -> (resamples, M) bits per byte of unit resamples.

    The units are what is resampled: documents (``sum_by_document``) in ``distill eval``."""
    rng = np.random.default_rng(seed)
    units = nbytes.shape[0]
    samples = np.empty((resamples, nll.shape[0]))
    for i in range(resamples):
        pick = rng.integers(0, units, units)
        with np.errstate(invalid="ignore", divide="ignore"):
            samples[i] = nll[:, pick].sum(axis=1) / (math.log(2) * nbytes[pick].sum())
    return samples


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` interval of the finite samples, (nan, nan) if none is finite."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins |accuracy - mean confidence| weighted by the share of predictions in the bin."""
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def gap_closed(student_bpb: float, baseline_bpb: float, teacher_bpb: float) -> float:
    """(baseline - student) / (baseline - teacher): 1 = as good as the teacher, 0 = no better than the baseline."""
    gap = baseline_bpb - teacher_bpb
    return (baseline_bpb - student_bpb) / gap if gap > 0 else float("nan")
