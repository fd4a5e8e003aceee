"""Packing documents into rows: the plan, the segment helpers, and alignment that never crosses a document.

Goldens are worked by hand; the packed alignment is checked against aligning each document alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.pipeline.losses.cross_tokenizer import find_chunks
from distill.pipeline.text.align import AlignedBatch, align_batch
from distill.pipeline.text.data import RowBuilder, plan_rows
from distill.pipeline.text.packing import (
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
    from distill.pipeline.text.tokens import encode_texts, prefix_ids

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


def align_packed_and_alone(
    tokenizers, same: bool
) -> tuple[dict, AlignedBatch, AlignedBatch, torch.Tensor, torch.Tensor]:
    """One packed row of four documents aligned as stage 2 aligns it, and each document aligned alone (its own row,
    the unpacked way); plus where each document starts in the packed row, (4,) teacher and (4,) student positions."""
    teacher = tokenizers["teacher"]
    student = teacher if same else tokenizers["student"]
    row = pack_by_hand(teacher, DOCS[:4], 128)
    kwargs = dict(teacher_input_ids=row["input_ids"].numpy(), same_tokenizer=same)
    packed = align_batch(
        row["text"], row["offsets"], row["length"], student, 512, **kwargs, teacher_segments=row["segment_ids"]
    )
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
    n = int(row["length"][0])
    t_starts = torch.tensor([s.token_start for s in find_segments(row["segment_ids"][0, :n], row["offsets"][0, :n])])
    student_seg = packed.segment_ids[0, : int(packed.attention_mask.sum())]
    s_starts = torch.nonzero(torch.diff(student_seg, prepend=torch.tensor([-1]))).flatten()
    return row, packed, alone, t_starts, s_starts


@pytest.mark.parametrize("same", [False, True])
def test_packed_alignment_is_each_document_aligned_alone(tokenizers, same):
    row, packed, alone, t_starts, s_starts = align_packed_and_alone(tokenizers, same)
    teacher_seg = row["segment_ids"][0]
    student_seg = packed.segment_ids[0]
    assert (teacher_seg[packed.teacher_pos] == student_seg[packed.student_pos]).all()  # never across documents
    # the packed pairs are each document's own pairs, shifted to where it starts
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


@pytest.mark.parametrize("same", [False, True])
def test_alm_chunks_of_a_packed_row_are_each_documents_chunks(tokenizers, same):
    _, packed, alone, t_starts, s_starts = align_packed_and_alone(tokenizers, same)
    pairs = (packed.batch_idx, packed.teacher_pos, packed.student_pos)
    _, t_start, t_end, s_start, s_end = find_chunks(*pairs, packed.segment_ids[packed.batch_idx, packed.student_pos])
    got = sorted(zip(t_start.tolist(), t_end.tolist(), s_start.tolist(), s_end.tolist()))
    doc, *ends = find_chunks(alone.batch_idx, alone.teacher_pos, alone.student_pos)
    shifts = (t_starts[doc], t_starts[doc], s_starts[doc], s_starts[doc])
    expected = sorted(zip(*((shift + end).tolist() for shift, end in zip(shifts, ends))))
    assert got == expected and len(expected) > 20
    assert len(find_chunks(*pairs)[0]) == len(expected) + 3  # by row only: one chunk across each of 3 boundaries


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


# --- stage 1: a packed row's teacher fields are each document's own ----------------------------------


def build_rows(tokenizer, docs: list[str]):
    """A packed Row of ``docs`` and each document's own Row (as stage 1 builds them)."""
    from distill.pipeline.text.data import Row

    row = pack_by_hand(tokenizer, docs, 256)
    n = int(row["length"][0])
    packed = Row(0, 0, row["input_ids"][0, :n].numpy(), row["offsets"][0, :n].numpy(), row["text"][0])
    packed.segment_ids = row["segment_ids"][0, :n].numpy()
    alone = []
    for i, doc in enumerate(docs):
        one = pack_by_hand(tokenizer, [doc], 256)
        m = int(one["length"][0])
        alone.append(Row(i + 1, i, one["input_ids"][0, :m].numpy(), one["offsets"][0, :m].numpy(), doc))
    return packed, alone


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma3_text", "llama"])
def test_packed_row_teacher_fields_equal_each_document_cached_alone(tokenizers, family, single_thread):
    from transformers import AutoModelForCausalLM

    from distill.pipeline.teacher.fields import FieldSettings, compute_batch_fields
    from distill.pipeline.teacher.model import use_selective_attention
    from tests.test_teacher_logits import family_config

    teacher = tokenizers["teacher"]
    config, _ = family_config(family, len(teacher))
    if family == "gemma3_text":
        config.sliding_window = 5  # documents longer than the window: the window must restart per document too
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    use_selective_attention(model)
    settings = FieldSettings(
        seq_len=256,
        top_k=8,
        temperatures=[1.0, 2.0],
        vocab_proj_temperature=2.0,
        hidden_layers=[0, 1, 2],
        attention_layers=[1, 2],
        attention_topk=8,
        pca={},
        packed=True,
    )
    packed_row, alone_rows = build_rows(teacher, DOCS[:3])
    packed, bad = compute_batch_fields(model, [packed_row], settings, torch.device("cpu"))
    alone, _ = compute_batch_fields(model, alone_rows, settings, torch.device("cpu"))  # padded batch, 2D mask
    assert bad == [] and packed["segment_ids"][0].max() == 2
    start = 0
    for b, row in enumerate(alone_rows):
        n = len(row.input_ids)
        at = slice(start, start + n)
        assert (packed["segment_ids"][0, at] == b).all() and (packed["input_ids"][0, at] == row.input_ids).all()
        for name in ("topk_logits", "lse", "vocab_proj", "hidden/0", "hidden/1", "hidden/2", "attn/1", "attn/2"):
            np.testing.assert_allclose(
                packed[name][0, at].astype(np.float32), alone[name][b, :n].astype(np.float32), atol=2e-3, rtol=2e-3
            )
        # the next-token target never crosses into the next document: NaN at each document's last position
        target = packed["target_logprob"][0, at]
        np.testing.assert_allclose(target[:-1], alone["target_logprob"][b, : n - 1], atol=1e-4)
        assert np.isnan(target[-1]) and np.isnan(alone["target_logprob"][b, n - 1])
        top = packed["topk_ids"][0, at] == alone["topk_ids"][b, :n]
        assert top[:, 0].all() and top.mean() > 0.95  # near-ties deeper in the top-K may swap
        for layer in (1, 2):  # attention keys: the same, shifted by the document's start; never outside it
            keys, used = packed[f"attn_ids/{layer}"][0, at], packed[f"attn/{layer}"][0, at] > 0
            assert ((keys >= start) | ~used).all() and (keys < start + n).all()
            assert (np.where(used, keys - start, 0) == alone[f"attn_ids/{layer}"][b, :n]).mean() > 0.95
        start += n


