"""``distill cache audit STORE --student DIR``: will this tokenizer pair distill well? Answered before training.

Per category of the teacher's actual next token (words, whitespace, digits, punctuation, code symbols,
multi-byte/CJK, special, other), over the store's positions that have a next token:

- where the teacher's probability at T = 1 goes on the student side: to a student token with the same
  bytes (``mass_exact``), to a shared-prefix bin only (``mass_prefix``, what `kd_mode=prefix` adds over
  `tail`), to no bin (``mass_unmapped``: top-K tokens without any shared prefix) or beyond the stored
  top-K (``mass_beyond_topk``); the four sum to 1. `kd_mode=tail` sends all but ``mass_exact`` to its tail bin;
- ``aligned_rate``: the share of teacher positions that a student position is aligned with (same text
  consumed), i.e. that get a kd target at all;
- ``next_without_student_token``: the share whose actual next teacher token has no student token with
  the same bytes;

and, whatever the tokenizers, ``teacher_vs_student``: both models' bits per byte on a sample of the rows and
whether the teacher is better at all (preflight.py): KD cannot lift a student above its teacher.

    report = audit_store("cache/wt103", "HuggingFaceTB/SmolLM-135M")
    print(format_audit(report))

Categories: categories.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.cache.reader import CacheReader
from distill.pipeline.eval.categories import CATEGORIES, categorize_token
from distill.pipeline.eval.preflight import compare_teacher_and_student, describe_comparison
from distill.pipeline.text.align import align_batch, list_token_keys
from distill.pipeline.text.packing import read_document_rows
from distill.pipeline.text.prefix_map import PrefixMap, build_prefix_map

AUDIT_ROWS = 256  # rows read at most (evenly spread over the store)
SCORE_ROWS = 32  # rows the teacher and the student are scored on (a forward pass of the student each)
_BATCH_ROWS = 16


def categorize_vocabulary(tokenizer: Any, size: int) -> np.ndarray:
    """(size,) int8 index into CATEGORIES of every token id (ids past the tokenizer: special)."""
    out = np.full(size, CATEGORIES.index("special"), dtype=np.int8)
    for token_id, key, _ in list_token_keys(tokenizer):
        if token_id < size:
            out[token_id] = CATEGORIES.index(categorize_token(key))
    return out


def split_mass(
    topk_ids: np.ndarray, topk_logits: np.ndarray, lse: np.ndarray, pmap: PrefixMap
) -> dict[str, np.ndarray]:
    """Teacher probability at T=1 per position: exact / prefix-only / unmapped top-K / beyond the top-K.

    topk_ids, topk_logits: (P, K); lse: (P,) at T = 1. Returns four (P,) arrays that sum to 1.
    """
    probs = np.exp(topk_logits.astype(np.float64) - lse.astype(np.float64)[:, None])  # (P, K)
    exact = pmap.exact[topk_ids] >= 0
    binned = pmap.teacher_bin[topk_ids] >= 0
    head = probs.sum(axis=1)
    return {
        "mass_exact": (probs * exact).sum(axis=1),
        "mass_prefix": (probs * (binned & ~exact)).sum(axis=1),
        "mass_unmapped": (probs * ~binned).sum(axis=1),
        "mass_beyond_topk": np.clip(1.0 - head, 0.0, 1.0),
    }


def collect_positions(reader: CacheReader, rows: np.ndarray, student_tokenizer: Any, pmap: PrefixMap) -> dict:
    """Per teacher position that has a next token: its next token id, mass split and whether it is aligned."""
    t_index = reader.temperature_index(1.0)
    parts: dict[str, list[np.ndarray]] = {}
    fields = ["input_ids", "length", "offsets", "text", "topk_ids", "topk_logits", "lse", "target_logprob"]
    for start in range(0, len(rows), _BATCH_ROWS):
        data = read_document_rows(reader, rows[start : start + _BATCH_ROWS], fields)  # packed: per document
        lengths = data["length"].numpy()
        aligned = align_batch(data["text"], data["offsets"].numpy(), lengths, student_tokenizer, max_length=1 << 30)
        is_aligned = np.zeros(data["input_ids"].shape, dtype=bool)
        is_aligned[aligned.batch_idx.numpy(), aligned.teacher_pos.numpy()] = True
        # positions with a next token: a finite target_logprob (NaN marks the last one and padding)
        scored = np.isfinite(data["target_logprob"].numpy())  # (B, L)
        scored[:, :-1] &= np.arange(1, scored.shape[1])[None, :] < lengths[:, None]
        scored[:, -1] = False
        rows_b, pos = np.nonzero(scored)
        mass = split_mass(
            data["topk_ids"].numpy()[rows_b, pos],
            data["topk_logits"].float().numpy()[rows_b, pos],
            data["lse"].numpy()[rows_b, pos, t_index],
            pmap,
        )
        new = {"next_id": data["input_ids"].numpy()[rows_b, pos + 1], "aligned": is_aligned[rows_b, pos], **mass}
        for name, values in new.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def summarize(positions: dict[str, np.ndarray], categories: np.ndarray, pmap: PrefixMap) -> dict[str, dict]:
    """Per category (and "all"): position count and share, mean mass split, aligned rate, next tokens unmatched."""
    category = categories[positions["next_id"]]
    total = len(category)
    out = {}
    for index, name in [*enumerate(CATEGORIES), (-1, "all")]:
        pick = category == index if index >= 0 else np.ones(total, dtype=bool)
        count = int(pick.sum())
        entry: dict[str, float | int | None] = {"positions": count, "share": count / total if total else 0.0}
        for key in ("mass_exact", "mass_prefix", "mass_unmapped", "mass_beyond_topk"):
            entry[key] = float(positions[key][pick].mean()) if count else None
        entry["aligned_rate"] = float(positions["aligned"][pick].mean()) if count else None
        entry["next_without_student_token"] = (
            float((pmap.exact[positions["next_id"][pick]] < 0).mean()) if count else None
        )
        out[name] = entry
    return out


def describe_vocabularies(pmap: PrefixMap, teacher_size: int) -> dict[str, int]:
    """How the two vocabularies meet: exact twins, prefix-only bins, unmapped tokens on each side."""
    exact = pmap.exact[:teacher_size] >= 0
    binned = pmap.teacher_bin[:teacher_size] >= 0
    student_own = pmap.student_bin >= 0
    shared_ids = set(pmap.exact[exact].tolist())
    student_exact = np.isin(np.arange(len(pmap.student_bin)), list(shared_ids))
    return {
        "teacher_tokens": int(teacher_size),
        "student_tokens": int(len(pmap.student_bin)),
        "teacher_exact": int(exact.sum()),
        "teacher_prefix_only": int((binned & ~exact).sum()),
        "teacher_unmapped": int((~binned).sum()),
        "student_exact": int(student_exact.sum()),
        "student_prefix_only": int((student_own & ~student_exact).sum()),
        "student_unmapped": int((~student_own).sum()),
    }


def audit_store(store: str, student: str, max_rows: int = AUDIT_ROWS, score_rows: int = SCORE_ROWS) -> dict[str, Any]:
    """The audit of `store` against the tokenizer of `student` (a model folder or hub id); see the module doc.
    With ``score_rows`` > 0 it also scores the teacher against the student itself (preflight.py)."""
    from transformers import AutoTokenizer

    reader = CacheReader(store)
    reader.require_fields(["topk_ids", "topk_logits", "lse", "target_logprob"], "needed by the audit")
    teacher_tokenizer = reader.load_tokenizer()
    student_tokenizer = AutoTokenizer.from_pretrained(student)
    teacher_size = int(reader.manifest["teacher"]["vocab_size"])
    pmap = build_prefix_map(teacher_tokenizer, student_tokenizer).padded(teacher_size, len(student_tokenizer))
    ids = reader.row_ids
    rows = ids[np.unique(np.linspace(0, len(ids) - 1, min(max_rows, len(ids))).round().astype(np.int64))]
    positions = collect_positions(reader, rows, student_tokenizer, pmap)
    return {
        "store": store,
        "student": student,
        "rows": int(len(rows)),
        "temperature": 1.0,
        "vocabulary": describe_vocabularies(pmap, len(teacher_tokenizer)),
        "categories": summarize(positions, categorize_vocabulary(teacher_tokenizer, teacher_size), pmap),
        "teacher_vs_student": compare_teacher_and_student(store, student, score_rows) if score_rows > 0 else None,
    }


def format_audit(report: dict[str, Any]) -> str:
    """The audit as a table for people."""
    vocab = report["vocabulary"]
    lines = [
        f"store    {report['store']} ({report['rows']} rows)",
        f"student  {report['student']}",
        f"teacher vocabulary {vocab['teacher_tokens']:,}: {vocab['teacher_exact']:,} exact, "
        f"{vocab['teacher_prefix_only']:,} by prefix only, {vocab['teacher_unmapped']:,} unmapped; "
        f"student {vocab['student_tokens']:,}: {vocab['student_exact']:,} exact, "
        f"{vocab['student_prefix_only']:,} by prefix only, {vocab['student_unmapped']:,} unmapped",
        "teacher mass at T=1 by the category of its actual next token (shares of positions; mass columns sum to 1)",
        f"{'category':<12} {'positions':>9} {'share':>6} {'exact':>6} {'prefix':>6} {'unmapd':>6} {'>topK':>6} "
        f"{'aligned':>7} {'next∉S':>6}",
    ]
    for name, entry in report["categories"].items():
        if not entry["positions"] and name != "all":
            continue
        cells = [entry[k] for k in ("mass_exact", "mass_prefix", "mass_unmapped", "mass_beyond_topk", "aligned_rate")]
        cells.append(entry["next_without_student_token"])
        text = " ".join(f"{c:>6.3f}" if c is not None else f"{'-':>6}" for c in cells[:4])
        lines.append(
            f"{name:<12} {entry['positions']:>9,} {entry['share']:>6.3f} {text} "
            + (f"{cells[4]:>7.3f} {cells[5]:>6.3f}" if entry["positions"] else f"{'-':>7} {'-':>6}")
        )
    if report.get("teacher_vs_student"):
        lines.append(f"will KD pay? {describe_comparison(report['teacher_vs_student'])}")
    return "\n".join(lines)
