"""What a run hands back, through the real CLI: the best student in final/, objective presets named in the run's
config and in eval's report, a throughput figure that leaves eval and checkpoint time out, and the log line's
smoothed loss and ETA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.pipeline.train.progress import (
    Pace,
    ThroughputWindow,
    debias_ema,
    eta_seconds,
    format_duration,
    format_line,
    update_ema,
)
from tests.helpers import cache_args, read_metrics, run_train, train_args


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval/loss"] for r in read_metrics(run_dir) if r["split"] == "eval"}


# --- the best student ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def unpacked_assets(train_assets, tmp_path_factory) -> dict:
    """The training assets with a store of one document piece per row (--packing none), on which the lr below
    was chosen to diverge."""
    store = tmp_path_factory.mktemp("stores") / "unpacked"
    result = CliRunner().invoke(app, ["cache-teacher", *cache_args(train_assets, store, packing="none")])
    assert result.exit_code == 0, result.output
    return {**train_assets, "store": store}


@pytest.fixture(scope="module")
def diverging_run(unpacked_assets, tmp_path_factory) -> tuple[Path, str]:
    """A run at a constant, far too high lr: its eval loss gets worse after the first steps, so best != last."""
    out = tmp_path_factory.mktemp("runs") / "diverging"
    args = train_args(unpacked_assets, out, lr=0.1, min_lr_ratio=1, warmup=0, keep_checkpoints=1, objective="kd-only")
    result = run_train(args, steps=6, log_every=1, eval_every=1)
    return out, result.stdout


def test_final_holds_the_best_student_outside_the_rotation(diverging_run):
    out, stdout = diverging_run
    losses = eval_losses(out)
    best_step = min(losses, key=losses.get)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and best_step < 6  # the run got worse: best != last
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_000005"]  # the rotation kept one
    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best == {"step": best_step, "eval_loss": losses[best_step]}
    final = json.loads((out / "final" / "final.json").read_text())
    assert final == {"step": best_step, "eval_loss": losses[best_step], "reason": "best eval loss"}
    weights = "model.safetensors"
    assert (out / "final" / weights).read_bytes() == (out / "checkpoints" / "best" / weights).read_bytes()
    assert f"(step {best_step}: best eval loss)" in stdout


def test_final_last_holds_the_last_step(unpacked_assets, diverging_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "last"
    args = train_args(unpacked_assets, out, lr=0.1, min_lr_ratio=1, warmup=0, keep_checkpoints=1, objective="kd-only")
    run_train(args, steps=6, log_every=1, eval_every=1, extra=("--final", "last"))
    losses = eval_losses(out)
    assert losses == eval_losses(diverging_run[0])  # the same run, deterministically
    final = json.loads((out / "final" / "final.json").read_text())
    assert final == {"step": 6, "eval_loss": losses[6], "reason": "last step"}
    last, best = load_file(out / "final" / "model.safetensors"), load_file(out / "checkpoints/best/model.safetensors")
    assert any(not last[k].equal(best[k]) for k in last)


def test_without_eval_final_is_the_last_step(train_assets, tmp_path):
    out = tmp_path / "no_eval"
    run_train(train_args(train_assets, out, eval_fraction=0, objective="ce"), steps=2)
    final = json.loads((out / "final" / "final.json").read_text())
    assert final == {"step": 2, "eval_loss": None, "reason": "no eval ran"}
    assert not (out / "checkpoints" / "best").exists()


# --- objective presets --------------------------------------------------------------------


@pytest.fixture(scope="module")
def logits_only_store(tiny_assets, tmp_path_factory) -> Path:
    """A store with no hidden states and no attention maps: enough for ce and kd-only, not for full."""
    out = tmp_path_factory.mktemp("stores") / "logits_only"
    args = cache_args(tiny_assets, out, hidden_layers="", attention_layers="", vocab_proj=None)
    result = CliRunner().invoke(app, ["cache-teacher", *args])
    assert result.exit_code == 0, result.output
    return out


def test_objective_ce_trains_lm_only_and_eval_names_it(train_assets, logits_only_store, tmp_path):
    assets = {**train_assets, "store": logits_only_store}
    runs = {}
    for objective in ("ce", "kd-only"):
        runs[objective] = tmp_path / objective
        args = train_args(assets, runs[objective])
        run_train(args, steps=3, log_every=1, eval_every=3, extra=("--objective", objective))
    train = [r for r in read_metrics(runs["ce"]) if r["split"] == "train"]
    assert len(train) == 3
    for r in train:
        assert {k for k in r if k.startswith("loss/")} == {"loss/total", "loss/lm"}
        assert r["weight/lm"] == 1.0 and r["loss/total"] == pytest.approx(r["loss/lm"])
    kd_train = [r for r in read_metrics(runs["kd-only"]) if r["split"] == "train"]
    assert all(
        {k for k in r if k.startswith("loss/")} <= {"loss/total", "loss/lm", "loss/lm_unaligned", "loss/kd"}
        for r in kd_train
    )
    saved = json.loads((runs["ce"] / "config.json").read_text())["train"]
    assert saved["objective"] == "ce"
    assert saved["curriculum"]["disabled"] == ["alm", "attention", "contrastive", "feature", "kd", "layerwise"]

    report_dir = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", str(runs["kd-only"]), str(runs["ce"]), "--baseline", "ce", "--out", str(report_dir)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    ce, kd = report["students"]["ce"], report["students"]["kd-only"]
    assert (ce["objective"], ce["terms"], ce["final_step"]) == ("ce", ["lm"], 3)
    assert (kd["objective"], kd["terms"]) == ("kd-only", ["kd", "lm"])
    assert ce["final_reason"] == "best eval loss"
    md = (report_dir / "report.md").read_text()
    assert "| ce | ce (lm), step 3: best eval loss |" in md and "| kd-only | kd-only (kd + lm)" in md


def test_objective_full_needs_the_hidden_states_ce_does_not(train_assets, logits_only_store, tmp_path):
    args = train_args({**train_assets, "store": logits_only_store}, tmp_path / "full")
    result = CliRunner().invoke(app, ["train", *args, "--max-steps", "1"])
    assert result.exit_code != 0 and "no attention maps" in result.output
    assert "--objective kd-only or ce" in result.output
    result = CliRunner().invoke(app, ["train", *args, "--max-steps", "1", "--objective", "sft"])
    assert result.exit_code != 0 and "--objective sft: use one of full, kd-only, ce" in result.output


# --- throughput ---------------------------------------------------------------------------


class Clock:
    """Injected times: each call returns the next value."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_smoothed_loss_is_a_debiased_ema_by_hand():
    assert update_ema(0.0, 2.0, beta=0.5) == 1.0 and debias_ema(1.0, 1, beta=0.5) == 2.0  # one value: itself
    ema = update_ema(1.0, 4.0, beta=0.5)  # 0.5 * 1 + 0.5 * 4
    assert ema == 2.5 and debias_ema(ema, 2, beta=0.5) == 2.5 / 0.75  # (0.5 * 2 + 1 * 4) / (0.5 + 1)
    pace = Pace()
    for loss in (3.0, 3.0, math.inf, 3.0):  # constant losses smooth to themselves; a non-finite one is skipped
        pace.add(0.1, loss)
    assert pace.updates == 3 and pace.smoothed_loss == pytest.approx(3.0, rel=1e-12)


