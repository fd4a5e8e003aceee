"""Two real tokenizers on real English text: how many tokens each makes, and how much of one the other covers.

    .venv/bin/python bench/tokenizer_pair.py                   # the reference pair: Qwen3 -> SmolLM2
    .venv/bin/python bench/tokenizer_pair.py --teacher ~/.cache/distill-real/gemma3-270m

Defaults are the real assets of the `real` test tier (``python -m tests.real.assets`` fetches them into
``$DISTILL_REAL_CACHE``): the real Qwen3 tokenizer (the reference teacher's, 151,669 tokens) as the teacher,
SmolLM2-135M's (49,152; SmolLM-135M's vocabulary) as the student. The text is CPython's ``pydoc_data``
topics (the Python reference documentation ``help()`` shows: English prose with code; the real tier's
text, see tests/real/assets.py), every topic, tokenized without special tokens.

Figures (last line, JSON):
- ``student_tokens_per_teacher_token``: what a stage-2 step (student tokens) costs against the teacher's
  forward (teacher tokens), see docs/benchmarks.md "Token ratio".
- ``bytes_per_token`` of each.
- ``shared_ends``: the share of the student's token ends (byte positions) that are also teacher token ends,
  i.e. positions where the two sequences can be aligned one to one.
- ``vocab_mapped``: the share of the teacher's vocabulary with an exact student token (same bytes,
  ``distill.pipeline.text.align.build_vocab_map``); ``text_tokens_mapped``: the share of the teacher's tokens in
  the text that have one (where the stored top-K can land on a student token at all).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, offline_env  # noqa: E402


def real_cache() -> Path:
    return Path(os.environ.get("DISTILL_REAL_CACHE", "~/.cache/distill-real")).expanduser()


def load_texts() -> list[str]:
    """Every ``pydoc_data`` topic, in name order (the whole text the real tier splits into train/validation)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """(V,) bytes each vocabulary entry stands for (-1 for special tokens), from the alignment's own reading."""
    from distill.pipeline.text.align import list_token_keys

    entries = list_token_keys(tokenizer)
    lengths = np.full(max(token_id for token_id, _, _ in entries) + 1, -1, dtype=np.int64)
    for token_id, (kind, value), _ in entries:
        if kind == "bytes":
            lengths[token_id] = len(value)
    return lengths


def tokenize_texts(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids, without special tokens (the text's own tokens: a BOS is a constant per row)."""
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def measure(teacher_dir: Path, student_dir: Path, texts: list[str]) -> dict[str, Any]:
    """Token counts, bytes per token, shared token ends and vocabulary coverage of the pair on ``texts``."""
    from transformers import AutoTokenizer

    from distill.pipeline.text.align import build_vocab_map

    teacher = AutoTokenizer.from_pretrained(teacher_dir)
    student = AutoTokenizer.from_pretrained(student_dir)
    text_bytes = [len(text.encode("utf-8")) for text in texts]
    teacher_ids = tokenize_texts(teacher, texts)
    student_ids = tokenize_texts(student, texts)
    teacher_lengths, student_lengths = token_byte_lengths(teacher), token_byte_lengths(student)
    shared = student_ends = 0
    reproduced = True
    for n, t_ids, s_ids in zip(text_bytes, teacher_ids, student_ids):
        t_ends = np.cumsum(teacher_lengths[t_ids])
        s_ends = np.cumsum(student_lengths[s_ids])
        # The ends are only byte positions of the text when the tokens' bytes spell it exactly.
        reproduced &= bool(len(t_ends) and len(s_ends) and t_ends[-1] == n and s_ends[-1] == n)
        shared += int(np.isin(s_ends, t_ends).sum())
        student_ends += len(s_ends)
    started = time.perf_counter()
    vocab_map = build_vocab_map(teacher, student)
    map_s = time.perf_counter() - started
    all_teacher = np.concatenate(teacher_ids)
    n_teacher, n_student = len(all_teacher), sum(len(ids) for ids in student_ids)
    return {
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "documents": len(texts),
        "bytes": sum(text_bytes),
        "teacher_tokens": n_teacher,
        "student_tokens": n_student,
        "student_tokens_per_teacher_token": round(n_student / n_teacher, 4),
        "bytes_per_token": {
            "teacher": round(sum(text_bytes) / n_teacher, 3),
            "student": round(sum(text_bytes) / n_student, 3),
        },
        "tokens_reproduce_text": reproduced,
        "shared_ends": round(shared / student_ends, 4) if reproduced else None,
        "vocab_size": {"teacher": len(teacher), "student": len(student)},
        "vocab_mapped_tokens": int((vocab_map >= 0).sum()),
        "vocab_mapped": round(float((vocab_map >= 0).mean()), 4),
        "text_tokens_mapped": round(float((vocab_map[all_teacher] >= 0).mean()), 4),
        "vocab_map_s": round(map_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=real_cache() / "qwen3-tokenizer", help="tokenizer folder")
    parser.add_argument("--student", type=Path, default=real_cache() / "smollm2-135m", help="tokenizer folder")
    args = parser.parse_args()
    offline_env()
    for folder in (args.teacher, args.student):
        if not folder.is_dir():
            sys.exit(f"{folder} is missing: fetch the real assets with `python -m tests.real.assets`")
    result = measure(args.teacher, args.student, load_texts())
    print(f"tokenizers on CPython's pydoc topics ({result['documents']} documents, {result['bytes']:,} bytes)")
    for side in ("teacher", "student"):
        name = getattr(args, side).name
        print(f"  {side} {name}: {result[f'{side}_tokens']:,} tokens, {result['bytes_per_token'][side]} B/token")
    print(
        f"  {result['student_tokens_per_teacher_token']} student tokens per teacher token; "
        f"{result['shared_ends']} of the student's token ends are teacher token ends"
    )
    print(
        f"  teacher vocabulary with an exact student token: {result['vocab_mapped_tokens']:,} "
        f"({result['vocab_mapped']:.1%}); teacher tokens of the text with one: {result['text_tokens_mapped']:.1%}"
    )
    emit(result)


if __name__ == "__main__":
    main()
