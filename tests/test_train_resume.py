"""Stage 2 under interruption: SIGTERM (emergency checkpoint) and SIGKILL (last periodic checkpoint), then
--resume auto, give the same final weights as an uninterrupted run; a long run's log stays short."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import final_weights, launch_cli, read_metrics, run_train, train_args

STEPS = 24


def run_args(assets: dict, out: Path) -> list[str]:
    return [
        *train_args(assets, out, save_every=4, keep_checkpoints=3),
        "--max-steps",
        str(STEPS),
        "--log-every",
        "1",
        "--eval-every",
        "1000",
    ]


def last_logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, need_checkpoint: bool = False) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ready = not need_checkpoint or (out / "checkpoints" / "latest").exists()
        if last_logged_step(out) >= step and ready:
            return
        time.sleep(0.02)
    raise AssertionError(f"run ended or stalled before step {step}: {proc.poll()}")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def uninterrupted(train_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    proc = launch_cli(["train", *run_args(train_assets, out)], threads=None)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def test_sigterm_saves_an_emergency_checkpoint_and_resume_matches(train_assets, uninterrupted, tmp_path):
    out = tmp_path / "sigterm"
    proc = launch_cli(["train", *run_args(train_assets, out)], threads=None)
    wait_for_step(proc, out, STEPS // 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "emergency checkpoint saved" in err and not (out / "final").exists()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    assert meta["reason"] == f"signal {int(signal.SIGTERM)}" and STEPS // 2 <= meta["step"] < STEPS
    resumed = launch_cli(["train", *run_args(train_assets, out), "--resume", "auto"], threads=None)
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"at step {meta['step']}" in stdout
    assert_same_weights(out, uninterrupted)


def test_sigkill_resumes_from_the_last_periodic_checkpoint_and_matches(train_assets, uninterrupted, tmp_path):
    out = tmp_path / "sigkill"
    proc = launch_cli(["train", *run_args(train_assets, out)], threads=None)
    wait_for_step(proc, out, STEPS // 2, need_checkpoint=True)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    assert meta["reason"] == "periodic" and meta["step"] % 4 == 0
    resumed = launch_cli(["train", *run_args(train_assets, out), "--resume", "auto"], threads=None)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_same_weights(out, uninterrupted)


def test_a_run_prints_a_line_per_log_interval_and_nothing_per_step_or_eval_batch(train_assets, tmp_path, single_thread):
    off = {f"curriculum.{t}": 0 for t in ("feature", "attention", "layerwise", "contrastive")}
    args = train_args(train_assets, tmp_path / "long", batch_size=1, grad_accum=1, eval_rows=6, **off)
    result = run_train(args, steps=40, log_every=4, eval_every=10)
    lines = result.stdout.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    eval_lines = [line for line in lines if line.startswith("eval ")]
    assert len(step_lines) == 11 and len(eval_lines) == 4  # step 1, every 4th; evals at 10..40 (6 batches each)
    assert len(lines) <= len(step_lines) + len(eval_lines) + 5  # a summary at the end, nothing per step or batch
    shown = [re.search(r"\| loss (\S+) .*\| ema (\S+) \|.*\| eta (\S+)$", line).groups() for line in step_lines]
    assert shown[0][0] == shown[0][1]  # the smoothed loss of one step is that step's loss
    assert shown[0][2] == "?" and all(re.fullmatch(r"\d+s|\d+m|\d+h\d\dm", eta) for _, _, eta in shown[1:])
    records = read_metrics(tmp_path / "long")
    assert all(r["lr"] > 0 for r in records if r["split"] == "train")
