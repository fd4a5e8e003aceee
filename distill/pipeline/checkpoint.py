"""Checkpoints that resume exactly, and the final HF-loadable student.

RUN_DIR/checkpoints/step_000120/
    state.pt     student, router/projectors, optimizer, scheduler, scaler, RNG states
    meta.json    human-readable: step, data cursor, early-stopping state, config, reason
RUN_DIR/checkpoints/latest   name of the newest complete checkpoint (written last)
RUN_DIR/checkpoints/best/    the student at the lowest eval loss so far (as final/ holds it, with best.json:
                             step, eval loss); outside the rotation, replaced on each improvement
RUN_DIR/final/               student.save_pretrained + its tokenizer + distill_modules.pt, distill_meta.json
                             (the run's summary) and final.json (which step it is and why: --final best|last)

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
BEST = "best"


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


def write_student_dir(dest: Path, student: Any, tokenizer: Any, modules: torch.nn.Module, files: dict) -> Path:
    """``dest``: the student in HF format (any HF tool loads it), its tokenizer, the distill modules and the JSON
    ``files``; written beside it and swapped in by renames, so a reader never sees a half-written folder."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(modules.state_dict(), tmp / "distill_modules.pt")
    for name, data in files.items():
        (tmp / name).write_text(json.dumps(data, indent=2, default=str))
    swap_into_place(tmp, dest)
    return dest


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and removed after."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def save_best(run_dir: Path, student: Any, tokenizer: Any, modules: torch.nn.Module, step: int, loss: float) -> Path:
    """checkpoints/best: the student of ``step``, whose eval loss ``loss`` is the lowest so far."""
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "eval_loss": loss}
    return write_student_dir(run_dir / CHECKPOINTS / BEST, student, tokenizer, modules, {"best.json": meta})


def load_best_meta(run_dir: Path) -> dict[str, Any] | None:
    """best.json of checkpoints/best ({"step", "eval_loss"}), or None when there is no best student."""
    path = run_dir / CHECKPOINTS / BEST / "best.json"
    return json.loads(path.read_text()) if path.exists() else None


def save_final(
    run_dir: Path,
    student: Any,
    tokenizer: Any,
    modules: torch.nn.Module,
    meta: dict[str, Any],
    choice: dict[str, Any],
) -> Path:
    """final/: checkpoints/best when ``choice`` says "best eval loss", else the current student; plus the run's
    summary (distill_meta.json) and ``choice`` (final.json: step, eval_loss, reason)."""
    final = run_dir / "final"
    files = {"distill_meta.json": meta, "final.json": choice}
    if choice["reason"] != "best eval loss":
        return write_student_dir(final, student, tokenizer, modules, files)
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / CHECKPOINTS / BEST, tmp)
    (tmp / "best.json").unlink()
    for name, data in files.items():
        (tmp / name).write_text(json.dumps(data, indent=2, default=str))
    swap_into_place(tmp, final)
    return final
