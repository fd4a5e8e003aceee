"""The real CLI end to end on the real pair (Gemma 3 270M -> SmolLM2-135M, pydoc text): every output is finite."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.real.conftest import STEPS, TRAIN_ROWS, VALIDATION_ROWS

pytestmark = pytest.mark.real

FLOAT_FIELDS = ("topk_logits", "lse", "target_logprob", "hidden/", "attn/")


def is_float_field(name: str) -> bool:
    return any(name == f or (f.endswith("/") and name.startswith(f)) for f in FLOAT_FIELDS)


@pytest.mark.parametrize(("store", "rows"), [("train_store", TRAIN_ROWS), ("validation_store", VALIDATION_ROWS)])
def test_stores_are_complete_and_finite(real_run, store, rows):
    reader = real_run.reader(getattr(real_run, store))
    assert reader.num_rows == rows
    assert reader.manifest["teacher"]["model_type"] == "gemma3_text"
    fields = [name for name in reader.fields if is_float_field(name)]
    assert {"lse", "target_logprob"} <= set(fields)
    assert any(name.startswith("hidden/") for name in fields)
    fields.append("topk_logits")  # decoded from the compact targets (docs/cache-format.md, "Teacher targets")
    data = reader.read_rows(reader.row_ids, fields + ["length"] + (["segment_ids"] if reader.packed else []))
    lengths = np.asarray(data["length"])
    assert (lengths > 0).all()
    segments = np.asarray(data["segment_ids"]) if reader.packed else None
    for name in fields:
        values = np.asarray(data[name], dtype=np.float32)
        for row, n in enumerate(lengths):  # positions past a row's length are padding
            valid = np.ones(n, dtype=bool)
            if name == "target_logprob":  # NaN where no next token is in the same document: each segment's last
                valid[-1] = False
                if segments is not None:
                    valid[:-1] &= segments[row, : n - 1] == segments[row, 1:n]
            finite = np.isfinite(values[row, :n])
            assert finite[valid].all(), f"{store}: {name} has non-finite values in row {row}"
            if name == "target_logprob":
                assert not finite[~valid].any()


def test_train_logs_finite_terms_every_step(real_run):
    train = [m for m in real_run.metrics if m.get("split") == "train"]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    for m in train:
        losses = {k: v for k, v in m.items() if k.startswith(("loss/", "weighted/"))}
        assert losses and all(math.isfinite(v) for v in losses.values()), m
    # The default curriculum has every term on by the last step (kd-only first, then the ramps).
    last = train[-1]
    assert all(last[f"weight/{term}"] > 0 for term in ("kd", "lm", "feature", "layerwise")), last
    evals = [m for m in real_run.metrics if m.get("split") == "eval"]
    assert evals and all(math.isfinite(v) for m in evals for k, v in m.items() if k.startswith("loss/"))
    assert (real_run.run_dir / "final" / "config.json").is_file()


def test_eval_report_is_finite(real_run):
    report = real_run.report
    assert 0 < report["teacher_bpb"] < 3
    student = real_run.assets["smollm2"].name
    assert set(report["students"]) == {real_run.run_dir.name, student}
    for name, result in report["students"].items():
        assert 0 < result["bpb"] < 3, (name, result)
        assert math.isfinite(result["kd_loss"]) and 0 <= result["top1_agreement"] <= 1, (name, result)
    assert (real_run.report_dir / "report.md").is_file()


def test_gap_closed_is_defined_exactly_when_the_teacher_beats_the_baseline(real_run):
    """On short rows of Python documentation, Gemma 3 270M (Q4 weights) and SmolLM2-135M are close: the report
    gives the gap closed only when the teacher is better than the baseline, and null (n/a) otherwise."""
    report = real_run.report
    baseline = report["students"][real_run.assets["smollm2"].name]["bpb"]
    gap = report["students"][real_run.run_dir.name]["gap_closed"]
    if report["teacher_bpb"] < baseline:
        assert gap is not None and math.isfinite(gap)
    else:
        assert gap is None
