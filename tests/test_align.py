"""Cross-tokenizer alignment, the byte-normalized vocabulary map and tokenizer identity.

The alignment is checked against a brute-force oracle: decode every token prefix of both
tokenizations and pair the positions whose decoded prefixes are the same clean prefix of
the text. Tokenizers are tiny BPEs trained in memory (tests/tokenizer_utils.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.pipeline.text import align
from distill.pipeline.text.align import (
    BYTE_LEVEL,
    PLAIN,
    SENTENCEPIECE,
    align_batch,
    align_offsets,
    build_byte_decoder,
    build_vocab_map,
    detect_token_style,
    find_clean_ends,
    is_same_tokenizer,
    load_or_build_vocab_map,
    normalize_token_bytes,
    teacher_to_student_span,
    tokenize_for_student,
    tokenizer_hash,
)
from tests.tokenizer_utils import (
    build_corpus,
    save_and_reload,
    train_byte_level_tokenizer,
)

TEXTS = [
    "Le café était naïve, très naïve. Café résumé über alles.",
    "日本語の文章を読みます。東京は大きい。",
    "Thumbs up 👍🏽 and a test tube 🧪! Then 👍🏽🧪 together.",
    "Spaces  here,\ta tab and\n a new line, café.",
] + build_corpus(6, seed=99)


def encode(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def clean_prefix_lengths(tokenizer, ids: list[int], text: str) -> list[int | None]:
    """Oracle: per position, len(prefix) when tokens 0..t decode to exactly text[:len(prefix)], else None."""
    lengths = []
    for t in range(len(ids)):
        decoded = tokenizer.decode(ids[: t + 1], clean_up_tokenization_spaces=False)
        lengths.append(len(decoded) if "\ufffd" not in decoded and text.startswith(decoded) else None)
    return lengths


def oracle_pairs(teacher, student, text: str) -> set[tuple[int, int]]:
    """Positions pairs whose consumed prefixes are the same clean text prefix (last position per prefix)."""
    teacher_ids, _ = encode(teacher, text)
    student_ids, _ = encode(student, text)
    teacher_at = {n: t for t, n in enumerate(clean_prefix_lengths(teacher, teacher_ids, text)) if n is not None}
    student_at = {n: s for s, n in enumerate(clean_prefix_lengths(student, student_ids, text)) if n is not None}
    return {(teacher_at[n], student_at[n]) for n in teacher_at.keys() & student_at.keys()}


def pad_rows(tokenizer, texts: list[str], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cache-style teacher rows: input_ids (B, width), offsets (B, width, 2) zero-padded, lengths (B,)."""
    input_ids = np.zeros((len(texts), width), dtype=np.int64)
    offsets = np.zeros((len(texts), width, 2), dtype=np.int64)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for b, text in enumerate(texts):
        ids, spans = encode(tokenizer, text)
        n = min(len(ids), width)
        input_ids[b, :n], offsets[b, :n], lengths[b] = ids[:n], spans[:n], n
    return input_ids, offsets, lengths


# --- align_offsets on hand-made spans ----------------------------------------------------------


