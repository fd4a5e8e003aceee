"""distill eval: bits per byte by hand, top-1 agreement by hand, report files and plots."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distill.cache.reader import CacheReader
from distill.cli import app
from distill.config import ConfigError
from distill.pipeline.eval.categories import categorize_bytes
from distill.pipeline.eval.evaluate import evaluate_student, read_metrics, resolve_student
from distill.pipeline.eval.scores import (
    RowScores,
    bits_per_byte,
    bootstrap_bpb,
    build_student_spans,
    expected_calibration_error,
    find_boundaries,
    find_scored_range,
    gap_closed,
    percentile_interval,
    score_identical_bytes,
    score_row,
    sum_by_document,
)
from distill.pipeline.text.packing import split_segments
from tests.helpers import run_train, train_args


def test_bits_per_byte_gap_closed_and_ece_by_hand():
    nll = 3.0  # nats over 10 bytes
    assert bits_per_byte(nll, 10) == pytest.approx(3.0 / (math.log(2) * 10))
    assert gap_closed(0.8, 1.0, 0.6) == pytest.approx(0.5)
    assert expected_calibration_error(np.array([0.9, 0.9, 0.1]), np.array([1.0, 0.0, 0.0])) == pytest.approx(
        2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(0.0 - 0.1)
    )


@pytest.fixture(scope="module")
def runs(train_assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_runs")
    made = {}
    for name, settings in (
        ("kd", {}),
        ("ce_only", {"curriculum.kd": 0, "curriculum.disabled": "[kd,feature,attention,layerwise,contrastive]"}),
    ):
        out = root / name
        run_train(train_args(train_assets, out, **settings), steps=4, log_every=1, eval_every=2)
        made[name] = out
    return made


def test_eval_writes_report_with_every_metric_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", str(runs["kd"]), str(runs["ce_only"]), "--baseline", "ce_only", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["teacher_bpb"] > 0 and set(report["students"]) == {"kd", "ce_only"}
    for name, s in report["students"].items():
        for key in ("bpb", "kd_loss", "top1_agreement", "ece", "gap_closed"):
            assert key in s
        assert s["bpb"] > 0 and 0 <= s["top1_agreement"] <= 1 and 0 <= s["ece"] <= 1 and s["kd_loss"] > 0
    assert report["students"]["ce_only"]["gap_closed"] is None
    assert report["kd"] == {"mode": "tail", "temperature": 1.0}  # the one T of every model, not each run's
    kd = report["students"]["kd"]
    assert kd["gap_closed"] == pytest.approx(
        gap_closed(kd["bpb"], report["students"]["ce_only"]["bpb"], report["teacher_bpb"])
    )
    md = (out / "report.md").read_text()
    assert "| kd |" in md and "| ce_only |" in md and "Teacher bits per byte" in md
    for png in ("loss_terms.png", "curriculum.png", "eval.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # axes with curves, not an empty canvas


def test_top1_agreement_with_a_shared_tokenizer_equals_a_direct_argmax_comparison(train_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "same"
    run_train(train_args(train_assets, out, student="student_same_tok"), steps=2, eval_every=2)
    source = resolve_student(out, None, "eval")
    metrics, _ = evaluate_student(source, tmp_path / "vocab")
    assert metrics["same_tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    data = CacheReader(source.store).read_rows(source.rows, ["input_ids", "length", "topk_ids"])
    agree = total = 0
    with torch.no_grad():
        for i in range(len(source.rows)):
            n = int(data["length"][i])
            logits = model(input_ids=data["input_ids"][i : i + 1, :n]).logits[0]
            agree += int((logits.argmax(-1) == data["topk_ids"][i, :n, 0]).sum())
            total += n
    assert metrics["aligned_positions"] == metrics["top1_positions"] == total
    assert metrics["top1_unmapped_positions"] == 0
    assert metrics["top1_agreement"] == pytest.approx(agree / total)


# --- identical bytes, truncated students, row sets, top-1, intervals, store checks ----------------


def test_boundaries_and_scored_range_by_hand():
    # "Hello world!": teacher with a BOS, student without a prefix
    teacher = np.array([[0, 0], [0, 5], [5, 11], [11, 12]])
    student = np.array([[0, 3], [3, 5], [5, 8], [8, 12]])
    t_pos, t_ends = find_boundaries(teacher, kept=4)
    s_pos, s_ends = find_boundaries(student, kept=4)
    assert t_pos.tolist() == [0, 1, 2, 3] and t_ends.tolist() == [0, 5, 11, 12]  # the BOS closes text[:0]
    assert s_pos.tolist() == [0, 1, 2, 3] and s_ends.tolist() == [3, 5, 8, 12]
    # the student cannot score "Hel" (its first token) and shares no boundary at 3 with the teacher
    assert find_scored_range([t_ends, s_ends]) == (5, 12)
    with_bos = np.concatenate([[[0, 0]], student])
    assert find_scored_range([t_ends, find_boundaries(with_bos, kept=5)[1]]) == (0, 12)  # every byte
    assert find_scored_range([t_ends, find_boundaries(student, kept=2)[1]]) is None  # only 5 in common
    # a context cut inside a character: token 1 ends at 3 but the dropped token 2 starts inside it
    split = np.array([[0, 2], [2, 3], [2, 3], [3, 5]])
    assert find_boundaries(split, kept=2)[1].tolist() == [2]
    assert find_boundaries(split, kept=4)[1].tolist() == [2, 3, 5]


def test_bootstrap_interval_of_two_rows_spans_their_extremes():
    # two rows of one byte each: a resample's mean is a, (a + b) / 2 or b with chances 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are the extremes
    a, b = 1.0, 3.0
    samples = bootstrap_bpb(np.array([[a, b]]), np.array([1, 1]), resamples=1000, seed=0)
    assert samples.shape == (1000, 1)
    assert percentile_interval(samples[:, 0], 0.95) == pytest.approx((a / math.log(2), b / math.log(2)))
    again = bootstrap_bpb(np.array([[a, b]]), np.array([1, 1]), resamples=1000, seed=0)
    assert np.array_equal(samples, again)  # fixed seed
    flat = bootstrap_bpb(np.array([[2.0, 2.0, 2.0]]), np.array([1, 1, 1]), resamples=50, seed=0)
    assert percentile_interval(flat[:, 0], 0.95) == pytest.approx((2 / math.log(2), 2 / math.log(2)))


def brute_force_boundaries(spans: list[tuple[int, int]], kept: int, prefix: int) -> dict[int, int]:
    """Character c -> the model position after which its tokens consumed exactly text[:c], by brute force.

    spans: the text tokens of the WHOLE tokenization (kept or not); kept: text tokens the model reads;
    prefix: tokens before the text (a prefix model has consumed text[:0] at its last prefix position).
    """
    found = {0: prefix - 1} if prefix else {}
    for p in range(kept):
        c = spans[p][1]
        if all(e <= c for _, e in spans[: p + 1]) and all(s >= c for s, _ in spans[p + 1 :]):
            found[c] = prefix + p
    return found


def test_every_model_is_scored_on_identical_bytes_and_a_short_student_only_on_what_it_predicted(train_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.pipeline.text.tokens import prefix_ids

    short = tmp_path / "short"  # cross-tokenizer student with a 12-token context: rows are cut
    model = AutoModelForCausalLM.from_pretrained(train_assets["student"])
    model.config.max_position_embeddings = 12
    model.save_pretrained(short)
    AutoTokenizer.from_pretrained(train_assets["student"]).save_pretrained(short)
    same = train_assets["student_same_tok"]
    store = str(train_assets["store"])
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", str(short), str(same), "--cache", store, "--split", "all", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())

    reader = CacheReader(store)
    fields = ["input_ids", "length", "offsets", "text", "target_logprob"]
    data = reader.read_rows(reader.row_ids, [*fields, *(["segment_ids"] if reader.packed else [])])
    if reader.packed:  # each document of a packed row is scored as a row of its own ([packed-eval note])
        data, _ = split_segments(data, reader.layout["seq_len"])
    models = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in (("short", short), ("student_same_tok", same))
    }
    tokenizer = AutoTokenizer.from_pretrained(short)
    nll = {"teacher": 0.0, "short": 0.0, "student_same_tok": 0.0}
    nbytes = cut_rows = 0
    category_bytes: dict[str, int] = {}
    category_nll: dict[str, dict[str, float]] = {}
    for i, text in enumerate(data["text"]):
        n = int(data["length"][i])
        t_spans = [tuple(s) for s in data["offsets"][i, :n].tolist()]
        t_prefix = next((j for j, s in enumerate(t_spans) if s != (0, 0)), n)
        t_ids = data["input_ids"][i, :n]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        s_prefix = prefix_ids(tokenizer)
        kept = 12 - len(s_prefix)
        cut_rows += len(enc["input_ids"]) > kept
        s_ids = torch.tensor([s_prefix + enc["input_ids"][:kept]])
        found = {
            "teacher": brute_force_boundaries(t_spans[t_prefix:], n - t_prefix, t_prefix),
            "short": brute_force_boundaries(enc["offset_mapping"], min(kept, len(enc["input_ids"])), len(s_prefix)),
            "student_same_tok": brute_force_boundaries(t_spans[t_prefix:], n - t_prefix, t_prefix),
        }
        common = sorted(set.intersection(*(set(f) for f in found.values())))
        if len(common) < 2:
            continue
        start, end = common[0], common[-1]
        nbytes += len(text[start:end].encode("utf-8"))
        token_nll = {"teacher": lambda p: -float(data["target_logprob"][i, p - 1])}  # p = the predicted position
        for name, ids in (("short", s_ids), ("student_same_tok", t_ids[None].long())):
            with torch.no_grad():
                logp = torch.log_softmax(models[name](input_ids=ids).logits[0].double(), -1)
            token_nll[name] = lambda p, logp=logp, ids=ids: -float(logp[p - 1, ids[0, p]])
        for a, b in zip(common[:-1], common[1:]):  # the segments every model predicts: [category-bytes note]
            category = categorize_bytes(text[a:b].encode("utf-8"))
            category_bytes[category] = category_bytes.get(category, 0) + len(text[a:b].encode("utf-8"))
            for name, one in token_nll.items():
                value = sum(one(p) for p in range(found[name][a] + 1, found[name][b] + 1))
                nll[name] += value
                category_nll.setdefault(category, {}).setdefault(name, 0.0)
                category_nll[category][name] += value
    assert cut_rows > 0 and nbytes > 0
    by_category = report["category_bpb"]
    assert {c: e["bytes"] for c, e in by_category.items()} == category_bytes and len(category_bytes) >= 3
    for category, entry in by_category.items():
        for name, value in category_nll[category].items():
            assert entry["bpb"][name] == pytest.approx(bits_per_byte(value, category_bytes[category]), rel=1e-5)
    assert "| model | words" in (out / "report.md").read_text()
    assert report["scored_bytes"] == report["teacher_bytes"] == nbytes
    assert report["teacher_bpb"] == pytest.approx(bits_per_byte(nll["teacher"], nbytes))
    for name in ("short", "student_same_tok"):
        s = report["students"][name]
        assert s["bytes"] == nbytes
        assert s["bpb"] == pytest.approx(bits_per_byte(nll[name], nbytes), rel=1e-5)
        lo, hi = s["bpb_ci"]
        assert lo <= s["bpb"] <= hi
    lo, hi = report["teacher_bpb_ci"]
    assert lo <= report["teacher_bpb"] <= hi
    documents = np.unique(reader.read_rows(reader.row_ids, ["doc_id"])["doc_id"].numpy()).size  # of first segments
    assert report["bootstrap"] == {
        "resamples": 1000,
        "seed": 0,
        "confidence": 0.95,
        "unit": "documents",
        "documents": documents,
        "packed_rows_kept_whole": reader.packed,
    }
    assert documents < report["rows"]  # the long document spans rows: fewer units than rows


def test_top1_agreement_leaves_out_teacher_tokens_without_a_student_token(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.pipeline.text.align import align_offsets, build_vocab_map

    source = resolve_student(runs["kd"], None, "eval")
    metrics, _ = evaluate_student(source, tmp_path / "vocab")
    reader = CacheReader(source.store)
    tokenizer = AutoTokenizer.from_pretrained(source.model_dir)
    vocab_map = build_vocab_map(reader.load_tokenizer(), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=torch.float32).eval()
    data = reader.read_rows(source.rows, ["length", "offsets", "text", "topk_ids"])
    agree = compared = unmapped = 0
    for i, text in enumerate(data["text"]):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        alignment = align_offsets(data["offsets"][i], int(data["length"][i]), enc["offset_mapping"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
        for t, s in zip(alignment.teacher_pos.tolist(), alignment.student_pos.tolist()):
            target = int(vocab_map[int(data["topk_ids"][i, t, 0])])
            if target < 0:
                unmapped += 1
                continue
            compared += 1
            agree += int(int(logits[s].argmax()) == target)
    assert unmapped > 0 and compared > 0
    assert metrics["top1_unmapped_positions"] == unmapped
    assert metrics["top1_positions"] == compared
    assert metrics["top1_agreement"] == pytest.approx(agree / compared)


def test_students_held_out_on_other_rows_are_scored_on_their_intersection(runs, tmp_path):
    kd = tmp_path / "kd_subset"
    shutil.copytree(runs["kd"], kd)
    saved = json.loads((kd / "config.json").read_text())
    full = saved["eval_rows"]
    saved["eval_rows"] = full[: len(full) // 2 + 1]
    (kd / "config.json").write_text(json.dumps(saved))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", str(kd), str(runs["ce_only"]), "--baseline", "ce_only", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == len(saved["eval_rows"])
    assert all(s["rows"] == len(saved["eval_rows"]) for s in report["students"].values())
    assert report["students"]["ce_only"]["rows_held_out"] == len(full)
    assert "intersection" in result.output and "intersection" in (out / "report.md").read_text()

    saved["eval_source"] = str(tmp_path / "another_store")
    (kd / "config.json").write_text(json.dumps(saved))
    refused = CliRunner().invoke(app, ["eval", str(kd), str(runs["ce_only"]), "--out", str(out)])
    assert refused.exit_code == 2
    assert "different stores" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_eval_verifies_the_store_and_writes_nothing_into_a_plain_model_folder(train_assets, tmp_path):
    model_dir = tmp_path / "plain"
    shutil.copytree(train_assets["student"], model_dir)
    before = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*"))
    store = tmp_path / "store"
    shutil.copytree(train_assets["store"], store)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", str(model_dir), "--cache", str(store), "--split", "all", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(model_dir) for p in model_dir.rglob("*")) == before
    assert list((out / "vocab_map").glob("vocab_map-*.npy"))

    chunk_file = store / "shards" / "00000" / "topk_logits" / "c" / "0" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk_file.write_bytes(bytes(data))
    result = CliRunner().invoke(
        app, ["eval", str(model_dir), "--cache", str(store), "--split", "all", "--out", str(out)]
    )
    assert result.exit_code == 1  # a damaged store is a failure, not a usage error
    assert "not sound" in result.stderr and "shard 00000 chunk 0" in result.stderr


def test_prefix_models_score_every_byte_whichever_way_the_prefix_is_listed():
    text = "ab cd"

    def one_row(scores: tuple[np.ndarray, np.ndarray]) -> RowScores:
        return RowScores([scores[0]], [scores[1]])

    # teacher row with its BOS: NLL of "ab" 1.0 (predicted at the BOS), " cd" 2.0
    teacher = score_row(np.array([[0, 0], [0, 2], [2, 5]]), 3, np.array([1.0, 2.0]))
    # student with a BOS (id 7), tokens "a" "b" " cd" with NLL 0.5, 0.25, 4.0; align_batch may list the
    # prefix's (0, 0) span or only the text tokens' spans
    ids = np.array([7, 11, 12, 13])
    listed = build_student_spans(ids, [[0, 0], [0, 1], [1, 2], [2, 5]], [7])
    unlisted = build_student_spans(ids, [[0, 1], [1, 2], [2, 5]], [7])
    assert listed.tolist() == unlisted.tolist() == [[0, 0], [0, 1], [1, 2], [2, 5]]
    student = score_row(listed, 4, np.array([0.5, 0.25, 4.0]))
    no_prefix = build_student_spans(np.array([11, 12, 13]), [[0, 1], [1, 2], [2, 5]], [7])  # row without the BOS
    assert no_prefix.tolist() == [[0, 1], [1, 2], [2, 5]]
    nll, nbytes = score_identical_bytes([text], [one_row(teacher), one_row(student)])
    assert nbytes.tolist() == [5] and nll[:, 0].tolist() == [3.0, 4.75]
    # without its BOS the student cannot predict "a": every model starts after it, at the next shared boundary 2
    bare = score_row(no_prefix, 3, np.array([0.25, 4.0]))
    nll, nbytes = score_identical_bytes([text], [one_row(teacher), one_row(bare)])
    assert nbytes.tolist() == [3] and nll[:, 0].tolist() == [2.0, 4.0]


def test_metrics_with_a_torn_last_line_are_read_and_a_bad_line_is_named(runs, tmp_path):
    run_dir = tmp_path / "kd"
    shutil.copytree(runs["kd"], run_dir)
    metrics = run_dir / "metrics.jsonl"
    good = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(good) >= 4
    metrics.write_text(metrics.read_text() + '{"step": 5, "loss')  # a run killed mid-write
    assert read_metrics(run_dir) == good

    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # a torn record that is not the last line
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(metrics))}:2: not a JSON record"):
        read_metrics(run_dir)
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--out", str(tmp_path / "report")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: {metrics}:2: not a JSON record")
    assert not (tmp_path / "report").exists()  # refused before any scoring


# --- one temperature and one kd measure for every model; top-1 where the store has it; --cache -------------


def test_a_run_and_its_weights_as_a_plain_model_read_the_same_at_the_one_temperature(runs, train_assets, tmp_path):
    plain = tmp_path / "kd_weights"
    shutil.copytree(runs["kd"] / "final", plain)  # the same weights, as a plain model folder
    out = tmp_path / "report"
    args = ["eval", str(runs["kd"]), str(plain), "--cache", str(train_assets["store"]), "--split", "all"]
    result = CliRunner().invoke(app, [*args, "--temperature", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["kd"] == {"mode": "tail", "temperature": 2.0} and report["targets"] == "topk-fp16"
    run, weights = report["students"]["kd"], report["students"]["kd_weights"]
    assert run["trained_temperature"] == 1.0
    for key in ("kd_loss", "top1_agreement", "bpb"):
        assert run[key] == pytest.approx(weights[key], rel=1e-6), key
    assert "| kd (tail, T=2) |" in (out / "report.md").read_text() and "at T = 2 for every model" in result.output
    source = resolve_student(plain, str(train_assets["store"]), "all")
    assert evaluate_student(source, tmp_path / "vocab", 1.0)[0]["kd_loss"] != pytest.approx(run["kd_loss"], rel=1e-3)
    refused = CliRunner().invoke(app, [*args, "--temperature", "3", "--out", str(out)])
    assert refused.exit_code == 2 and "temperature 3.0 is not stored" in refused.stderr


@pytest.fixture(scope="module")
def sampled_store(tiny_assets, tmp_path_factory) -> Path:
    from tests.helpers import cache_args

    out = tmp_path_factory.mktemp("sampled") / "store"
    settings = dict(targets="sampled", hidden_layers="none", attention_layers="none", vocab_proj=None, max_rows=12)
    result = CliRunner().invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, **settings)])
    assert result.exit_code == 0, result.output
    return out


def test_cache_scores_a_run_on_another_store_only_with_split_all_and_top1_is_na_on_sampled_targets(
    runs, sampled_store, tmp_path
):
    out = tmp_path / "report"
    refused = CliRunner().invoke(app, ["eval", str(runs["kd"]), "--cache", str(sampled_store), "--out", str(out)])
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--split all" in refused.stderr and not out.exists()
    result = CliRunner().invoke(
        app, ["eval", str(runs["kd"]), "--cache", str(sampled_store), "--split", "all", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["store"] == str(sampled_store) and report["rows"] == len(CacheReader(str(sampled_store)).row_ids)
    assert report["kd"] == {"mode": "sampled", "temperature": 1.0}
    kd = report["students"]["kd"]
    assert kd["top1_agreement"] is None and kd["top1_positions"] is None and math.isfinite(kd["kd_loss"])
    md = (out / "report.md").read_text()
    assert "| kd (sampled, T=1) |" in md and "| n/a |" in md and "Top-1 agreement: n/a" in md


# --- the bootstrap resamples documents ------------------------------------------------------------


def test_rows_of_one_document_are_resampled_together():
    rows = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    documents = np.array([7, 3, 7, 3, 9])
    assert sum_by_document(rows, documents, 1).tolist() == [[6.0, 4.0, 5.0]]  # documents 3, 7, 9
    assert sum_by_document(np.array([1, 1, 1, 1, 1]), documents, 0).tolist() == [2, 2, 1]
    # two documents of ten rows each, the rows of a document alike: resampling rows counts twenty independent
    # rows where there are two, and gives too narrow an interval
    nll, nbytes, documents = np.array([[1.0] * 10 + [3.0] * 10]), np.ones(20, dtype=np.int64), np.repeat([0, 1], 10)
    by_row = percentile_interval(bootstrap_bpb(nll, nbytes)[:, 0])
    by_document = percentile_interval(
        bootstrap_bpb(sum_by_document(nll, documents, 1), sum_by_document(nbytes, documents, 0))[:, 0]
    )
    assert by_document == pytest.approx((1 / math.log(2), 3 / math.log(2)))  # all of one or all of the other
    assert by_document[1] - by_document[0] > by_row[1] - by_row[0]


def test_plot_lines_differ_in_colour_and_equal_curves_stay_visible():
    from distill.pipeline.eval.evaluate import line_style

    styles = [line_style(i) for i in range(11)]  # the curriculum plot's 11 weights
    assert len({tuple(s["color"]) for s in styles}) == 11
    # kd and lm_unaligned follow one weight: neighbours in sorted order are drawn with different dashes
    assert all(a["linestyle"] != b["linestyle"] for a, b in zip(styles, styles[1:]))


def test_the_cli_prints_no_transformers_progress_bar_per_model_load(train_assets, tmp_path):
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    command = [sys.executable, "-m", "distill.cli", "eval", str(train_assets["student"]), "--cache",
               str(train_assets["store"]), "--split", "all", "--out", str(tmp_path / "report")]  # fmt: skip
    proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bits/byte" in proc.stdout or "bpb" in proc.stdout.lower()
    assert "Loading weights" not in proc.stdout + proc.stderr


def test_a_run_scored_on_a_store_of_other_targets_is_warned(runs, train_assets, tmp_path):
    from tests.helpers import cache_args

    store = tmp_path / "sampled"
    made = CliRunner().invoke(app, ["cache-teacher", *cache_args(train_assets, store, targets="sampled")])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(
        app, ["eval", str(runs["kd"]), "--cache", str(store), "--split", "all", "--out", str(tmp_path / "report")]
    )
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning: kd was trained on")]
    assert len(warning) == 1 and "topk-fp16 targets" in warning[0] and "sampled targets" in warning[0]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["students"]["kd"]["trained_targets"] == "topk-fp16" and report["targets"] == "sampled"
    same = CliRunner().invoke(app, ["eval", str(runs["kd"]), "--out", str(tmp_path / "same")])
    assert same.exit_code == 0 and "warning: kd was trained on" not in same.output