def test_packed_calibration_of_the_targets_equals_each_document_calibrated_alone(tokenizers, single_thread):
    from transformers import AutoModelForCausalLM

    from distill.cache.targets import ID_BY_RANK, build_target_layout
    from distill.pipeline.teacher.calibration import calibrate_rows
    from tests.test_teacher_logits import family_config

    config, _ = family_config("llama", len(tokenizers["teacher"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    packed_row, alone_rows = build_rows(tokenizers["teacher"], DOCS[:3])
    for kind in ("topk", "sampled"):
        layout = {
            **dict(seq_len=256, top_k=8, temperatures=[1.0, 2.0], vocab_proj_temperature=1.0, vocab_proj=False),
            **dict(hidden_layers=[], attention_layers=[], attention_topk=1, packing="greedy"),
            "targets": build_target_layout(kind, 8, 0.8, 8),
        }
        packed_calibration = calibrate_rows(model, [packed_row], layout, None, 4, torch.device("cpu"))
        alone_calibration = calibrate_rows(model, alone_rows, layout, None, 4, torch.device("cpu"))
        packed_arrays, packed = packed_calibration.arrays, packed_calibration.fidelity
        alone_arrays, alone = alone_calibration.arrays, alone_calibration.fidelity
        assert packed["positions"] == alone["positions"] == len(packed_row.input_ids)
        figures = ["kl_head_bins", "tail_mass"] if kind == "topk" else ["ess"]
        for name in figures:
            for t in ("1.0", "2.0"):
                assert packed[name][t] == pytest.approx(alone[name][t], rel=1e-3, abs=1e-9), (kind, name, t)
        np.testing.assert_array_equal(packed_arrays[ID_BY_RANK][:20], alone_arrays[ID_BY_RANK][:20])


# --- the store: cache-teacher --packing greedy, cache info ---------------------------------------------


def test_padding_share_golden():
    from distill.cache.info import padding_share

    assert padding_share(tokens=90, rows=4, seq_len=32) == pytest.approx(1 - 90 / 128)  # 38 of 128 positions
    assert padding_share(tokens=0, rows=0, seq_len=32) is None


def test_packed_store_through_the_cli_lowers_padding_and_reads_back_each_document(tiny_assets, tmp_path):
    import json

    from typer.testing import CliRunner

    from distill.cache.reader import CacheReader
    from distill.cli import app
    from tests.helpers import cache_args

    runner = CliRunner()
    shares = {}
    for packing in ("none", "greedy"):
        out = tmp_path / packing
        args = cache_args(tiny_assets, out, packing=packing, hidden_layers="2", attention_layers="2", vocab_proj=None)
        assert runner.invoke(app, ["cache-teacher", *args]).exit_code == 0
        info = runner.invoke(app, ["cache", "info", str(out), "--json"])
        assert info.exit_code == 0, info.output
        shares[packing] = json.loads(info.output)["padding_share"]
        reader = CacheReader(str(out))
        data = reader.read_rows(reader.row_ids, ["length"])
        assert shares[packing] == pytest.approx(1 - int(data["length"].sum()) / (reader.num_rows * 32))
        assert "padding " in runner.invoke(app, ["cache", "info", str(out)]).output
        assert runner.invoke(app, ["cache", "verify", str(out)]).exit_code == 0
    assert shares["greedy"] < shares["none"] / 2
    packed, unpacked = CacheReader(str(tmp_path / "greedy")), CacheReader(str(tmp_path / "none"))
    assert packed.packed and "segment_ids" in packed.fields and "segment_ids" not in unpacked.fields
    # every piece of the unpacked store is a segment of the packed one, with the same text and tokens
    fields = ["input_ids", "length", "offsets", "text", "segment_ids"]
    segments, _ = split_segments(packed.read_rows(packed.row_ids, fields), 32)
    rows = unpacked.read_rows(unpacked.row_ids, fields[:4])
    as_key = lambda d, i: (d["text"][i], d["input_ids"][i].tolist(), d["offsets"][i].tolist())  # noqa: E731
    assert sorted(as_key(segments, i) for i in range(len(segments["text"]))) == sorted(
        as_key(rows, i) for i in range(len(rows["text"]))
    )


# --- stage 2: the student's loss on a packed row is the sum of its documents' ---------------------------


@pytest.fixture(scope="module")
def packed_store(tiny_assets, tmp_path_factory):
    from typer.testing import CliRunner

    from distill.cli import app
    from tests.helpers import cache_args

    out = tmp_path_factory.mktemp("packed") / "store"
    result = CliRunner().invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, packing="greedy")])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("student", ["student", "student_same_tok"])
