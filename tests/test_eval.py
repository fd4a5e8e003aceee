"""distill eval: bits per byte by hand, top-1 agreement by hand, report files and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from distill.cache.reader import CacheReader
from distill.cli import app
from distill.pipeline.evaluate import (
    bits_per_byte,
    evaluate_student,
    expected_calibration_error,
    gap_closed,
    resolve_student,
    scored_bytes,
)
from tests.conftest import run_train, train_args


def test_bits_per_byte_counts_the_utf8_bytes_of_the_scored_text():
    text = "Zoë 🤖 ok"  # Z o ë(2 bytes) space 🤖(4 bytes) space o k
    # first token "Zo" ends at character 2; scored text "ë 🤖 ok" = 2 + 1 + 4 + 1 + 2 = 10 bytes
    assert scored_bytes(text, 2) == 10
    nll = 3.0  # nats
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
    kd = report["students"]["kd"]
    assert kd["gap_closed"] == pytest.approx(
        gap_closed(kd["bpb"], report["students"]["ce_only"]["bpb"], report["teacher_bpb"])
    )
    md = (out / "report.md").read_text()
    assert "| kd |" in md and "| ce_only |" in md and "Teacher bits per byte" in md
    for png in ("loss_terms.png", "curriculum.png", "eval.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # axes with curves, not an empty canvas


def test_teacher_bpb_matches_a_hand_sum_over_target_logprob(runs):
    from distill.pipeline.evaluate import teacher_nll

    source = resolve_student(runs["kd"], None, "eval")
    reader = CacheReader(source.store)
    data = reader.read_rows(source.rows, ["target_logprob", "length", "offsets", "text"])
    nll, nbytes = 0.0, 0
    for i, text in enumerate(data["text"]):
        n = int(data["length"][i])
        nll -= float(data["target_logprob"][i, : n - 1].double().sum())
        nbytes += len(text[int(data["offsets"][i, 0, 1]) :].encode("utf-8"))
    assert teacher_nll(reader, source.rows) == (pytest.approx(nll), nbytes)


def test_top1_agreement_with_a_shared_tokenizer_equals_a_direct_argmax_comparison(train_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "same"
    run_train(train_args(train_assets, out, student="student_same_tok"), steps=2, eval_every=2)
    source = resolve_student(out, None, "eval")
    metrics = evaluate_student(source)
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
    assert metrics["aligned_positions"] == total
    assert metrics["top1_agreement"] == pytest.approx(agree / total)
