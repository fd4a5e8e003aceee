"""Stage 2's loss curve on the tiny models, pinned: 20 optimizer steps at the default objective (kd mode, curriculum
and term weights as shipped) from a fixed seed on CPU, each step's ``loss/total`` equal to the golden list to 1e-5.
A refactor that moves code changes no number; one that changes a number fails here and says at which step.
To regenerate after a change that means to move the curve: ``GOLDEN_PRINT=1 pytest tests/test_golden_curve.py -s``."""

from __future__ import annotations

import os

import pytest

from tests.helpers import read_metrics, run_train

GOLDEN = [
    3.7918707,
    3.3794248,
    3.6650938,
    3.4523932,
    4.2159300,
    3.3890861,
    3.7212837,
    3.6306487,
    4.0347323,
    3.4617916,
    3.9055409,
    3.7879044,
    4.2468126,
    3.9963075,
    4.2544158,
    3.7828838,
    3.4277741,
    3.8602976,
    3.8380883,
    4.4094005,
]  # fmt: skip


def test_the_default_objective_follows_the_golden_curve(train_assets, tmp_path, single_thread):
    out = tmp_path / "run"
    args = ["--cache", train_assets["store"], "--student", train_assets["student"], "--out", out]
    settings = {"grad_accum": 2, "num_workers_prefetch": 0, "eval_fraction": 0.1}
    args += [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    run_train([str(a) for a in args], steps=20, log_every=1, eval_every=1000)
    records = [r for r in read_metrics(out) if r["split"] == "train"]
    assert all(records[-1][f"weight/{term}"] > 0 for term in ("kd", "lm", "feature", "attention", "layerwise"))
    curve = [r["loss/total"] for r in records]
    if os.environ.get("GOLDEN_PRINT"):
        print("GOLDEN = [" + ", ".join(f"{x!r}" for x in curve) + "]")
    assert len(curve) == 20
    for step, (got, want) in enumerate(zip(curve, GOLDEN, strict=True), start=1):
        assert got == pytest.approx(want, abs=1e-5), f"step {step}: {got} != golden {want}"
