"""Checkpoints that resume exactly, and the final HF-loadable student.

RUN_DIR/checkpoints/step_000120/
    state.pt     student, router/projectors, optimizer, scheduler, scaler, RNG states
    meta.json    human-readable: step, data cursor, early-stopping state, config, reason
RUN_DIR/checkpoints/latest   name of the newest complete checkpoint (written last)
RUN_DIR/final/               student.save_pretrained + its tokenizer + distill_modules.pt

A checkpoint is written to a temporary folder and renamed into place, then ``latest`` is
rewritten atomically: a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write ``state`` (torch.save) and ``meta`` (JSON) as checkpoint ``step``; keep the newest ``keep``."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / LATEST, name)
    prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """``auto``: the latest complete checkpoint of ``run_dir`` (None when there is none); else the given folder."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "state.pt").exists():
            raise FileNotFoundError(f"--resume {resume}: no state.pt there")
        return path
    latest = run_dir / CHECKPOINTS / LATEST
    if not latest.exists():
        return None
    path = run_dir / CHECKPOINTS / latest.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    meta = json.loads((path / "meta.json").read_text())
    return state, meta


def save_final(run_dir: Path, student: Any, tokenizer: Any, modules: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """The trained student in HF format (any HF tool loads it) plus the distill modules."""
    final = run_dir / "final"
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(modules.state_dict(), tmp / "distill_modules.pt")
    (tmp / "distill_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
