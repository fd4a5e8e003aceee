"""Fixtures of the real tier: the real assets (fetched once, tests/real/assets.py) and one end-to-end CLI run.

``real_run`` runs the real CLI as a user would (``python -m distill.cli``, one process per command) on
the real pair, once per session: Gemma 3 270M caches a train and a validation store of the pydoc text,
SmolLM2-135M trains from them for a few steps with every term switched on by the default curriculum,
and ``eval`` scores the run and the untrained student on the validation store. Its ``RealRun`` gives the
paths and the parsed outputs, so that tests can assert on the stores, the metrics and the report.

Sizes: the real tier must stay under ~20 minutes on 2 cores (Gemma 3 270M forwards ~100 tok/s in fp32,
SmolLM2-135M trains at ~70 tok/s), hence rows of 128 tokens, tens of rows and tens of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

SEQ_LEN = 128
TRAIN_ROWS = 24
VALIDATION_ROWS = 16
STEPS = 8
BATCH_SIZE = 2


@pytest.fixture(scope="session")
def real_assets() -> dict[str, Path]:
    """The real pair, the Qwen3 tokenizer and the pydoc text (keys: see ``assets.fetch_all``)."""
    from tests.real.assets import fetch_all

    return fetch_all()


@dataclass
class RealRun:
    """What one end-to-end run of the CLI on the real pair produced (``real_run``)."""

    assets: dict[str, Path]
    train_store: Path
    """Gemma's store of the first TRAIN_ROWS rows of text/train.jsonl."""
    validation_store: Path
    """Gemma's store of the first VALIDATION_ROWS rows of text/validation.jsonl (the run's held-out rows)."""
    run_dir: Path
    """``distill train`` output: config.json, metrics.jsonl, checkpoints, final/."""
    report_dir: Path
    """``distill eval`` output for the run and the untrained student (named ``smollm2-135m``)."""
    commands: dict[str, list[str]] = field(default_factory=dict)
    """Command name -> the CLI arguments it ran with."""
    logs: dict[str, str] = field(default_factory=dict)
    """Command name -> its stdout and stderr together (warnings included)."""

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.report_dir / "report.json").read_text())

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """The run's metrics.jsonl rows (train and eval lines)."""
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def reader(self, store: Path):
        """A ``CacheReader`` of one of the stores (its ``manifest``, ``read_rows``...)."""
        from distill.cache.reader import CacheReader

        return CacheReader(str(store))


def run_cli(args: list[str]) -> str:
    """``python -m distill.cli ARGS`` in its own process from the repository; returns stdout + stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["TQDM_DISABLE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"distill {' '.join(args)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


@pytest.fixture(scope="session")
def real_run(real_assets, tmp_path_factory) -> RealRun:
    """cache-teacher (train, validation) -> train -> eval through the real CLI on Gemma 3 270M -> SmolLM2-135M."""
    root = tmp_path_factory.mktemp("real_run")
    run = RealRun(
        assets=real_assets,
        train_store=root / "train_store",
        validation_store=root / "validation_store",
        run_dir=root / "runs" / "kd",
        report_dir=root / "report",
    )
    cache_flags = ["--seq-len", str(SEQ_LEN), "--batch-size", "4", "--chunk-rows", "8", "--calibration-rows", "8"]
    teacher = str(real_assets["gemma3"])
    for name, data, store, rows in (
        ("cache_train", real_assets["train"], run.train_store, TRAIN_ROWS),
        ("cache_validation", real_assets["validation"], run.validation_store, VALIDATION_ROWS),
    ):
        args = ["cache-teacher", "--teacher", teacher, "--dataset", str(data), "--out", str(store)]
        run.commands[name] = [*args, "--max-rows", str(rows), *cache_flags]
    run.commands["train"] = [
        "train",
        "--cache", str(run.train_store),
        "--eval-cache", str(run.validation_store),
        "--student", str(real_assets["smollm2"]),
        "--out", str(run.run_dir),
        "--max-steps", str(STEPS),
        "--batch-size", str(BATCH_SIZE),
        "--log-every", "1",
        "--eval-every", str(STEPS // 2),
        "--set", "grad_accum=1",
        "--set", "lr=5e-5",  # a pretrained student: the from-scratch default would wreck it in a few steps
    ]  # fmt: skip
    run.commands["eval"] = [
        "eval",
        str(run.run_dir),
        str(real_assets["smollm2"]),
        "--cache", str(run.validation_store),
        "--split", "all",
        "--baseline", real_assets["smollm2"].name,
        "--out", str(run.report_dir),
    ]  # fmt: skip
    for name, args in run.commands.items():
        run.logs[name] = run_cli(args)
    return run