def test_clean_ends_skip_byte_groups_and_mid_character_tokens():
    # text "a日本 b": 'a', 日 as 2 byte tokens sharing (1, 2), a token ending inside 本 spanning (2, 3),
    # the rest of 本 (2, 3), a trimmed space token (5, 5)... spans as byte-level BPE reports them.
    offsets = np.array([[0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [4, 4], [4, 5], [0, 0]])
    positions, ends = find_clean_ends(offsets, length=7)
    assert positions.tolist() == [0, 2, 4, 5, 6]
    assert ends.tolist() == [1, 2, 3, 4, 5]


def test_align_offsets_golden_with_specials_padding_and_skipped_whitespace():
    # text "ab  cd!": teacher = <bos> 'ab' 'cd'(whitespace skipped) '!' + padding
    teacher = np.array([[0, 0], [0, 2], [4, 6], [6, 7], [0, 0], [0, 0]])
    # student = 'a' 'b' ' ' ' c' 'd!' : ends 1 2 3 5 7
    student = np.array([[0, 1], [1, 2], [2, 3], [3, 5], [5, 7]])
    alignment = align_offsets(teacher, 4, student)
    assert alignment.teacher_pos.tolist() == [1, 3]
    assert alignment.student_pos.tolist() == [1, 4]
    assert alignment.num_student == 5 and alignment.num_teacher == 4
    assert alignment.student_coverage == pytest.approx(2 / 5)
    assert alignment.teacher_pos.dtype == np.int64 and alignment.student_pos.dtype == np.int64


def test_align_offsets_empty_rows():
    alignment = align_offsets(np.zeros((4, 2), dtype=np.int64), 0, np.zeros((0, 2), dtype=np.int64))
    assert alignment.num_aligned == 0 and alignment.student_coverage == 0.0


# --- align_offsets on real tokenizers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_name", "student_name"),
    [("big", "small"), ("small", "big"), ("big", "sp"), ("sp", "small"), ("untrimmed", "small"), ("big", "untrimmed")],
)
def test_alignment_matches_decoded_prefix_oracle(tokenizers, teacher_name, student_name):
    teacher, student = tokenizers[teacher_name], tokenizers[student_name]
    for text in TEXTS:
        teacher_ids, teacher_spans = encode(teacher, text)
        student_ids, student_spans = encode(student, text)
        alignment = align_offsets(teacher_spans, len(teacher_ids), student_spans)
        pairs = set(zip(alignment.teacher_pos.tolist(), alignment.student_pos.tolist()))
        assert pairs == oracle_pairs(teacher, student, text), text
        for t, s in pairs:
            end = teacher_spans[t, 1]
            assert student_spans[s, 1] == end
            prefix = text[:end]
            assert teacher.decode(teacher_ids[: t + 1], clean_up_tokenization_spaces=False) == prefix
            assert student.decode(student_ids[: s + 1], clean_up_tokenization_spaces=False) == prefix


@pytest.mark.parametrize(("teacher_name", "student_name"), [("big", "small"), ("small", "big"), ("big", "sp")])
def test_coverage_of_different_tokenizers(tokenizers, teacher_name, student_name):
    teacher, student = tokenizers[teacher_name], tokenizers[student_name]
    aligned = total = 0
    for text in TEXTS:
        teacher_ids, teacher_spans = encode(teacher, text)
        _, student_spans = encode(student, text)
        alignment = align_offsets(teacher_spans, len(teacher_ids), student_spans)
        # per row >= 0.2: CJK unseen by a 300-token vocabulary is 3 byte tokens per character
        assert alignment.student_coverage > 0.2, text
        aligned, total = aligned + alignment.num_aligned, total + alignment.num_student
    assert 0.3 < aligned / total < 1.0


def test_identical_tokenizer_aligns_every_position_to_itself(tokenizers):
    big = tokenizers["big"]
    for text in TEXTS[2:]:  # every character of these is a whole token of the 1000-token vocabulary
        ids, spans = encode(big, text)
        alignment = align_offsets(spans, len(ids), spans)
        assert alignment.student_coverage == 1.0, text
        assert alignment.teacher_pos.tolist() == list(range(len(ids)))
        assert alignment.student_pos.tolist() == list(range(len(ids)))
    input_ids, offsets, lengths = pad_rows(big, TEXTS, width=128)
    batch = align_batch(TEXTS, offsets, lengths, big, 128, teacher_input_ids=input_ids, same_tokenizer=True)
    assert batch.aligned_share == 1.0


def test_identical_byte_splitting_tokenizer_pairs_t_with_t(tokenizers):
    small = tokenizers["small"]
    ids, spans = encode(small, TEXTS[2])  # emoji: split into byte tokens by the 300-token vocabulary
    alignment = align_offsets(spans, len(ids), spans)
    assert np.array_equal(alignment.teacher_pos, alignment.student_pos)
    assert 0.3 < alignment.student_coverage < 1.0  # mid-character byte tokens have no clean prefix


def test_teacher_specials_and_padding_are_never_aligned(tokenizers):
    big, small = tokenizers["big"], tokenizers["small"]
    text = TEXTS[0]
    _, spans = encode(big, text)
    with_bos = np.concatenate([[[0, 0]], spans, np.zeros((5, 2), dtype=np.int64)])  # (1 + n + 5, 2)
    _, student_spans = encode(small, text)
    plain = align_offsets(spans, len(spans), student_spans)
    shifted = align_offsets(with_bos, len(spans) + 1, student_spans)
    assert np.array_equal(shifted.teacher_pos, plain.teacher_pos + 1)
    assert np.array_equal(shifted.student_pos, plain.student_pos)


