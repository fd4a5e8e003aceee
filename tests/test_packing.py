"""Packing documents into rows: the plan, the segment helpers, and alignment that never crosses a document.

Goldens are worked by hand; the packed alignment is checked against aligning each document alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.pipeline.align import align_batch
from distill.pipeline.data import RowBuilder, plan_rows
from distill.pipeline.packing import (
    find_segments,
    next_in_segment,
    pack_pieces,
    segment_position_ids,
    split_segments,
)
from tests.tokenizer_utils import (
    add_bos,
    build_corpus,
    save_and_reload,
    train_byte_level_tokenizer,
    train_sentencepiece_style_tokenizer,
)

DOCS = [
    "Le café était naïve, très naïve.",
    "Short.",
    "日本語の文章を読みます。東京は大きい。",
    "Thumbs up 👍🏽 and a test tube 🧪!",
    "Spaces  here,\ta tab and\n a new line.",
] + build_corpus(8, seed=5)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """teacher: byte-level BPE with a BOS (as Gemma); student: SentencePiece style with a BOS; plain: no prefix."""
    root = tmp_path_factory.mktemp("pack_tokenizers")
    return {
        "teacher": save_and_reload(add_bos(train_byte_level_tokenizer(500)), root / "teacher"),
        "student": save_and_reload(add_bos(train_sentencepiece_style_tokenizer(400), "<s>"), root / "student"),
        "plain": save_and_reload(train_byte_level_tokenizer(300), root / "plain"),
    }


def test_first_fit_packing_golden():
    # rows of 8: 5 -> row 0 (3 left); 3 -> row 0 (full); 4 -> row 1 (4 left); 2 -> row 1 (2 left); 6 -> row 2;
    # 2 -> row 1 (the first row with room), 1 -> row 2
    assert pack_pieces(np.array([5, 3, 4, 2, 6, 2, 1]), 8).tolist() == [0, 0, 1, 1, 2, 1, 2]
    # a window of one open row: row 0 is closed once row 1 opens, so the 3 goes to row 1
    assert pack_pieces(np.array([5, 5, 3]), 8, window=1).tolist() == [0, 1, 1]
    assert pack_pieces(np.array([5, 5, 3]), 8).tolist() == [0, 1, 0]
    with pytest.raises(ValueError):
        pack_pieces(np.array([9]), 8)


def test_segments_positions_and_next_token_masks_golden():
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([6, 5])
    assert segment_position_ids(segment_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert next_in_segment(segment_ids, lengths).tolist() == [
        [True, True, False, True, False, False, False, False],
        [True, True, True, True, False, False, False, False],
    ]
    # a BOS (span (0, 0)) starts each segment; "ab" + "c" + "de" laid end to end
    offsets = np.array([[0, 0], [0, 1], [1, 2], [0, 0], [2, 3], [0, 0], [3, 4], [4, 5]])
    segments = find_segments([0, 0, 0, 1, 1, 2, 2, 2], offsets)
    assert [(s.token_start, s.token_end, s.char_start, s.char_end) for s in segments] == [
        (0, 3, 0, 2),
        (3, 5, 2, 3),
        (5, 8, 3, 5),
    ]


def test_packed_plan_holds_every_piece_once_and_rows_rebuild_the_documents(tokenizers):
    import datasets

    teacher = tokenizers["teacher"]
    ds = datasets.Dataset.from_dict({"text": DOCS + ["", "   "]})
    seq_len = 24
    unpacked = plan_rows(ds, "text", teacher, seq_len)
    packed = plan_rows(ds, "text", teacher, seq_len, packing="greedy")
    assert unpacked.row_pieces is None and unpacked.empty_documents == packed.empty_documents == 2
    assert len(packed) < len(unpacked)
    assert packed.count_tokens(0, len(packed)) == unpacked.count_tokens(0, len(unpacked))
    pieces = lambda p: sorted(zip(p.doc_index.tolist(), p.token_start.tolist(), p.token_end.tolist()))  # noqa: E731
    assert pieces(packed) == pieces(unpacked)
    builder = RowBuilder(ds, "text", teacher, packed)
    rebuilt: dict[int, list[tuple[int, str]]] = {}
    for r in range(len(packed)):
        row = builder.row(r)
        assert len(row.input_ids) <= seq_len
        segment_ids = np.zeros(len(row.input_ids), dtype=np.int64) if row.segment_ids is None else row.segment_ids
        segments = find_segments(segment_ids, row.offsets)
        assert len(segments) == len(packed.pieces(r))
        for piece, s in zip(packed.pieces(r), segments):
            assert row.input_ids[s.token_start] == teacher.bos_token_id
            text = row.text[s.char_start : s.char_end]
            for a, b in row.offsets[s.token_start + 1 : s.token_end]:
                assert s.char_start <= a <= b <= s.char_end  # every span inside its own segment's text
            rebuilt.setdefault(int(packed.doc_index[piece]), []).append((int(packed.token_start[piece]), text))
    for doc, parts in rebuilt.items():
        assert "".join(text for _, text in sorted(parts)) == DOCS[doc]


def pack_by_hand(tokenizer, docs: list[str], seq_len: int) -> dict:
    """One packed teacher row of ``docs`` (each: prefix + its tokens), as stage 1 stores it, batch of one."""
    from distill.pipeline.tokens import encode_texts, prefix_ids

    prefix = prefix_ids(tokenizer)
    ids, offsets, segments, start = [], [], [], 0
    for s, (doc_ids, spans) in enumerate(encode_texts(tokenizer, docs)):
        ids += prefix + doc_ids.tolist()
        offsets += [[0, 0]] * len(prefix) + np.where(spans[:, 1:] > 0, spans + start, 0).tolist()
        segments += [s] * (len(prefix) + len(doc_ids))
        start += len(docs[s])
    n = len(ids)
    assert n <= seq_len
    pad = lambda x, w: torch.tensor([x + [[0, 0] if w else 0] * (seq_len - n)])  # noqa: E731
    return {
        "input_ids": pad(ids, False),
        "offsets": pad(offsets, True),
        "segment_ids": pad(segments, False),
        "length": torch.tensor([n]),
        "text": ["".join(docs)],
        "target_logprob": torch.arange(seq_len, dtype=torch.float32)[None],
    }


@pytest.mark.parametrize("same", [False, True])
def test_packed_alignment_is_each_document_aligned_alone(tokenizers, same):
    teacher = tokenizers["teacher"]
    student = teacher if same else tokenizers["student"]
    docs = DOCS[:4]
    row = pack_by_hand(teacher, docs, 128)
    kwargs = dict(teacher_input_ids=row["input_ids"].numpy(), same_tokenizer=same)
    packed = align_batch(
        row["text"], row["offsets"], row["length"], student, 512, **kwargs, teacher_segments=row["segment_ids"]
    )
    teacher_seg = row["segment_ids"][0]
    student_seg = packed.segment_ids[0]
    assert (teacher_seg[packed.teacher_pos] == student_seg[packed.student_pos]).all()  # never across documents
    # each document alone: its own row, aligned the unpacked way; the packed pairs are those, shifted
    parts, _ = split_segments({k: v for k, v in row.items() if k != "target_logprob"}, 128)
    alone = align_batch(
        parts["text"],
        parts["offsets"],
        parts["length"],
        student,
        512,
        teacher_input_ids=parts["input_ids"].numpy(),
        same_tokenizer=same,
    )
    t_starts = torch.tensor(
        [s.token_start for s in find_segments(teacher_seg[: row["length"][0]], row["offsets"][0, : row["length"][0]])]
    )
    s_starts = torch.nonzero(
        torch.diff(student_seg[: int(packed.attention_mask.sum())], prepend=torch.tensor([-1]))
    ).flatten()
    expected = sorted(
        zip(
            (t_starts[alone.batch_idx] + alone.teacher_pos).tolist(),
            (s_starts[alone.batch_idx] + alone.student_pos).tolist(),
        )
    )
    assert sorted(zip(packed.teacher_pos.tolist(), packed.student_pos.tolist())) == expected
    assert len(expected) > 20
    # the student row is each document's own student row, laid end to end
    n_alone = alone.attention_mask.sum(dim=1).tolist()
    joined = torch.cat([alone.input_ids[b, :n] for b, n in enumerate(n_alone)])
    assert torch.equal(packed.input_ids[0, : int(packed.attention_mask.sum())], joined)


def test_student_context_cut_keeps_whole_segments_then_cuts_one_cleanly(tokenizers):
    teacher, student = tokenizers["teacher"], tokenizers["student"]
    row = pack_by_hand(teacher, DOCS[:3], 128)
    full = align_batch(row["text"], row["offsets"], row["length"], student, 512, teacher_segments=row["segment_ids"])
    first_two = int((full.segment_ids[0] <= 1).sum())
    cut = align_batch(
        row["text"], row["offsets"], row["length"], student, first_two + 3, teacher_segments=row["segment_ids"]
    )
    n = int(cut.attention_mask.sum())
    assert first_two < n <= first_two + 3 and torch.equal(cut.input_ids[0, :n], full.input_ids[0, :n])
    assert set(cut.student_pos.tolist()) <= set(range(n))
    assert set(zip(cut.teacher_pos.tolist(), cut.student_pos.tolist())) <= set(
        zip(full.teacher_pos.tolist(), full.student_pos.tolist())
    )


def test_split_segments_gives_each_document_as_its_own_row(tokenizers):
    teacher = tokenizers["teacher"]
    row = pack_by_hand(teacher, DOCS[:3], 96)
    parts, source = split_segments(row, 96)
    assert parts["text"] == DOCS[:3] and source.tolist() == [0, 0, 0]
    for b, doc in enumerate(DOCS[:3]):
        alone = pack_by_hand(teacher, [doc], 96)
        n = int(alone["length"][0])
        assert int(parts["length"][b]) == n
        assert torch.equal(parts["input_ids"][b], alone["input_ids"][0])
        assert torch.equal(parts["offsets"][b], alone["offsets"][0])
        assert int(parts["segment_ids"][b].abs().sum()) == 0
    # per-position fields keep their values, shifted to each segment's first position
    starts = [0] + np.cumsum([int(p) for p in parts["length"][:-1]]).tolist()
    for b, start in enumerate(starts):
        n = int(parts["length"][b])
        assert parts["target_logprob"][b, :n].tolist() == list(range(start, start + n))
        assert parts["target_logprob"][b, n:].isnan().all()
