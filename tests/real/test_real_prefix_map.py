"""The prefix map of `kd_mode=prefix` on real tokenizer pairs (Gemma 3 and Qwen3 -> SmolLM2) against a direct
byte search over a sample of both vocabularies (the full double scan would take hours)."""

from __future__ import annotations

import random

import pytest

from tests.test_prefix_map import check_against_brute_force, token_bytes

pytestmark = pytest.mark.real


@pytest.mark.parametrize("teacher_name", ["gemma3", "qwen3_tokenizer"])
def test_prefix_map_equals_brute_force_on_real_tokenizers(real_assets, teacher_name):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(real_assets[teacher_name])
    student = AutoTokenizer.from_pretrained(real_assets["smollm2"])
    rng = random.Random(0)
    teacher_ids = rng.sample(sorted(token_bytes(teacher)), 150)
    student_ids = rng.sample(sorted(token_bytes(student)), 150)
    counts = check_against_brute_force(teacher, student, teacher_ids, student_ids)
    # most teacher tokens of a 150k-260k vocabulary have no SmolLM2 twin, and nearly all get a prefix bin
    assert counts["teacher_prefix"] > 50 and counts["teacher_none"] < 15, counts