def test_student_cut_at_context_only_aligns_kept_positions(tokenizers):
    big, small = tokenizers["big"], tokenizers["small"]
    text = " ".join(TEXTS)
    teacher_ids, teacher_spans = encode(big, text)
    input_ids, offsets = tokenize_for_student(small, [text], max_length=32)
    assert input_ids[0].shape == (32,) and offsets[0].shape == (32, 2)
    assert input_ids[0].dtype == np.int64
    alignment = align_offsets(teacher_spans, len(teacher_ids), offsets[0])
    assert alignment.num_student == 32
    assert alignment.student_pos.max() < 32
    assert teacher_spans[alignment.teacher_pos.max(), 1] <= offsets[0][-1, 1]


def test_tokenize_for_student_rejects_zero_context(tokenizers):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_for_student(tokenizers["small"], ["x"], max_length=0)


# --- teacher_to_student_span --------------------------------------------------------------------


def test_teacher_to_student_span_golden():
    # text "ab  cd!": teacher <bos> 'ab' 'cd' '!' + pad; student 'a' 'b' ' ' ' c' 'd!'
    teacher = np.array([[0, 0], [0, 2], [4, 6], [6, 7], [0, 0]])
    student = np.array([[0, 1], [1, 2], [2, 3], [3, 5], [5, 7], [0, 0]])
    assert teacher_to_student_span(teacher, 4, student, num_student=5).tolist() == [-1, 1, 4, 4, -1]
    # student cut after ' c': 'cd' and '!' end beyond the kept student tokens
    assert teacher_to_student_span(teacher, 4, student, num_student=4).tolist() == [-1, 1, -1, -1, -1]


def test_teacher_to_student_span_on_real_tokenizers(tokenizers):
    big, small = tokenizers["big"], tokenizers["small"]
    for text in TEXTS:
        teacher_ids, teacher_spans = encode(big, text)
        _, student_spans = encode(small, text)
        mapped = teacher_to_student_span(
            torch.from_numpy(teacher_spans), len(teacher_ids), student_spans, len(student_spans)
        )
        assert mapped.shape == (len(teacher_ids),) and mapped.dtype == np.int64
        assert (mapped >= 0).all()  # the student covers the whole text
        assert (np.diff(mapped) >= 0).all()
        for char, s in zip((teacher_spans[:, 1] - 1).tolist(), mapped.tolist()):
            start, end = student_spans[s]
            previous_end = student_spans[s - 1, 1] if s > 0 else 0
            assert previous_end <= char < end  # the first student token ending after the character
            assert start <= char or text[char].isspace()  # contains it, or swallowed a trimmed space


# --- byte normalization and vocabulary map --------------------------------------------------------


def test_normalizer_byte_level_and_sentencepiece_agree():
    expected = " Café".encode()
    assert normalize_token_bytes("ĠCafÃ©", BYTE_LEVEL) == expected
    assert normalize_token_bytes("▁Café", SENTENCEPIECE) == expected
    assert normalize_token_bytes(" Café", PLAIN) == expected
    assert normalize_token_bytes("ĠæĹ¥æľ¬", BYTE_LEVEL) == " 日本".encode()
    assert normalize_token_bytes("ðŁĳį", BYTE_LEVEL) == "👍".encode()
    assert normalize_token_bytes("Ċ", BYTE_LEVEL) == b"\n"
    assert normalize_token_bytes("<0xC3>", SENTENCEPIECE) == b"\xc3"
    assert normalize_token_bytes("<0x0A>", SENTENCEPIECE) == b"\n"
    assert normalize_token_bytes("日本", BYTE_LEVEL) == "日本".encode()  # not byte-level encoded: raw text


def test_byte_decoder_is_a_bijection_onto_all_bytes():
    decoder = build_byte_decoder()
    assert len(decoder) == 256 and sorted(decoder.values()) == list(range(256))
    assert decoder["Ġ"] == 0x20 and decoder["Ċ"] == 0x0A and decoder["A"] == 0x41


def test_detect_token_style(tokenizers):
    assert detect_token_style(tokenizers["big"]) == BYTE_LEVEL
    assert detect_token_style(tokenizers["sp"]) == SENTENCEPIECE


def assert_injective_and_byte_exact(vocab_map: np.ndarray, teacher, student) -> int:
    """Matched entries are injective and join tokens with identical bytes; returns the match count."""
    matched = np.flatnonzero(vocab_map >= 0)
    assert len(set(vocab_map[matched].tolist())) == matched.size
    teacher_style, student_style = detect_token_style(teacher), detect_token_style(student)
    specials = set(teacher.all_special_tokens)
    for teacher_id in matched.tolist():
        teacher_token = teacher.convert_ids_to_tokens(teacher_id)
        student_token = student.convert_ids_to_tokens(int(vocab_map[teacher_id]))
        if teacher_token in specials:
            assert student_token == teacher_token
        else:
            assert normalize_token_bytes(teacher_token, teacher_style) == normalize_token_bytes(
                student_token, student_style
            )
    return matched.size


