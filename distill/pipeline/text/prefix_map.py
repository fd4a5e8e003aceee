"""The prefix map of a tokenizer pair: every token of either vocabulary -> the bin of `kd_mode=prefix`.

    from distill.pipeline.text.prefix_map import load_or_build_prefix_map
    pmap = load_or_build_prefix_map(teacher_tokenizer, student_tokenizer, cache_dir)
    teacher_bins = pmap.teacher_bin[topk_ids]     # (N, K) student ids naming the bins, -1 = tail
    student_bins = pmap.student_bin               # (V_s,) bin of every student token, -1 = tail

[prefix-bin note] A *shared* token is a byte string that is a token of both vocabularies (what
`build_vocab_map` matches exactly; specials match by identical special). The bin of any token,
teacher's or student's, is its longest byte prefix that is a shared token, named by that shared
token's student id; a token with no shared prefix (a special the other side lacks, a lone byte the
other side spells differently) has bin -1 and its mass joins the tail. A shared token is its own bin.
Equivalently, by induction on length: an unmatched teacher token goes to the first piece of its
bytes under the student's vocabulary (its longest student-token prefix); if that student token has
no teacher counterpart it goes on to its own longest teacher-token prefix, and so on, each step
strictly shorter. So `' the'` missing from the student lands on `' th'` or `' t'`, and a student
token missing from the teacher (`' thé'`) lands where the teacher's mass for its start lands.
"First piece" here is the longest prefix, a byte-level fact; the student's BPE may segment a given
continuation differently (what that misses: docs/cross-tokenizer.md).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.pipeline.text.align import build_vocab_map, list_token_keys, tokenizer_hash

PREFIX_MAP_VERSION = 1  # bump when build_prefix_map changes, so cached maps are rebuilt


@dataclass(frozen=True)
class PrefixMap:
    """Bins of `kd_mode=prefix`, see [prefix-bin note].

    teacher_bin: (V_t,) int64, teacher id -> student id of its bin, -1 = tail.
    student_bin: (V_s,) int64, student id -> student id of its bin, -1 = tail.
    exact: (V_t,) int64, the exact map (`build_vocab_map`): teacher id -> identical student token or -1.
    """

    teacher_bin: np.ndarray
    student_bin: np.ndarray
    exact: np.ndarray

    @property
    def teacher_bin_size(self) -> np.ndarray:
        """(V_s,) int64: how many teacher tokens each bin holds (a bin is named by a student id)."""
        named = self.teacher_bin[self.teacher_bin >= 0]
        return np.bincount(named, minlength=len(self.student_bin)).astype(np.int64)

    def padded(self, teacher_vocab_size: int, student_vocab_size: int) -> PrefixMap:
        """Extend both maps to the models' embedding sizes (rows past the tokenizers map to -1)."""

        def pad(array: np.ndarray, size: int) -> np.ndarray:
            extra = max(size - len(array), 0)
            return np.concatenate([array, np.full(extra, -1, dtype=array.dtype)])

        return PrefixMap(
            pad(self.teacher_bin, teacher_vocab_size),
            pad(self.student_bin, student_vocab_size),
            pad(self.exact, teacher_vocab_size),
        )


def find_longest_shared_prefix(token: bytes, shared: dict[bytes, int]) -> int:
    """Student id of the longest shared token that is a byte prefix of `token` (itself included), else -1."""
    for end in range(len(token), 0, -1):
        bin_id = shared.get(token[:end])
        if bin_id is not None:
            return bin_id
    return -1


def build_prefix_map(teacher_tokenizer: Any, student_tokenizer: Any) -> PrefixMap:
    """The bins of both vocabularies ([prefix-bin note]); exact at the byte level, built once per pair."""
    exact = build_vocab_map(teacher_tokenizer, student_tokenizer)
    teacher_entries = sorted(list_token_keys(teacher_tokenizer), key=lambda entry: entry[0])
    student_entries = list_token_keys(student_tokenizer)
    shared: dict[bytes, int] = {}  # shared byte string -> the student id naming its bin
    for token_id, key, _ in teacher_entries:
        if exact[token_id] >= 0 and key[0] == "bytes":
            shared.setdefault(key[1], int(exact[token_id]))
    teacher_bin = np.full(len(exact), -1, dtype=np.int64)
    for token_id, key, _ in teacher_entries:
        if exact[token_id] >= 0:
            teacher_bin[token_id] = shared.get(key[1], exact[token_id]) if key[0] == "bytes" else exact[token_id]
        elif key[0] == "bytes":
            teacher_bin[token_id] = find_longest_shared_prefix(key[1], shared)
    matched_students = {int(s) for s in exact[exact >= 0]}
    size = max([len(student_tokenizer)] + [token_id + 1 for token_id, _, _ in student_entries])
    student_bin = np.full(size, -1, dtype=np.int64)
    for token_id, key, _ in student_entries:
        if key[0] == "bytes":
            student_bin[token_id] = find_longest_shared_prefix(key[1], shared)
        elif token_id in matched_students:  # a special the teacher has too
            student_bin[token_id] = token_id
    return PrefixMap(teacher_bin, student_bin, exact)


def load_or_build_prefix_map(teacher_tokenizer: Any, student_tokenizer: Any, cache_dir: Path) -> PrefixMap:
    """`build_prefix_map`, kept beside the exact map in `cache_dir/prefix_map-v<version>-<t hash>-<s hash>.npz`."""
    cache_dir = Path(cache_dir)
    teacher_key, student_key = tokenizer_hash(teacher_tokenizer)[:16], tokenizer_hash(student_tokenizer)[:16]
    path = cache_dir / f"prefix_map-v{PREFIX_MAP_VERSION}-{teacher_key}-{student_key}.npz"
    if path.exists():
        with np.load(path) as data:
            return PrefixMap(data["teacher_bin"], data["student_bin"], data["exact"])
    pmap = build_prefix_map(teacher_tokenizer, student_tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz.tmp", delete=False) as handle:
        np.savez(handle, teacher_bin=pmap.teacher_bin, student_bin=pmap.student_bin, exact=pmap.exact)
    os.replace(handle.name, path)
    return pmap
