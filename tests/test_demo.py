"""distill demo end to end: a reduced run in the default tier, the full one (KD beats CE-only) in the slow tier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.pipeline.demo import DemoSettings, run_demo


def test_reduced_demo_runs_every_stage_and_reuses_them(tmp_path):
    settings = DemoSettings(num_docs=160, teacher_steps=20, train_steps=6, batch_size=4, cache_rows=64)
    report = run_demo(tmp_path, seed=0, settings=settings)
    assert set(report["students"]) == {"kd", "ce_only"} and report["baseline"] == "ce_only"
    assert report["teacher_bpb"] > 0 and all(s["bpb"] > 0 for s in report["students"].values())
    for stage in ("teacher pretraining", "cache-teacher (train)", "train (kd)", "train (ce_only)", "eval"):
        assert report["stage_seconds"][stage] > 0
    for path in ("report/report.md", "report/eval.png", "runs/kd/final/config.json", "runs/ce_only/metrics.jsonl"):
        assert (tmp_path / path).exists(), path
    kd_terms = json.loads((tmp_path / "runs/kd/metrics.jsonl").read_text().splitlines()[-2])
    assert any(k.startswith("weight/feature") for k in kd_terms)
    again = run_demo(tmp_path, seed=0, settings=settings)  # finished stages are reused, not redone
    assert "teacher pretraining" not in again["stage_seconds"] and "train (kd)" not in again["stage_seconds"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_demo_kd_beats_ce_only(tmp_path: Path, seed: int):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--seed", str(seed)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    kd, ce = report["students"]["kd"], report["students"]["ce_only"]
    assert kd["bpb"] < ce["bpb"] and kd["gap_closed_ci"][0] > 0.2  # clearly: the interval's low end, not just > 0
    assert sum(report["stage_seconds"].values()) < 600  # ~80 s of CPU (README); room for a busy machine
