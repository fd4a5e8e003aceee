"""cache/schema.py is the one home of the format's facts: field dtypes, root-array paths, the tokenizer hash.
These tests pin them to hand-written values and to the table readers without this package use
(docs/cache-format.md)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from distill.cache.schema import (
    FIELD_DTYPES,
    build_field_specs,
    field_dtype,
    root_array_path,
    root_array_shapes,
    row_bytes,
    tokenizer_sha256,
)

FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"
LAYOUT = {
    "seq_len": 8,
    "top_k": 4,
    "temperatures": [1.0, 2.0],
    "vocab_proj": False,
    "teacher_hidden_size": 16,
    "hidden_layers": [0, 2],
    "hidden_dim": 6,
    "hidden_pca": True,
    "hidden_standardized": True,
    "attention_layers": [2],
    "attention_topk": 3,
}


def test_the_format_doc_lists_the_dtypes_the_writer_uses():
    rows = re.findall(r"^\| `([a-z_]+)(?:/<l>)?` \| \[[^\]]*\] ([a-z0-9]+)", FORMAT_DOC.read_text(), re.M)
    documented = {name: dtype.replace("string", "str") for name, dtype in rows}
    assert documented.pop("attn_ids") == "int16" and field_dtype("attn_ids/2", 32767) == "int16"
    assert documented == FIELD_DTYPES


def test_field_specs_take_their_dtypes_from_the_table():
    specs = build_field_specs(LAYOUT)
    assert sorted(specs) == sorted(
        ["input_ids", "length", "row_id", "doc_id", "offsets", "text", "topk_ids", "topk_logits", "lse"]
        + ["target_logprob", "hidden/0", "hidden/2", "attn/2", "attn_ids/2"]
    )
    assert all(spec.dtype == field_dtype(name, 8) for name, spec in specs.items())
    assert specs["lse"].row_shape == (8, 2) and specs["hidden/2"].row_shape == (8, 6)
    assert field_dtype("attn_ids/2", 32768) == "int32"
    by_hand = {  # bytes per row: elements x itemsize
        "input_ids": 8 * 4, "length": 4, "row_id": 8, "doc_id": 8, "offsets": 16 * 4, "text": 1,
        "topk_ids": 32 * 4, "topk_logits": 32 * 2, "lse": 16 * 4, "target_logprob": 8 * 4,
        "hidden/0": 48 * 2, "hidden/2": 48 * 2, "attn/2": 24 * 2, "attn_ids/2": 24 * 2,
    }  # fmt: skip
    assert row_bytes(LAYOUT) == sum(by_hand.values()) == 693


def test_root_arrays_have_one_path_scheme():
    assert root_array_path("stats", 6, "mean") == "stats/hidden/6/mean"
    assert root_array_shapes(LAYOUT) == {
        f"{group}/hidden/{layer}/{name}": shape
        for layer in (0, 2)
        for group, name, shape in [
            ("stats", "mean", (6,)),
            ("stats", "std", (6,)),
            ("standardize", "mean", (16,)),
            ("standardize", "std", (16,)),
            ("pca", "mean", (16,)),
            ("pca", "components", (16, 6)),
        ]
    }


def test_tokenizer_hash_covers_names_and_bytes_in_name_order():
    files = {"vocab.json": b"{}", "merges.txt": b"a b"}
    assert tokenizer_sha256(files) == hashlib.sha256(b"merges.txta b" + b"vocab.json{}").hexdigest()
    assert tokenizer_sha256({"merges.txt": b"a", "vocab.json": b"b{}"}) != tokenizer_sha256(files)
