"""Real spans, the prefix (BOS) and refused tokenizers, checked by brute force across tokenizer families.

The oracle decodes every token prefix 0..t (`tokenizer.decode`, an independent path through the
tokenizer's own decoder) and records which text prefix it is exactly. The spans `encode_texts`
computes from token bytes must agree with it for every position, alignment built on them must
pair exactly the positions whose decoded prefixes are the same text prefix, and the student's
context cut must never end inside a character. Tokenizers are tiny ones trained in memory.
"""

from __future__ import annotations

import unicodedata

import datasets
import numpy as np
import pytest
from tokenizers import normalizers

from distill.config import ConfigError
from distill.pipeline.text.align import align_batch, align_offsets, find_clean_ends, tokenize_for_student
from distill.pipeline.text.data import RowBuilder, plan_rows
from distill.pipeline.text.tokens import (
    TokenizerError,
    check_tokenizer,
    compute_spans,
    encode_texts,
    find_clean_cut,
    prefix_ids,
)
from tests.tokenizer_utils import (
    CODE_SNIPPETS,
    add_bos,
    build_code_corpus,
    save_and_reload,
    train_byte_level_tokenizer,
    train_sentencepiece_style_tokenizer,
    train_wordpiece_tokenizer,
)

TEXTS = [
    CODE_SNIPPETS[0],
    CODE_SNIPPETS[2],
    "Le café était naïve; cafe\u0301 nai\u0308ve (combining accents).",
    "日本語の文章を読みます。東京は大きい。",
    "Family 👩\u200d👩\u200d👧 and thumbs 👍🏽🧪 together.",
    "Runs   of    spaces,\ttabs\t\tand\r\nCRLF lines.\r\n",
    "    leading indentation\n\n\n        deeper  # comment",
]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Every family that reproduces its text, saved and reloaded as real runs load them."""
    root = tmp_path_factory.mktemp("families")
    corpus = build_code_corpus()
    built = {
        "trimmed": train_byte_level_tokenizer(500, corpus, trim_offsets=True),
        "trimmed_small": train_byte_level_tokenizer(280, corpus, trim_offsets=True),
        "untrimmed": train_byte_level_tokenizer(400, corpus, trim_offsets=False),
        "nfc_bos": add_bos(train_byte_level_tokenizer(450, corpus, normalizer=normalizers.NFC())),
        "llama": add_bos(train_sentencepiece_style_tokenizer(500, corpus), "<s>"),
        "gemma": add_bos(train_sentencepiece_style_tokenizer(420, corpus, dummy_prefix=False)),
    }
    return {name: save_and_reload(tokenizer, root / name) for name, tokenizer in built.items()}


def decode_tokens(tokenizer, ids: list[int], text: str) -> str:
    """The text tokens `ids` of `text` stand for, by the tokenizer's own decoder.

    A Llama-style decoder strips one leading space, the dummy prefix; when `text` itself starts
    with a space no dummy was added, and the stripped space was the text's.
    """
    decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if check_tokenizer(tokenizer).dummy_prefix and text.startswith(" ") and ids:
        decoded = " " + decoded
    return decoded


def decoded_prefix_ends(tokenizer, ids: list[int], text: str) -> dict[int, int]:
    """Oracle: {n: t} for the last position t whose tokens 0..t decode to exactly text[:n] (n > 0).

    Compared after NFC on both sides (a tokenizer with an NFC normalizer decodes NFC text).
    """
    at_length = {unicodedata.normalize("NFC", text[:n]): n for n in range(1, len(text) + 1)}
    ends = {}
    for t in range(len(ids)):
        decoded = decode_tokens(tokenizer, ids[: t + 1], text)
        n = at_length.get(unicodedata.normalize("NFC", decoded)) if "\ufffd" not in decoded else None
        if n is not None:
            ends[n] = t
    return ends


def hf_spans(tokenizer, text: str) -> np.ndarray:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)


# --- spans ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["trimmed", "trimmed_small", "untrimmed", "nfc_bos", "llama", "gemma"])
def test_clean_ends_of_real_spans_match_decoded_prefixes(families, name):
    tokenizer = families[name]
    for text in TEXTS:
        [(ids, spans)] = encode_texts(tokenizer, [text])
        assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
        positions, ends = find_clean_ends(spans, len(spans))
        oracle = decoded_prefix_ends(tokenizer, ids.tolist(), text)
        assert dict(zip(ends.tolist(), positions.tolist())) == oracle, text
        assert spans[-1, 1] == len(text)  # the last token ends the text
        assert (np.diff(spans[:, 1]) >= 0).all() and (spans[:, 0] <= spans[:, 1]).all()


@pytest.mark.parametrize("name", ["trimmed", "untrimmed", "llama", "gemma"])
def test_each_whole_token_span_is_the_text_it_decodes_to(families, name):
    """Where tokens 0..t-1 and 0..t both decode to clean text prefixes, token t's text is its span's text."""
    tokenizer = families[name]
    for text in TEXTS:
        [(ids, spans)] = encode_texts(tokenizer, [text])
        previous = ""
        for t in range(len(ids)):
            decoded = decode_tokens(tokenizer, ids[: t + 1].tolist(), text)
            if "\ufffd" not in decoded and "\ufffd" not in previous and decoded.startswith(previous):
                start, end = spans[t]
                if end > start:
                    assert text[start:end] == decoded[len(previous) :], (text, t)
            previous = decoded


def test_untrimmed_byte_level_spans_equal_hf_offsets_trimmed_ones_do_not(families):
    """Untrimmed HF offsets are right (also for byte-split characters): real spans equal them; trimmed
    offsets leave out whitespace the token consumed ('ĊĠĠĠ' reported as '\\n')."""
    for text in TEXTS:
        [(_, spans)] = encode_texts(families["untrimmed"], [text])
        assert np.array_equal(spans, hf_spans(families["untrimmed"], text)), text
    [(ids, spans)] = encode_texts(families["trimmed"], [CODE_SNIPPETS[0]])
    tokens = families["trimmed"].convert_ids_to_tokens(ids.tolist())
    newline_indent = [t for t, token in enumerate(tokens) if token.startswith("Ċ") and token.endswith("ĠĠ")]
    assert newline_indent, tokens
    hf = hf_spans(families["trimmed"], CODE_SNIPPETS[0])
    for t in newline_indent:
        assert CODE_SNIPPETS[0][slice(*spans[t])] == "\n" + " " * (len(tokens[t]) - 1)
        assert CODE_SNIPPETS[0][slice(*hf[t])] == "\n"


def test_trimmed_hf_offsets_misalign_indented_code_real_spans_do_not(families):
    """The measured bug, small: pairs built on trimmed offsets read different text; real spans never do."""
    teacher, student = families["trimmed"], families["gemma"]
    wrong_before = 0
    for text in CODE_SNIPPETS:
        teacher_ids = teacher(text, add_special_tokens=False)["input_ids"]
        student_ids = student(text, add_special_tokens=False)["input_ids"]
        teacher_oracle = decoded_prefix_ends(teacher, teacher_ids, text)
        student_oracle = decoded_prefix_ends(student, student_ids, text)
        oracle = {(teacher_oracle[n], student_oracle[n]) for n in teacher_oracle.keys() & student_oracle.keys()}
        before = align_offsets(hf_spans(teacher, text), len(teacher_ids), hf_spans(student, text))
        wrong_before += len(set(zip(before.teacher_pos.tolist(), before.student_pos.tolist())) - oracle)
        [(_, teacher_spans)], [(_, student_spans)] = encode_texts(teacher, [text]), encode_texts(student, [text])
        after = align_offsets(teacher_spans, len(teacher_spans), student_spans)
        assert set(zip(after.teacher_pos.tolist(), after.student_pos.tolist())) == oracle, text
    assert wrong_before > 0


def test_nfc_tokenizer_spans_map_back_to_the_decomposed_text(families):
    tokenizer = families["nfc_bos"]
    text = "cafe\u0301 nai\u0308ve"  # 'é' and 'ï' as base + combining mark: 12 characters, NFC has 10
    [(ids, spans)] = encode_texts(tokenizer, [text])
    assert spans[-1, 1] == len(text)
    positions, ends = find_clean_ends(spans, len(spans))
    assert set(ends.tolist()) <= {1, 2, 3, 5, 6, 7, 8, 10, 11, 12}  # never between 'e' and its accent


def test_dummy_prefix_belongs_to_the_first_token_and_consumes_nothing(families):
    llama = families["llama"]
    profile = check_tokenizer(llama)
    assert profile.dummy_prefix and not check_tokenizer(families["gemma"]).dummy_prefix
    [(ids, spans)] = encode_texts(llama, ["x y"])
    assert llama.convert_ids_to_tokens(ids.tolist())[0].startswith("\u2581")
    assert spans[0, 0] == 0 and spans[-1, 1] == 3
    [(ids, spans)] = encode_texts(llama, [" x"])  # Metaspace adds no dummy before a leading space
    assert spans[-1, 1] == 2 and spans[0].tolist() in ([0, 1], [0, 2])


# --- prefix (BOS) -------------------------------------------------------------------------------------


def test_prefix_ids_follow_the_post_processor(families):
    assert prefix_ids(families["trimmed"]) == [] and prefix_ids(families["untrimmed"]) == []
    for name, bos in [("nfc_bos", "<bos>"), ("llama", "<s>"), ("gemma", "<bos>")]:
        tokenizer = families[name]
        assert prefix_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(bos)]
        assert check_tokenizer(tokenizer).prefix == (tokenizer.convert_tokens_to_ids(bos),)


@pytest.mark.parametrize(
    ("teacher_name", "student_name"),
    [("gemma", "trimmed"), ("trimmed", "llama"), ("nfc_bos", "gemma"), ("llama", "trimmed_small")],
)
def test_align_batch_pairs_equal_the_decoded_prefix_oracle_and_skip_prefixes(families, teacher_name, student_name):
    teacher, student = families[teacher_name], families[student_name]
    teacher_prefix, student_prefix = check_tokenizer(teacher).prefix, check_tokenizer(student).prefix
    width = 160
    input_ids = np.zeros((len(TEXTS), width), dtype=np.int64)
    offsets = np.zeros((len(TEXTS), width, 2), dtype=np.int64)
    lengths = np.zeros(len(TEXTS), dtype=np.int64)
    for b, (ids, spans) in enumerate(encode_texts(teacher, TEXTS)):  # cache-style rows, prefix first
        n = len(teacher_prefix) + len(ids)
        input_ids[b, :n] = list(teacher_prefix) + ids.tolist()
        offsets[b, len(teacher_prefix) : n] = spans
        lengths[b] = n
    batch = align_batch(TEXTS, offsets, lengths, student, max_length=width)
    assert batch.num_prefix == len(student_prefix)
    assert (batch.input_ids[:, : len(student_prefix)] == torch_tensor(student_prefix)).all()
    assert batch.text_end.tolist() == [len(text) for text in TEXTS]
    pairs = set(zip(batch.batch_idx.tolist(), batch.teacher_pos.tolist(), batch.student_pos.tolist()))
    expected = set()
    for b, text in enumerate(TEXTS):
        teacher_ids = input_ids[b, len(teacher_prefix) : lengths[b]].tolist()
        student_ids = batch.input_ids[b, len(student_prefix) : int(batch.attention_mask[b].sum())].tolist()
        teacher_oracle = decoded_prefix_ends(teacher, teacher_ids, text)
        student_oracle = decoded_prefix_ends(student, student_ids, text)
        for n in teacher_oracle.keys() & student_oracle.keys():
            expected.add((b, teacher_oracle[n] + len(teacher_prefix), student_oracle[n] + len(student_prefix)))
    assert pairs == expected
    assert all(t >= len(teacher_prefix) and s >= len(student_prefix) for _, t, s in pairs)


def torch_tensor(values):
    import torch

    return torch.tensor(list(values), dtype=torch.int64)


def test_identity_path_never_aligns_the_prefix(families):
    tokenizer = families["gemma"]
    prefix = list(check_tokenizer(tokenizer).prefix)
    rows = encode_texts(tokenizer, TEXTS[:3])
    width = max(len(ids) for ids, _ in rows) + 1
    input_ids = np.zeros((3, width), dtype=np.int64)
    offsets = np.zeros((3, width, 2), dtype=np.int64)
    lengths = np.array([len(ids) + 1 for ids, _ in rows])
    for b, (ids, spans) in enumerate(rows):
        input_ids[b, : lengths[b]] = prefix + ids.tolist()
        offsets[b, 1 : lengths[b]] = spans
    batch = align_batch(TEXTS[:3], offsets, lengths, tokenizer, 512, teacher_input_ids=input_ids, same_tokenizer=True)
    assert batch.num_prefix == 1 and batch.aligned_share == 1.0
    assert batch.teacher_pos.tolist() == batch.student_pos.tolist()
    assert batch.batch_idx.tolist() == [b for b in range(3) for _ in range(lengths[b] - 1)]
    assert 0 not in batch.student_pos.tolist()
    with pytest.raises(ValueError, match="prefix"):  # a cache made without the BOS
        align_batch(
            TEXTS[:1],
            offsets[:1, 1:],
            lengths[:1] - 1,
            tokenizer,
            512,
            teacher_input_ids=input_ids[:1, 1:],
            same_tokenizer=True,
        )


# --- the student's context cut -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["trimmed_small", "llama", "nfc_bos"])
def test_context_cut_never_ends_inside_a_character(families, name):
    tokenizer = families[name]
    prefix = check_tokenizer(tokenizer).prefix
    text = TEXTS[3] + TEXTS[4] + TEXTS[2]  # CJK and emoji: byte-split by these small vocabularies
    [(all_ids, _)] = encode_texts(tokenizer, [text])
    for max_length in range(len(prefix) + 1, len(prefix) + len(all_ids) + 2):
        [ids], [spans] = tokenize_for_student(tokenizer, [text], max_length)
        assert ids[: len(prefix)].tolist() == list(prefix) and (spans[: len(prefix)] == 0).all()
        assert len(ids) <= max_length
        end = int(spans[:, 1].max(initial=0))
        decoded = decode_tokens(tokenizer, ids[len(prefix) :].tolist(), text)
        assert unicodedata.normalize("NFC", decoded) == unicodedata.normalize("NFC", text[:end]), max_length
        for dropped in range(len(ids) + 1, min(max_length, len(prefix) + len(all_ids)) + 1):  # no longer clean cut
            longer = decode_tokens(tokenizer, all_ids[: dropped - len(prefix)].tolist(), text)
            assert "\ufffd" in longer, (max_length, dropped)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_for_student(tokenizer, [text], max_length=len(prefix))


def test_find_clean_cut_golden():
    spans = np.array([[0, 1], [1, 2], [1, 2], [1, 3], [2, 3], [3, 4]])  # tokens 1-4 split two characters
    assert [find_clean_cut(spans, 0, end) for end in range(1, 7)] == [1, 1, 1, 1, 5, 6]
    assert find_clean_cut(spans, 1, 4) == 1  # nothing clean after token 1 up to 4: keep none


# --- refused tokenizers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: train_wordpiece_tokenizer(300), "WordPiece"),
        (lambda: train_byte_level_tokenizer(300, normalizer=normalizers.Lowercase()), "Lowercase"),
        (lambda: train_byte_level_tokenizer(300, normalizer=normalizers.NFKC()), "NFKC"),
        (
            lambda: train_byte_level_tokenizer(
                300, normalizer=normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
            ),
            "StripAccents",
        ),
        (lambda: train_sentencepiece_style_tokenizer(300, byte_fallback=False), "unknown tokens"),
    ],
)
def test_tokenizers_that_cannot_reproduce_text_are_refused(tmp_path, build, reason):
    tokenizer = save_and_reload(build(), tmp_path / "refused")
    with pytest.raises(TokenizerError, match=reason) as caught:
        encode_texts(tokenizer, ["hello"])
    message = str(caught.value)
    assert str(tmp_path / "refused") in message and "\n" not in message
    assert isinstance(caught.value, ConfigError)  # the CLI prints it as a one-line error


def test_a_text_the_tokenizer_cannot_reproduce_is_refused(tmp_path):
    """Passing the probe is not enough: every text's bytes are checked (here an unknown character)."""
    from distill.pipeline.text.tokens import PROBE_TEXT

    tokenizer = train_sentencepiece_style_tokenizer(300, build_code_corpus() + [PROBE_TEXT], byte_fallback=False)
    profile = check_tokenizer(tokenizer)
    ids = np.asarray(tokenizer("Жук", add_special_tokens=False)["input_ids"], dtype=np.int64)
    with pytest.raises(TokenizerError, match="does not reproduce|do not reproduce"):
        compute_spans(profile, ids, "Жук")