def test_vocab_map_across_byte_level_and_sentencepiece(tokenizers):
    teacher, student = tokenizers["big"], tokenizers["sp"]
    vocab_map = build_vocab_map(teacher, student)
    assert vocab_map.shape == (len(teacher),) and vocab_map.dtype == np.int64
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    assert vocab_map[teacher_vocab["ĠCafÃ©"]] == student_vocab["▁Café"]
    for teacher_token, student_token in [
        ("ĠnaÃ¯ve", "▁naïve"),
        ("ĠæĿ±äº¬", "▁東京"),
        ("ĠðŁĳįðŁı½", "▁👍🏽"),
        ("Ġthe", "▁the"),
    ]:
        assert vocab_map[teacher_vocab[teacher_token]] == student_vocab[student_token]
    assert vocab_map[teacher_vocab["Ã"]] == student_vocab["<0xC3>"]  # lone byte 0xC3 on both sides
    assert vocab_map[teacher_vocab["<|endoftext|>"]] == -1  # specials only match identical specials
    matched = assert_injective_and_byte_exact(vocab_map, teacher, student)
    naive = len(teacher_vocab.keys() & student_vocab.keys())
    assert matched > 2 * naive  # byte normalization finds far more than string intersection


def test_vocab_map_prefers_ordinary_pieces_over_byte_fallback(tokenizers):
    teacher, student = tokenizers["sp"], tokenizers["big"]
    vocab_map = build_vocab_map(teacher, student)
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    assert vocab_map[teacher_vocab["a"]] == student_vocab["a"]
    assert vocab_map[teacher_vocab["<0x61>"]] == -1  # same byte as 'a', which already took it
    assert vocab_map[teacher_vocab["<0xC3>"]] == student_vocab["Ã"]
    assert_injective_and_byte_exact(vocab_map, teacher, student)


def test_vocab_map_between_byte_level_sizes_and_added_tokens(tokenizers, tmp_path):
    teacher = save_and_reload(train_byte_level_tokenizer(1000), tmp_path / "teacher")
    student = save_and_reload(train_byte_level_tokenizer(300), tmp_path / "student")
    teacher.add_tokens(["<think>"])
    student.add_tokens(["<think>"])
    vocab_map = build_vocab_map(teacher, student)
    assert vocab_map.shape == (1001,)
    assert vocab_map[teacher.convert_tokens_to_ids("<think>")] == student.convert_tokens_to_ids("<think>")
    assert vocab_map[teacher.convert_tokens_to_ids("<|endoftext|>")] == student.convert_tokens_to_ids("<|endoftext|>")
    shared = teacher.get_vocab().keys() & student.get_vocab().keys()
    assert all(vocab_map[teacher.get_vocab()[token]] == student.get_vocab()[token] for token in shared)
    assert assert_injective_and_byte_exact(vocab_map, teacher, student) == len(shared)


def test_vocab_map_of_identical_tokenizers_is_identity(tokenizers, tmp_path):
    copy = save_and_reload(tokenizers["big"], tmp_path / "copy")
    assert np.array_equal(build_vocab_map(tokenizers["big"], copy), np.arange(len(copy)))
    sp_copy = save_and_reload(tokenizers["sp"], tmp_path / "sp_copy")
    assert np.array_equal(build_vocab_map(tokenizers["sp"], sp_copy), np.arange(len(sp_copy)))


def test_load_or_build_vocab_map_caches_on_disk(tokenizers, tmp_path, monkeypatch):
    teacher, student = tokenizers["big"], tokenizers["sp"]
    built = load_or_build_vocab_map(teacher, student, tmp_path / "maps")
    files = list((tmp_path / "maps").iterdir())
    assert [f.name for f in files] == [
        f"vocab_map-v{align.VOCAB_MAP_VERSION}-{tokenizer_hash(teacher)[:16]}-{tokenizer_hash(student)[:16]}.npy"
    ]

    def fail(*_):
        raise AssertionError("must load from disk")

    monkeypatch.setattr(align, "build_vocab_map", fail)
    assert np.array_equal(load_or_build_vocab_map(teacher, student, tmp_path / "maps"), built)