def test_eta_is_the_mean_recent_step_time_after_warmup_times_the_steps_left():
    assert eta_seconds([0.25, 0.75], 10) == 5.0 and eta_seconds([], 10) is None
    pace = Pace(warmup=2, recent=3)
    for step_s in (9.0, 7.0, 1.0, 2.0, 3.0, 4.0):  # the first two (compilation) are left out; 1.0 is not recent
        pace.add(step_s, 1.0)
    assert list(pace.times) == [2.0, 3.0, 4.0] and pace.eta(100) == 300.0
    assert Pace(warmup=2).eta(100) is None
    assert [format_duration(s) for s in (None, 45, 2040, 7500)] == ["?", "45s", "34m", "2h05m"]
    logs = {"loss/total": 2.31, "loss/kd": 1.9, "loss/lm": 2.72, "aligned_share": 0.97}
    line = format_line(420, 10000, logs, 3e-4, 212, 38211, 2.35, 2040.0)
    assert line == (
        "step 00420/10000 (4.2%) | loss 2.31 (kd 1.9 lm 2.72) | ema 2.35 | lr 0.0003 | 212ms | tok/s 38,211 | "
        "aligned 0.97 | eta 34m"
    )


def test_throughput_leaves_out_paused_time():
    # window opens at t=0; 1,000 tokens of training; eval from t=10 to t=40; checkpoint from t=45 to t=55;
    # read at t=60: 60 s elapsed, 40 of them paused -> 20 s of training
    window = ThroughputWindow(clock=Clock(0.0, 10.0, 40.0, 45.0, 55.0, 60.0))
    window.tokens += 1000
    with window.pause():
        pass
    with window.pause():
        pass
    assert window.rate() == pytest.approx(1000 / 20)
    window = ThroughputWindow(clock=Clock(0.0, 8.0))  # nothing paused: the plain rate, tokens given
    assert window.rate(4000) == pytest.approx(500)
    window = ThroughputWindow(clock=Clock(90.0, 100.0, 101.0, 102.0, 103.0))
    window.reset()  # a new window at t=100 forgets what came before
    with window.pause():
        pass
    assert window.tokens == 0 and window.rate(10) == pytest.approx(10 / 2)