def test_student_loss_on_a_packed_row_is_the_sum_of_its_documents_losses(
    train_assets, packed_store, student, tmp_path, single_thread
):
    from distill.curriculum import weights_at
    from distill.pipeline.train.setup import setup
    from distill.pipeline.train.signals import signal_from_arrays
    from tests.helpers import train_args
    from tests.test_train import make_config

    assets = {**train_assets, "store": packed_store}
    args = train_args(assets, tmp_path / "run", student=student, eval_fraction=0, **{"curriculum.alm": 1.0})
    run = setup(make_config(args))
    run.learner.eval()  # no dropout: the packed and the per-document forwards must see the same network
    reader = run.batches.source.reader
    data = reader.read_rows(reader.row_ids, ["segment_ids", "length"])
    segments = [int(data["segment_ids"][r, : int(n)].max()) + 1 for r, n in enumerate(data["length"].tolist())]
    rows = np.asarray([r for r, k in enumerate(segments) if k >= 3][:2])
    assert len(rows) == 2
    weights = weights_at(100, 100, run.cfg.curriculum)  # every term on
    with torch.no_grad():
        packed = run.batches.prepare_batch(rows)
        assert packed.aligned.segment_ids is not None
        _, packed_logs = run.learner(packed, weights)
        split = reader.read_rows(rows, [*run.batches.source.fields, "segment_ids"])
        documents = run.batches.build_batch(signal_from_arrays(split_segments(split, 32)[0]))
        assert documents.aligned.segment_ids is None  # each document alone: the plain 2D-mask path
        _, document_logs = run.learner(documents, weights)
    # Both batches hold the same positions in the same order, so every term (a mean over positions with a label,
    # over aligned pairs, or a batch statistic over them) is equal iff no position of the packed row sees another
    # document: the packed loss x its count is the sum of the documents' losses x theirs.
    assert int(packed.aligned.batch_idx.numel()) == int(documents.aligned.batch_idx.numel()) > 20
    boundaries = int(packed.aligned.segment_ids.max(dim=1).values.sum())  # a document's last token has no label
    packed_labels = int((packed.aligned.attention_mask.sum(dim=1) - 1).sum()) - boundaries
    assert packed_labels == int((documents.aligned.attention_mask.sum(dim=1) - 1).sum())
    terms = [k for k in packed_logs if k.startswith("loss/") and k != "loss/total"]
    assert {"loss/kd", "loss/lm", "loss/alm", "loss/feature", "loss/attention", "loss/layerwise"} <= set(terms)
    assert "loss/contrastive" in terms and packed_logs["alm_chunks"] == document_logs["alm_chunks"] > 0
    for term in terms:
        assert packed_logs[term] == pytest.approx(document_logs[term], rel=1e-6, abs=1e-9), term  # measured: equal


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "cohere", "granite"])
def test_every_supported_family_keeps_packed_documents_apart(tokenizers, family, single_thread):
    """The probe stage 1 and stage 2 run before packing passes for each family, and fails for a forward that
    lets one document see another (here: the same model fed a plain causal mask over the packed row)."""
    from transformers import AutoModelForCausalLM

    from distill.pipeline.teacher.model import use_selective_attention
    from distill.pipeline.text.packing import check_packed_forward
    from tests.test_teacher_logits import family_config

    config, _ = family_config(family, len(tokenizers["teacher"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    use_selective_attention(model)
    check_packed_forward(model, family)
    base = model.get_decoder()
    leaky = lambda **kwargs: type(base).forward(base, **{**kwargs, "position_ids": None})  # noqa: E731
    base.forward = leaky
    with pytest.raises(ValueError, match="does not keep packed documents apart"):
        check_packed_forward(model, family)


@pytest.mark.parametrize("block", [64, 3])
def test_document_attention_is_the_masked_attention_within_each_document(block, monkeypatch):
    """[document-attention note]: causal sdpa on each document alone equals sdpa over the whole packed row under the
    block-diagonal causal mask at every real position, with GQA, in one call per document or in blocks of 3 queries
    ([causal-blocks note]: blocks that end inside and at the end of a document); padding gets zeros; a sliding window
    shorter than a document, a position bias or dropout keep the masked path."""
    import torch.nn.functional as F

    from distill.pipeline.teacher import model as teacher_model
    from distill.pipeline.teacher.model import document_attention, document_spans, within_documents

    monkeypatch.setattr(teacher_model, "CPU_QUERY_BLOCK", block)

    generator = torch.Generator().manual_seed(0)
    b, heads, kv_heads, width, d = 2, 4, 2, 12, 8
    query = torch.randn(b, heads, width, d, generator=generator)
    key, value = (torch.randn(b, kv_heads, width, d, generator=generator) for _ in range(2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    mask = torch.ones(b, width, dtype=torch.long)
    mask[1, 9:] = 0  # row 1: two documents, then 3 padding positions continuing the last one
    spans = document_spans(mask, positions)
    assert spans == [[(0, 4), (4, 7), (7, 12)], [(0, 5), (5, 9)]]
    assert document_spans(mask, None) == [[(0, 12)], [(0, 9)]]
    assert document_spans(mask.flip(1), None) is None  # left padding: the blocks keep their mask
    segment = (positions == 0).cumsum(dim=1)
    allowed = (segment[:, :, None] == segment[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    reference = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=allowed[:, None]
    ).transpose(1, 2)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.shape[2]) or sdpa(q, *a, **k)
    )
    output = document_attention(query, key, value, spans, d**-0.5)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    real = mask.bool()
    torch.testing.assert_close(output[real], reference[real], atol=1e-6, rtol=1e-5)
    assert (output[~real] == 0).all()
    lengths = [e - a for row in spans for a, e in row]  # one call per block of queries of each document
    assert calls == [min(block, n - q0) for n in lengths for q0 in range(0, n, block)]

    module = torch.nn.Module()
    assert within_documents(module, query, key, spans, 0.0, {"sliding_window": 5})
    assert not within_documents(module, query, key, spans, 0.0, {"sliding_window": 4})  # row 1's first is 5 long
    assert not within_documents(module, query, key, spans, 0.1, {})
    assert not within_documents(module, query, key, spans, 0.0, {"position_bias": torch.zeros(1)})
    module.is_causal = False
    assert not within_documents(module, query, key, spans, 0.0, {})


def test_attention_weights_of_documents_are_the_masked_weights(monkeypatch):
    """The head-averaged weights computed per document ([document-attention note]) equal those under the
    block-diagonal causal mask at every real query, over blocks of queries that cross documents."""
    from distill.pipeline.teacher import model as teacher_model
    from distill.pipeline.teacher.model import document_spans, mean_attention_weights

    generator = torch.Generator().manual_seed(1)
    b, heads, kv_heads, width, d = 2, 4, 2, 12, 8
    query = torch.randn(b, heads, width, d, generator=generator)
    key = torch.randn(b, kv_heads, width, d, generator=generator)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    mask = torch.ones(b, width, dtype=torch.long)
    mask[1, 9:] = 0
    segment = (positions == 0).cumsum(dim=1)
    allowed = (segment[:, :, None] == segment[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    monkeypatch.setattr(teacher_model, "ATTENTION_QUERY_BLOCK", 5)  # blocks start inside documents
    ours = mean_attention_weights(query, key, allowed[:, None], d**-0.5, document_spans(mask, positions))
    scores = query @ key.repeat_interleave(2, dim=1).transpose(2, 3) * d**-0.5
    reference = scores.masked_fill(~allowed[:, None], -torch.inf).softmax(dim=-1).mean(dim=1)  # (B, L, L)
    real = mask.bool()
    torch.testing.assert_close(ours[:, 0][real], reference[real], atol=1e-6, rtol=1e-5)
    masked = mean_attention_weights(query, key, allowed[:, None], d**-0.5)  # the masked branch: the same weights
    torch.testing.assert_close(masked[:, 0][real], reference[real], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_forward_teacher_per_document_is_the_models_own_eager_forward(tokenizers, family, monkeypatch):
    """[document-attention note] end to end: ``forward_teacher`` on a batch holding a packed row (two documents) and a
    right-padded one gives, at every real position, the hidden states and head-averaged attention maps of the same
    model run with eager attention on each document alone (Gemma 3: one block's window shorter than a document,
    which keeps its mask, and one full-attention block), with the documents cut into blocks of 2 queries
    ([causal-blocks note])."""
    import copy

    from transformers import AutoModelForCausalLM

    from distill.pipeline.teacher import model as teacher_model
    from distill.pipeline.teacher.model import forward_teacher, use_selective_attention
    from tests.test_teacher_logits import family_config

    calls = []
    per_document = teacher_model.document_attention
    monkeypatch.setattr(teacher_model, "document_attention", lambda *a: calls.append(1) or per_document(*a))
    monkeypatch.setattr(teacher_model, "CPU_QUERY_BLOCK", 2)
    config, _ = family_config(family, len(tokenizers["teacher"]))
    if family == "gemma3_text":
        config.sliding_window, config.layer_types = 4, ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    use_selective_attention(model)
    ids = torch.randint(5, len(tokenizers["teacher"]), (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        out = forward_teacher(model, ids, mask, True, [1, 2], positions)
        for row, a, e in ((0, 0, 5), (0, 5, 9), (1, 0, 6)):
            alone = eager.get_decoder()(
                input_ids=ids[row : row + 1, a:e], output_hidden_states=True, output_attentions=True
            )
            for layer in range(len(alone.hidden_states)):
                torch.testing.assert_close(
                    out.hidden_states[layer][row, a:e], alone.hidden_states[layer][0], atol=1e-5, rtol=1e-4
                )
            for layer in (1, 2):
                torch.testing.assert_close(
                    out.attentions[layer - 1][row, 0, a:e, a:e],
                    alone.attentions[layer - 1][0].mean(0),
                    atol=1e-5,
                    rtol=1e-4,
                )
                assert (out.attentions[layer - 1][row, 0, a:e, :a] == 0).all()  # nothing before its document
    assert len(calls) == (2 if family == "qwen3" else 1)  # Gemma 3: its windowed block (4 < 6) kept the mask
