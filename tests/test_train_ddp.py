"""torchrun --nproc_per_node 2 (gloo, CPU), under DDP and under FSDP2: the same loss curve as one process with
the same global batch; a killed run resumed with --resume auto ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import communicate_or_kill, descendants, kill_tree, read_metrics, spawn, train_args

STEPS = 12
# layerwise and contrastive start at steps 6 and 8: the run is killed (and resumed) from a checkpoint saved before
# their modules had any optimizer state
LATE_TERMS = {"curriculum.layerwise_ramp": "[0.5,0.6]", "curriculum.contrastive_ramp": "[0.7,0.8]"}


def command(args: list[str], ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "distill.cli", "train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "distill.cli",
        "train",
        *args,
    ]


LAUNCHED: list[subprocess.Popen] = []


def launch(args: list[str], ranks: int) -> subprocess.Popen:
    proc = spawn(command(args, ranks), start_new_session=True)  # its own process group, killed as one
    LAUNCHED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, err = communicate_or_kill(proc, timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(autouse=True)
def nothing_left_running():
    """Whatever a test launched and did not see end (a failure, a timeout) is killed with its tree after it."""
    yield
    while LAUNCHED:
        proc = LAUNCHED.pop()
        if proc.poll() is None:
            kill_tree(proc)


def run_args(assets: dict, out: Path, grad_accum: int, parallel: str = "ddp") -> list[str]:
    return [
        *train_args(
            assets, out, grad_accum=grad_accum, save_every=2, num_workers_prefetch=0, parallel=parallel, **LATE_TERMS
        ),
        "--max-steps",
        str(STEPS),
        "--log-every",
        "1",
        "--eval-every",
        "3",
    ]


def curve(out: Path) -> list[float]:
    return [r["loss/total"] for r in read_metrics(out) if r["split"] == "train"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def single_run(train_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "single"
    finish(launch(run_args(train_assets, out, grad_accum=4), ranks=1))
    return out


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def parallel_run(request, train_assets, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param) / request.param
    finish(launch(run_args(train_assets, out, grad_accum=2, parallel=request.param), ranks=2))
    return request.param, out


def test_two_ranks_match_one_process_with_the_same_global_batch(parallel_run, single_run):
    parallel, out = parallel_run
    a, b = curve(single_run), curve(out)
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-4)
    wa, wb = weights(single_run), weights(out)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["train"]["parallel"] == parallel
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [r["step"] for r in evals] == [3, 6, 9, 12]  # rank 0 alone writes


def test_a_killed_run_resumes_to_the_same_weights(train_assets, parallel_run, tmp_path):
    parallel, uninterrupted = parallel_run
    out = tmp_path / "killed"
    proc = launch(run_args(train_assets, out, grad_accum=2, parallel=parallel), ranks=2)
    deadline = time.time() + 300
    while time.time() < deadline:
        latest = out / "checkpoints" / "latest"
        if latest.exists():  # a periodic checkpoint (every 2 steps) is complete
            break
        time.sleep(0.05)
    kill_tree(proc)
    assert not (out / "final").exists(), "the run finished before it could be killed"
    assert json.loads((out / "checkpoints" / latest.read_text() / "meta.json").read_text())["step"] < 6
    finish(launch([*run_args(train_assets, out, grad_accum=2, parallel=parallel), "--resume", "auto"], ranks=2))
    wa, wb = weights(out), weights(uninterrupted)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


def test_a_launch_past_its_timeout_is_killed_with_every_process_below_it(tmp_path):
    """A stand-in for a hung torchrun: a parent whose child left its process group; nothing survives the timeout."""
    script = (
        "import os, subprocess, sys, time; subprocess.Popen(['sleep', '300'], start_new_session=True); time.sleep(300)"
    )
    proc = spawn([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 30
    while not descendants(proc.pid) and time.time() < deadline:
        time.sleep(0.05)
    below = descendants(proc.pid)
    assert below
    with pytest.raises(pytest.fail.Exception, match="still running after 1s"):
        communicate_or_kill(proc, timeout=1)
    time.sleep(0.2)
    for pid in [proc.pid, *below]:
        state = Path(f"/proc/{pid}/stat")
        assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z", f"pid {pid} still runs"
