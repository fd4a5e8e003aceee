"""Checkpoints that resume exactly, and the final HF-loadable student.

RUN_DIR/checkpoints/step_000120/
    state.pt     tensors and plain values only (loaded with ``weights_only=True``: nothing is unpickled):
                 student, router/projectors, optimizer, scheduler, scaler, RNG states as tensors
    meta.json    human-readable: step, data cursor, early-stopping state, config, reason
RUN_DIR/checkpoints/latest   name of the newest complete checkpoint (written last)
RUN_DIR/checkpoints/best/    the student at the lowest eval loss so far (as final/ holds it, with best.json:
                             step, eval loss); outside the rotation, replaced on each improvement
RUN_DIR/final/               student.save_pretrained + its tokenizer + distill_modules.pt, distill_meta.json
                             (the run's summary) and final.json (which step it is and why: --final best|last)

A checkpoint is written to a temporary folder and renamed into place, then ``latest`` is
rewritten atomically: a crash mid-save leaves the previous checkpoint as the latest. A checkpoint
that cannot be read on ``--resume auto`` (damaged on disk) is skipped for the previous complete one,
with a message that says so.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"


STATE_KEYS = ("student", "modules", "optimizer", "scheduler", "scaler", "rng")
META_KEYS = ("step", "cursor", "best_eval", "bad_evals")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and says what to do."""


def capture_rng() -> dict[str, Any]:
    """Every RNG state as tensors and plain values, so that ``torch.load(weights_only=True)`` reads it back."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write ``state`` (torch.save) and ``meta`` (JSON) as checkpoint ``step``; keep the newest ``keep``.

    A write that fails (a full disk) removes the half-written folder and raises OSError naming it: the
    previous checkpoint stays the latest."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as f:  # a file object: write errors surface as OSError, not "unexpected pos"
            torch.save(state, f)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise as_os_error(exc, tmp / "state.pt") from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(root / LATEST, name)
    prune_checkpoints(root, keep)
    return final


def as_os_error(exc: BaseException, path: Path) -> OSError:
    """The OSError behind a failed write (torch reports a full disk as a RuntimeError), with the path it hit."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return OSError(cause.errno, cause.strerror or str(cause), str(path))
    try:  # torch's writer hides the errno: ask the file system
        if shutil.disk_usage(path.parent.parent).free < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    except OSError:
        pass
    return OSError(errno.EIO, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, str(path))


def prune_checkpoints(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """``auto``: the latest complete checkpoint of ``run_dir`` (None when there is none); else the given folder."""
    candidates = resume_candidates(run_dir, resume)
    return candidates[0] if candidates else None


def resume_candidates(run_dir: Path, resume: str | None) -> list[Path]:
    """Checkpoints to try, best first: ``latest`` then the other complete ones, newest first (``auto``);
    the given folder alone otherwise."""
    if resume is None:
        return []
    if resume != "auto":
        path = Path(resume)
        if not (path / "state.pt").exists():
            raise CheckpointError(f"--resume {resume}: no state.pt there — pass a checkpoint folder or 'auto'")
        return [path]
    root = run_dir / CHECKPOINTS
    done = sorted((p for p in root.glob("step_*") if (p / "state.pt").exists()), reverse=True)
    latest = root / LATEST
    named = root / latest.read_text().strip() if latest.exists() else None
    if named is not None and named in done:
        done.remove(named)
        done.insert(0, named)
    return done


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """State (tensors and plain values only: ``weights_only=True``) and meta of one checkpoint.

    Raises CheckpointError when it is damaged, was not written by ``distill train``, or holds anything but
    tensors and plain values (a crafted file cannot run code here)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        meta = json.loads((path / "meta.json").read_text())
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: state.pt holds objects other than tensors and plain values ({str(exc).splitlines()[0][:200]}) "
            "— it was not written by this version of `distill train`; it is not loaded"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        raise CheckpointError(f"{path}: cannot be read ({reason})") from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    missing += [f"meta.{k}" for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a `distill train` checkpoint (missing {', '.join(missing)})")
    return state, meta


def load_resume_checkpoint(
    run_dir: Path, resume: str | None, say: Any = print
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The checkpoint to resume from, loaded. With ``auto`` a damaged latest checkpoint falls back to the
    previous complete one, saying so; None when there is nothing to resume."""
    candidates = resume_candidates(run_dir, resume)
    errors = []
    for path in candidates:
        try:
            state, meta = load_checkpoint(path)
        except CheckpointError as exc:
            if resume != "auto":
                raise
            errors.append(str(exc))
            say(f"warning: {exc}; trying the previous checkpoint")
            continue
        if errors:
            say(f"falling back to {path} (step {meta['step']}): the newer checkpoint(s) could not be read")
        return path, state, meta
    if errors:
        raise CheckpointError(
            f"{run_dir}: no readable checkpoint ({len(errors)} damaged) — start again with --overwrite, "
            "or pass --resume with a good checkpoint folder"
        )
    return None


def write_student_dir(
    dest: Path, student: Any, tokenizer: Any, modules: torch.nn.Module, files: dict, state: dict | None = None
) -> Path:
    """``dest``: the student in HF format (any HF tool loads it), its tokenizer, the distill modules and the JSON
    ``files``; written beside it and swapped in by renames, so a reader never sees a half-written folder.
    ``state``: the learner's gathered state dict (``student.*``, ``aux.*``) when the modules hold shards
    (FSDP2, [sharded-state note] in distributed.py); None: the modules' own weights."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state is None:
        student.save_pretrained(tmp)
        torch.save(modules.state_dict(), tmp / "distill_modules.pt")
    else:
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
        student.save_pretrained(tmp, state_dict=share_tied(student, part("student.")))
        torch.save(part("aux."), tmp / "distill_modules.pt")
    tokenizer.save_pretrained(tmp)
    for name, data in files.items():
        (tmp / name).write_text(json.dumps(data, indent=2, default=str))
    swap_into_place(tmp, dest)
    return dest


def share_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with one tensor for each group of names that share a parameter in ``model`` (tied embeddings):
    gathered state dicts hold a copy per name, and ``save_pretrained`` drops a tied name only when it shares."""
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(tensor), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; an existing ``dest`` is moved aside first and removed after."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def save_best(
    run_dir: Path,
    student: Any,
    tokenizer: Any,
    modules: torch.nn.Module,
    step: int,
    loss: float,
    state: dict | None = None,
) -> Path:
    """checkpoints/best: the student of ``step``, whose eval loss ``loss`` is the lowest so far (``state``: see
    ``write_student_dir``)."""
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "eval_loss": loss}
    return write_student_dir(run_dir / CHECKPOINTS / BEST, student, tokenizer, modules, {"best.json": meta}, state)


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
    state: dict | None = None,
) -> Path:
    """final/: checkpoints/best when ``choice`` says "best eval loss", else the current student; plus the run's
    summary (distill_meta.json) and ``choice`` (final.json: step, eval_loss, reason)."""
    final = run_dir / "final"
    files = {"distill_meta.json": meta, "final.json": choice}
    if choice["reason"] != "best eval loss":
        return write_student_dir(final, student, tokenizer, modules, files, state)
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / CHECKPOINTS / BEST, tmp)
    (tmp / "best.json").unlink()
    for name, data in files.items():
        (tmp / name).write_text(json.dumps(data, indent=2, default=str))
    swap_into_place(tmp, final)
    return final
