"""Bits per byte per text category for `distill eval`, every model scored on identical bytes.

[category-bytes note] Within a row's scored range every model has a boundary at each character where
*all* of them have one (the common boundaries, whose first and last delimit the range, see [scored-bytes
note] in eval/scores.py). Between two consecutive common boundaries lies a segment that every model predicts
exactly, token for token, given the same text before it; its NLL is read from each model's cumulative NLL.
Each segment is filed under the category of its text (categories.py: usually one word with its leading
space, one punctuation mark, one whitespace run; a segment where the tokenizations disagree on a boundary
inside, such as ``"),"``, is filed as a whole), so the categories partition the scored bytes and their NLLs
add up to each model's total.

    nll, nbytes = score_categories(texts, scores)        # (M, R, C) nats, (R, C) bytes
    table = summarize_categories(nll, nbytes, ["teacher", "kd"])  # {category: {"bytes", "bpb": {model: v}, ...}}
"""

from __future__ import annotations

from functools import reduce
from typing import Any

import numpy as np

from distill.pipeline.eval.categories import CATEGORIES, categorize_bytes


def score_categories(texts: list[str], scores: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per model, row and category: NLL (nats) and bytes of the segments between common boundaries.

    texts: R row texts; scores: M `RowScores` (``ends``: per row the model's boundaries, ``cum_nll``: its
    cumulative NLL at each). Returns (nll (M, R, C) float64, nbytes (R, C) int64), C = len(CATEGORIES).
    """
    nll = np.zeros((len(scores), len(texts), len(CATEGORIES)))
    nbytes = np.zeros((len(texts), len(CATEGORIES)), dtype=np.int64)
    for r, text in enumerate(texts):
        common = reduce(np.intersect1d, [s.ends[r] for s in scores])
        if common.size < 2:
            continue
        cum = np.stack([s.cum_nll[r][np.searchsorted(s.ends[r], common)] for s in scores])  # (M, P)
        segment_nll = np.diff(cum, axis=1)  # (M, P - 1)
        for i, (start, end) in enumerate(zip(common[:-1].tolist(), common[1:].tolist())):
            data = text[start:end].encode("utf-8")
            c = CATEGORIES.index(categorize_bytes(data))
            nbytes[r, c] += len(data)
            nll[:, r, c] += segment_nll[:, i]
    return nll, nbytes


def summarize_categories(
    nll: np.ndarray,
    nbytes: np.ndarray,
    names: list[str],
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Bits per byte of each model per category, with percentile bootstrap intervals over the R units.

    nll: (M, R, C); nbytes: (R, C), per row or per document (``distill eval``: documents, [bootstrap note] in
    eval/scores.py); names: the M model names. Returns, for the categories that hold any byte,
    {category: {"bytes": int, "bpb": {model: float}, "bpb_ci": {model: [lo, hi] or None}}}.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, nbytes.shape[0], (resamples, nbytes.shape[0]))  # (S, R) unit resamples
    tail = 100 * (1 - confidence) / 2
    out = {}
    for c, name in enumerate(CATEGORIES):
        total = int(nbytes[:, c].sum())
        if total == 0:
            continue
        bpb = nll[:, :, c].sum(axis=1) / (np.log(2) * total)  # (M,)
        sample_bytes = nbytes[picks, c].sum(axis=1)  # (S,)
        sample_nll = nll[:, picks, c].sum(axis=2)  # (M, S)
        with np.errstate(invalid="ignore", divide="ignore"):
            samples = sample_nll / (np.log(2) * sample_bytes)
        ci = [
            [float(v) for v in np.percentile(row[np.isfinite(row)], [tail, 100 - tail])]
            if np.isfinite(row).any()
            else None
            for row in samples
        ]
        out[name] = {
            "bytes": total,
            "bpb": {model: float(v) for model, v in zip(names, bpb)},
            "bpb_ci": dict(zip(names, ci)),
        }
    return out


def format_category_table(categories: dict[str, dict[str, Any]]) -> list[str]:
    """report.md lines: one row per model (the teacher first), one column per category, bits per byte."""
    present = list(categories)
    names = list(categories[present[0]]["bpb"]) if present else []
    lines = [
        "",
        "Bits per byte per category of text (identical bytes for every model, [category-bytes note] in "
        "eval/category_scores.py):",
        "",
        "| model | " + " | ".join(f"{c} ({categories[c]['bytes']:,} B)" for c in present) + " |",
        "|---|" + "---:|" * len(present),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{categories[c]['bpb'][name]:.3f}" for c in present) + " |")
    return lines