# --- tokenizer identity --------------------------------------------------------------------------


def test_hash_is_the_same_across_save_locations(tokenizers, tmp_path):
    original = tokenizers["big"]
    first = save_and_reload(original, tmp_path / "a" / "teacher-tokenizer")
    second = save_and_reload(first, tmp_path / "elsewhere" / "renamed")
    assert first.name_or_path != second.name_or_path
    assert tokenizer_hash(original) == tokenizer_hash(first) == tokenizer_hash(second)
    assert len(tokenizer_hash(original)) == 64
    assert is_same_tokenizer(first, second)
    assert not is_same_tokenizer(tokenizers["big"], tokenizers["small"])
    assert tokenizer_hash(tokenizers["big"]) != tokenizer_hash(tokenizers["sp"])


def test_hash_ignores_call_time_truncation_but_sees_new_special_tokens(tmp_path):
    tokenizer = save_and_reload(train_byte_level_tokenizer(300), tmp_path / "t")
    before = tokenizer_hash(tokenizer)
    tokenizer(["café " * 20], truncation=True, max_length=5)  # leaves truncation state in the backend
    assert tokenizer_hash(tokenizer) == before
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer_hash(tokenizer) != before


def test_is_same_tokenizer_identity_fast_path(tokenizers, monkeypatch):
    monkeypatch.setattr(align, "tokenizer_hash", lambda _: pytest.fail("identity must not hash"))
    assert is_same_tokenizer(tokenizers["big"], tokenizers["big"])


# --- align_batch ---------------------------------------------------------------------------------


def test_align_batch_different_tokenizers(tokenizers):
    teacher, student = tokenizers["big"], tokenizers["small"]
    texts = TEXTS[:4]
    _, offsets, lengths = pad_rows(teacher, texts, width=48)
    batch = align_batch(texts, torch.from_numpy(offsets), torch.from_numpy(lengths), student, max_length=40)
    student_ids, student_offsets = tokenize_for_student(student, texts, max_length=40)
    assert batch.input_ids.shape == (4, max(len(ids) for ids in student_ids))
    assert batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.int64
    assert batch.attention_mask.sum(1).tolist() == [len(ids) for ids in student_ids]
    for tensor in (batch.batch_idx, batch.teacher_pos, batch.student_pos):
        assert tensor.dtype == torch.int64 and tensor.shape == batch.batch_idx.shape
    b, t, s = batch.batch_idx.numpy(), batch.teacher_pos.numpy(), batch.student_pos.numpy()
    assert (t < lengths[b]).all() and (batch.attention_mask.numpy()[b, s] == 1).all()
    student_ends = np.stack([np.pad(o[:, 1], (0, batch.input_ids.shape[1] - len(o))) for o in student_offsets])
    assert np.array_equal(offsets[b, t, 1], student_ends[b, s])  # a (B, L, .) gather lines up
    expected_share = len(b) / sum(len(ids) for ids in student_ids)
    assert batch.aligned_share == pytest.approx(expected_share)
    assert 0.3 < batch.aligned_share < 1.0
    padded = batch.input_ids[batch.attention_mask == 0]
    assert (padded == student.pad_token_id).all()


def test_align_batch_identity_fast_path(tokenizers, monkeypatch):
    teacher = tokenizers["big"]
    monkeypatch.setattr(align, "tokenize_for_student", lambda *_: pytest.fail("no re-tokenization"))
    input_ids, offsets, lengths = pad_rows(teacher, TEXTS[:3], width=64)
    batch = align_batch(TEXTS[:3], offsets, lengths, teacher, 16, teacher_input_ids=input_ids, same_tokenizer=True)
    kept = np.minimum(lengths, 16)
    assert batch.input_ids.shape == (3, kept.max())
    for row in range(3):
        assert batch.input_ids[row, : kept[row]].tolist() == input_ids[row, : kept[row]].tolist()
    assert torch.equal(batch.teacher_pos, batch.student_pos)
    assert batch.batch_idx.tolist() == [row for row in range(3) for _ in range(kept[row])]
    assert batch.aligned_share == 1.0


def test_align_batch_identity_needs_teacher_ids(tokenizers):
    with pytest.raises(ValueError, match="teacher_input_ids"):
        align_batch(["a"], np.zeros((1, 2, 2)), np.array([1]), tokenizers["big"], 8, same_tokenizer=True)