# --- stage 1 rows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma", "trimmed_small"])
def test_rows_start_with_the_prefix_and_cut_cleanly(families, name):
    tokenizer = families[name]
    prefix = list(check_tokenizer(tokenizer).prefix)
    documents = [" ".join(TEXTS), "", TEXTS[4] * 3]
    dataset = datasets.Dataset.from_dict({"text": documents})
    seq_len = 12
    plan = plan_rows(dataset, "text", tokenizer, seq_len)
    assert plan.prefix == tuple(prefix) and plan.empty_documents == 1
    builder = RowBuilder(dataset, "text", tokenizer, plan)
    rows = [builder.row(r) for r in range(len(plan))]
    for doc in (0, 2):
        doc_rows = [row for row in rows if row.doc_id == doc]
        assert "".join(row.text for row in doc_rows) == documents[doc]
    for row in rows:
        assert len(row.input_ids) <= seq_len and row.input_ids[: len(prefix)].tolist() == prefix
        assert (row.offsets[: len(prefix)] == 0).all() and row.offsets[-1, 1] == len(row.text)
        decoded = tokenizer.decode(row.input_ids[len(prefix) :].tolist(), clean_up_tokenization_spaces=False)
        assert "\ufffd" not in decoded  # no row ends or starts inside a character
    with pytest.raises(ConfigError, match="seq-len"):
        plan_rows(dataset, "text", tokenizer, len(prefix))
