"""`distill cache audit` on the tiny store: token categories by hand, and the figures against direct recounts."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distill.cache.reader import CacheReader
from distill.cli import app
from distill.pipeline.eval.categories import CATEGORIES, categorize_token
from distill.pipeline.text.align import align_offsets, build_vocab_map, tokenize_for_student
from distill.pipeline.text.packing import read_document_rows


@pytest.mark.parametrize(
    ("key", "category"),
    [
        (("bytes", b" the"), "words"),
        (("bytes", b"x2"), "words"),
        (("bytes", b"\n\n  "), "whitespace"),
        (("bytes", b" 2024"), "digits"),
        (("bytes", b"),"), "punctuation"),
        (("bytes", b" {}"), "code"),
        (("bytes", b"->"), "other"),  # '-' is prose, '>' is code: mixed
        (("bytes", "é".encode()), "multibyte"),
        (("bytes", b"\xe6"), "multibyte"),
        (("special", "<bos>"), "special"),
    ],
)
def test_categorize_token_golden(key, category):
    assert categorize_token(key) == category


def test_audit_json_matches_direct_recounts(train_assets, single_thread):
    from transformers import AutoTokenizer

    result = CliRunner().invoke(
        app, ["cache", "audit", str(train_assets["store"]), "--student", str(train_assets["student"]), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    categories = report["categories"]
    assert set(categories) == {*CATEGORIES, "all"}
    assert sum(categories[c]["positions"] for c in CATEGORIES) == categories["all"]["positions"] > 0
    for entry in categories.values():
        if entry["positions"]:
            masses = [entry[k] for k in ("mass_exact", "mass_prefix", "mass_unmapped", "mass_beyond_topk")]
            assert sum(masses) == pytest.approx(1.0, abs=1e-4) and min(masses) >= 0

    # direct recount: positions with a next token, how many are aligned, how many next tokens lack a student twin
    reader = CacheReader(str(train_assets["store"]))
    teacher_tok = AutoTokenizer.from_pretrained(train_assets["tokenizer"])
    student_tok = AutoTokenizer.from_pretrained(train_assets["student"])
    exact = build_vocab_map(teacher_tok, student_tok)
    # one row per document (packed stores; split_segments is checked in test_packing)
    data = read_document_rows(reader, reader.row_ids, ["input_ids", "length", "offsets", "text"])
    positions = aligned = unmatched = 0
    for r, n in enumerate(data["length"].tolist()):
        ids = data["input_ids"][r, :n].numpy()
        _, (student_spans,) = tokenize_for_student(student_tok, [data["text"][r]], 1 << 30)
        pairs = set(align_offsets(data["offsets"][r].numpy(), n, student_spans).teacher_pos.tolist())
        for p in range(n - 1):
            positions += 1
            aligned += p in pairs
            unmatched += exact[ids[p + 1]] < 0
    total = categories["all"]
    assert total["positions"] == positions
    assert total["aligned_rate"] == pytest.approx(aligned / positions)
    assert total["next_without_student_token"] == pytest.approx(unmatched / positions)
    assert (
        "category"
        in CliRunner()
        .invoke(app, ["cache", "audit", str(train_assets["store"]), "--student", str(train_assets["student"])])
        .stdout
    )


def test_audit_scores_the_teacher_against_the_student(train_assets, single_thread):
    # the teacher as its own student: both score the same bytes alike, so the teacher is not better
    result = CliRunner().invoke(
        app, ["cache", "audit", str(train_assets["store"]), "--student", str(train_assets["teacher"]), "--json"]
    )
    assert result.exit_code == 0, result.output
    same = json.loads(result.stdout)["teacher_vs_student"]
    assert same["rows"] > 0 and same["bytes"] > 0
    assert same["student_bpb"] == pytest.approx(same["teacher_bpb"], abs=1e-4)
    # the two float paths (stage 1's cached log-probs, the eval's forward) differ by rounding: well under the floor
    assert same["verdict"] == "not better" and max(map(abs, same["advantage_ci"])) < 1e-4
    table = CliRunner().invoke(app, ["cache", "audit", str(train_assets["store"]), "--student",
                                     str(train_assets["teacher"]), "--score-rows", "4"])  # fmt: skip
    assert table.exit_code == 0 and "will KD pay?" in table.stdout and "better than this student" in table.stdout
    # a random student with another tokenizer, scored on the same rows' identical bytes: a figure of its own
    other = CliRunner().invoke(
        app, ["cache", "audit", str(train_assets["store"]), "--student", str(train_assets["student"]), "--json"]
    )
    report = json.loads(other.stdout)["teacher_vs_student"]
    assert report["teacher_bpb"] != pytest.approx(report["student_bpb"], abs=1e-3)
    assert report["advantage"] == pytest.approx(report["student_bpb"] - report["teacher_bpb"])
    skipped = CliRunner().invoke(app, ["cache", "audit", str(train_assets["store"]), "--student",
                                       str(train_assets["student"]), "--json", "--score-rows", "0"])  # fmt: skip
    assert json.loads(skipped.stdout)["teacher_vs_student"] is None
