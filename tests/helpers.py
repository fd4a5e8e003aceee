"""Helpers shared by the test files: CLI arguments of small runs, running the real CLI in-process or as a
subprocess, and reading what a run or a store holds. Fixtures stay in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# --- CLI arguments -------------------------------------------------------------------------


def cache_args(assets: dict[str, Path], out: Path | str, **extra: object) -> list[str]:
    """CLI arguments of a small cache-teacher run on the tiny assets."""
    args = {
        "teacher": assets["teacher"],
        "dataset": assets["data"],
        "out": out,
        "seq-len": 32,
        "top-k": 16,
        "targets": "topk-fp16",  # the fixed top-K layout most tests read raw; tests/test_targets_e2e.py: the others
        "hidden-layers": "0,1,2",
        "attention-layers": "1,2",
        "attention-topk": 8,
        "batch-size": 4,
        "chunk-rows": 8,
        "calibration-rows": 8,
        "vocab-proj": True,  # pass vocab_proj=None to leave it out (the default of cache-teacher)
    }
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    flat = []
    for k, v in args.items():
        if v is True:
            flat.append(f"--{k}")
        elif v is not None:
            flat += [f"--{k}", str(v)]
    return flat


def train_args(
    assets: dict[str, Path], out: Path, student: str = "student", batch_size: int = 2, **settings: object
) -> list[str]:
    """CLI arguments of a short training run (all terms on from step 0 unless overridden)."""
    base = {
        "grad_accum": 2,
        "curriculum.kd_only_until": 0,
        "curriculum.feature_ramp": "[0,0]",
        "curriculum.attention_ramp": "[0,0]",
        "curriculum.layerwise_ramp": "[0,0]",
        "curriculum.contrastive_ramp": "[0,0]",
        "eval_fraction": 0.1,
        "num_workers_prefetch": 1,
    }
    base.update(settings)
    args = [
        "--cache",
        str(assets["store"]),
        "--student",
        str(assets[student]),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
    ]
    for key, value in base.items():
        args += ["--set", f"{key}={value}"]
    return args


# --- running the CLI -----------------------------------------------------------------------


def invoke(*args: object) -> Any:
    """``distill ARGS`` in-process (typer's CliRunner); returns its result, whatever the exit status."""
    from typer.testing import CliRunner

    from distill.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def run_train(
    args: list[str],
    steps: int,
    log_every: int | None = None,
    eval_every: int | None = None,
    extra: tuple[str, ...] = (),
) -> Any:
    """``distill train ARGS --max-steps STEPS ...`` through the real CLI; asserts it succeeded, returns the result."""
    flags = ["--max-steps", str(steps)]
    flags += ["--log-every", str(log_every)] if log_every is not None else []
    flags += ["--eval-every", str(eval_every)] if eval_every is not None else []
    result = invoke("train", *args, *flags, *extra)
    assert result.exit_code == 0, result.output
    return result


def config_from_args(cls: type, args: list[str]) -> Any:
    """The config a command built on ``cls`` (CacheConfig, TrainConfig) runs with, given ``args``: parsed by the
    real flags of distill/flags.py, without running the stage."""
    import typer
    from typer.testing import CliRunner

    from distill.flags import ConfigSources, config_flags

    seen = {}
    probe = typer.Typer()

    @probe.command()
    @config_flags(cls)
    def command(sources: ConfigSources) -> None:
        seen["cfg"] = sources.load()

    result = CliRunner().invoke(probe, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return seen["cfg"]


def subprocess_env(threads: int | None = 1) -> dict[str, str]:
    """The environment of a subprocess: this checkout first on the path; ``threads`` intra-op threads (None:
    torch's default, as an in-process run it is compared with)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return env if threads is None else {**env, "OMP_NUM_THREADS": str(threads)}


def launch_cli(args: list[str], threads: int | None = 1, **popen: Any) -> subprocess.Popen:
    """``python -m distill.cli ARGS`` as a subprocess, output captured as text."""
    return spawn([sys.executable, "-m", "distill.cli", *args], threads, **popen)


def spawn(command: list[str], threads: int | None = 1, **popen: Any) -> subprocess.Popen:
    """A subprocess in the repository with ``subprocess_env(threads)``, output captured as text."""
    options = dict(env=subprocess_env(threads), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.Popen(command, **{**options, **popen})


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    import contextlib

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (started with ``start_new_session=True``), its process group and every process below it
    (torchrun's workers are not all in its group), then reap it: nothing is left running."""
    import contextlib
    import signal

    pids = [proc.pid, *descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def communicate_or_kill(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc.communicate(timeout)``; past the timeout the whole tree is killed and the test fails saying so."""
    import pytest

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"{' '.join(map(str, proc.args))[:200]}: still running after {timeout:.0f}s; killed with its tree")


# --- reading results -----------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, Any]:
    """The student's and the added modules' tensors in ``run/final`` (module keys prefixed ``modules.``)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(run / "final" / "model.safetensors")
    modules = torch.load(run / "final" / "distill_modules.pt", weights_only=True)
    weights.update({f"modules.{k}": v for k, v in modules.items()})
    return weights


def assert_stores_equal(a: Path | str, b: Path | str) -> None:
    """Equal rows (every field, NaN-aware; text equal) and equal chunk checksums."""
    import numpy as np

    from distill.cache.reader import CacheReader

    ra, rb = CacheReader(str(a)), CacheReader(str(b))
    assert ra.num_rows == rb.num_rows and ra.fields == rb.fields
    batch_a, batch_b = ra.read_rows(ra.row_ids), rb.read_rows(rb.row_ids)
    for name in ra.fields:
        if name == "text":
            assert batch_a[name] == batch_b[name]
        else:
            assert np.array_equal(batch_a[name].numpy(), batch_b[name].numpy(), equal_nan=True), name
    assert [s["checksums"] for s in ra.shards] == [s["checksums"] for s in rb.shards]
