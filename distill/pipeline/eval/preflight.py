"""Will KD pay? The teacher against the student on a sample of stored rows, before any training.

Distillation can only move a student towards its teacher: where the teacher does not predict the text
better than the student already does (a pretrained student, a weak or off-domain teacher), KD fine-tuning
loses to plain fine-tuning. Both are scored in bits per byte on identical bytes of the same rows
([scored-bytes note] in eval/scores.py), the teacher from its cached ``target_logprob``, the student by one
forward pass; the interval of the difference resamples documents ([bootstrap note]).

    report = compare_teacher_and_student("cache/wt103", "HuggingFaceTB/SmolLM-135M", rows=32)
    print(describe_comparison(report))

``distill cache audit STORE --student DIR`` reports it; ``distill train`` runs it on ``preflight_rows`` rows
of the held-out store (else the training store) and warns in one line when the teacher is not clearly better.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from distill.cache.reader import CacheReader
from distill.pipeline.eval.evaluate import StudentSource, evaluate_student
from distill.pipeline.eval.scores import (
    bits_per_byte,
    bootstrap_bpb,
    percentile_interval,
    score_identical_bytes,
    sum_by_document,
    teacher_scores,
)


def spread_rows(row_ids: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``row_ids``, evenly spread (the first and the last included)."""
    if count <= 0 or not len(row_ids):
        return row_ids[:0]
    picks = np.unique(np.linspace(0, len(row_ids) - 1, min(count, len(row_ids))).round().astype(np.int64))
    return row_ids[picks]


PRACTICAL_ADVANTAGE = 1e-3
"""Bits per byte below which the teacher is not called better: a thousandth of a bit per byte is nothing KD could
exploit, and far above the rounding between two float paths through one model (the teacher as its own student:
its cached log-probabilities against its forward as a student differ by ~1e-6)."""


def compare_teacher_and_student(
    store: str, student: str, rows: int, vocab_map_dir: Path | None = None
) -> dict[str, Any]:
    """Bits per byte of the teacher and of ``student`` (a model folder or hub id) on ``rows`` rows of ``store``.

    Returns teacher_bpb, student_bpb, their intervals, ``advantage`` = student - teacher (bits per byte the
    teacher is better by) with its paired interval, and ``verdict``: "better" (the interval is above
    PRACTICAL_ADVANTAGE), "not better" (at or below it) or "unclear" (it holds it).
    """
    reader = CacheReader(store)
    picked = spread_rows(reader.row_ids, rows)
    texts, t_scores, documents = teacher_scores(reader, picked)
    with tempfile.TemporaryDirectory() as scratch:
        source = StudentSource(Path(student).name, Path(student), store, picked, None)
        _, s_scores = evaluate_student(source, vocab_map_dir or Path(scratch))
    nll, nbytes = score_identical_bytes(texts, [t_scores, s_scores])
    total = int(nbytes.sum())
    samples = bootstrap_bpb(sum_by_document(nll, documents, 1), sum_by_document(nbytes, documents, 0))
    advantage = percentile_interval(samples[:, 1] - samples[:, 0])
    floor = PRACTICAL_ADVANTAGE
    verdict = "better" if advantage[0] > floor else ("not better" if advantage[1] <= floor else "unclear")
    teacher, student_bpb = (bits_per_byte(float(nll[m].sum()), total) for m in (0, 1))
    return {
        "rows": int(len(picked)),
        "bytes": total,
        "teacher_bpb": teacher,
        "teacher_bpb_ci": list(percentile_interval(samples[:, 0])),
        "student_bpb": student_bpb,
        "student_bpb_ci": list(percentile_interval(samples[:, 1])),
        "advantage": student_bpb - teacher,
        "advantage_ci": list(advantage),
        "verdict": verdict,
    }


def describe_comparison(report: dict[str, Any]) -> str:
    """One line: both scores, the teacher's advantage and what it means for KD."""
    lo, hi = report["advantage_ci"]
    scores = (
        f"on {report['rows']} rows ({report['bytes']:,} bytes) the teacher scores {report['teacher_bpb']:.3f} "
        f"bits/byte, the student {report['student_bpb']:.3f}; the teacher is better by {report['advantage']:+.3f} "
        f"[{lo:+.3f}, {hi:+.3f}]"
    )
    if report["verdict"] == "better":
        return scores
    return (
        f"{scores}: the teacher is {report['verdict'] == 'unclear' and 'not clearly ' or 'not '}better than this "
        "student on this text, so KD can pull it towards a worse model; fine-tune with --objective ce, or use a "
        "stronger teacher or text where it is stronger"
    )
