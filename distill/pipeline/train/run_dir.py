"""The run directory of ``distill train``: its lock, refusing to overwrite a run or to resume it with another store
or model, config.json, metrics.jsonl, final.json.

RUN_DIR/.lock            pid and host of the process training into it (held with flock while it runs)
RUN_DIR/config.json      the resolved config and what eval needs to score the same rows
RUN_DIR/metrics.jsonl    one JSON record per log step and per eval
RUN_DIR/checkpoints/     see checkpoint.py
RUN_DIR/final/           the student chosen by ``choose_final`` (final.json says which step and why)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.cache.schema import manifest_identity
from distill.config import ConfigError, TrainConfig, config_to_dict
from distill.pipeline.train.checkpoint import load_best_meta, resume_candidates


def choose_final(cfg: TrainConfig, run_dir: Path, step: int, best: float, last_eval: float | None) -> dict[str, Any]:
    """What final/ holds (final.json): the best student (eval loss ``best``, kept in checkpoints/best) when asked
    and an eval ran, else the last step."""
    best_meta = load_best_meta(run_dir)
    if cfg.final == "best" and best_meta is not None and best_meta["eval_loss"] == best:
        return {"step": best_meta["step"], "eval_loss": best, "reason": "best eval loss"}
    if not math.isfinite(best):
        return {"step": step, "eval_loss": None, "reason": "no eval ran"}
    return {"step": step, "eval_loss": last_eval, "reason": "last step"}


def write_run_config(run_dir: Path, cfg: TrainConfig, facts: Any, extra: dict[str, Any]) -> None:
    """RUN_DIR/config.json: the resolved config, the teacher-side maps and ``extra`` (what eval needs to score
    the same rows: eval_rows, eval_source, total_steps, world_size, cache_manifest)."""
    saved = {
        "train": config_to_dict(cfg),
        **extra,
        "same_tokenizer": facts.same_tokenizer,
        "layer_map": facts.layer_map,
        "attention_map": facts.attention_map,
    }
    (run_dir / "config.json").write_text(json.dumps(saved, indent=2, default=str))


def trim_metrics(path: Path, step: int) -> None:
    """On resume from ``step``: keep the records up to it, drop those written after the checkpoint (the resumed
    run writes them again) and any torn line a crash left, so the file stays one record per line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "config.json")


def require_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: a file, not a directory — choose another --out")


def prepare_run_dir(cfg: TrainConfig, delete: bool = True) -> None:
    """Refuse to start a second run into a run directory that holds one, unless told to resume or replace it."""
    import shutil

    run_dir = Path(cfg.out)
    require_dir(run_dir)
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found or cfg.resume is not None:
        return
    if not cfg.overwrite:
        raise ConfigError(
            f"--out {run_dir} holds a previous run ({', '.join(found)}) — pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    for name in found if delete else ():
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def write_record(metrics: Any, record: dict[str, Any], trackers: Any) -> None:
    """Append ``record`` to metrics.jsonl (rank 0 only: ``metrics`` is None elsewhere) and send it to the trackers."""
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    trackers.log({k: v for k, v in record.items() if k not in ("split", "step")}, record["step"])


# --- the lock: one process trains into a run directory at a time -----------------------------

LOCK = ".lock"


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR/.lock while the body runs; refuse in one line when another process holds it.

    The lock is an flock, which the kernel releases when its process dies, so the lock of a dead process is simply
    taken over. The file records the holder's pid and host for the refusal. Where the file system has no flock
    (some network file systems), that record alone decides: a live process on this host, or any on another host,
    holds the directory."""
    require_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = take_flock(fd)
        holder = read_lock_holder(path)
        if locked is None or (not locked and holder_lives(holder)):
            raise ConfigError(
                f"--out {run_dir} is being trained into by pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (lock {path}) — wait for that run to end or stop it, or choose another "
                "--out" + ("" if locked is None else f"; if that process is gone, delete {path}")
            )
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
        if not locked:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def take_flock(fd: int) -> bool | None:
    """True: this process holds the flock; None: another one does; False: the file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return None if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else False
    return True


def holder_lives(holder: dict[str, Any]) -> bool:
    """Whether the process a lock record names may still run (another host: it cannot be told, so yes)."""
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return int(holder["pid"]) != os.getpid()


def read_lock_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):  # written a moment ago, not yet filled in
        return {}
    return holder if isinstance(holder, dict) else {}


# --- resuming: the same store and model, other settings named --------------------------------

REFUSED_CHANGES = {"student": "--student"}  # the stores (--cache) are compared by content: check_stores_kept
NOT_COMPARED = ("resume", "overwrite", "out", "cache", "cache_weights")


def check_resume_settings(cfg: TrainConfig, manifests: list[dict[str, Any]], say: Any) -> None:
    """Before anything is loaded: the checkpoint ``--resume`` names must have been made with these stores (more may
    be added after them: a rollout store, for one) and this student, at a step not past --max-steps; the stores
    added are named in one line, every other setting that changed in another."""
    found = peek_resume_meta(cfg)
    if found is None:
        return
    ckpt, meta = found
    saved = flatten(meta["config"])
    for key, flag in REFUSED_CHANGES.items():
        if saved.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"{flag} {getattr(cfg, key)}: {ckpt} was trained with {flag} {saved.get(key)} — resume with the same "
                f"{flag}, or start a new run (another --out, or --overwrite)"
            )
    saved_stores = store_list(saved.get("cache"))
    check_stores_kept(cfg, saved_stores, manifests, ckpt)
    if cfg.max_steps is not None and cfg.max_steps < meta["step"]:
        raise ConfigError(
            f"--max-steps {cfg.max_steps} is below step {meta['step']}, which {ckpt} has reached — pass --max-steps "
            f"{meta['step']} or more, or start a new run"
        )
    now = flatten(config_to_dict(cfg))
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in now if k not in NOT_COMPARED and saved.get(k) != now[k]]
    moved = [(old, new) for old, new in zip(saved_stores, cfg.stores) if old != new]
    changed[:0] = [f"cache {old} -> {new} (the same store: equal manifests)" for old, new in moved]
    if len(cfg.stores) > len(saved_stores):
        say(describe_added_stores(ckpt, cfg, len(saved_stores), manifests))
    elif len(saved_stores) > 1 and saved.get("cache_weights") != now.get("cache_weights"):
        changed.append(f"cache_weights {saved.get('cache_weights')} -> {now.get('cache_weights')}")
    if changed:
        say(f"resuming {ckpt} with changed settings: {'; '.join(changed)}")


def store_list(cache: Any) -> list[str]:
    """A saved ``cache`` setting (one store as a string, several as a list) as a list."""
    return [cache] if isinstance(cache, str) else [str(c) for c in cache or []]


def describe_added_stores(ckpt: Path, cfg: TrainConfig, kept: int, manifests: list[dict[str, Any]]) -> str:
    """One line: the stores a resume adds (who wrote a rollout store's text) and every store's share of a batch."""
    from distill.pipeline.train.mixing import describe_rollout

    added = []
    for url, manifest in zip(cfg.stores[kept:], manifests[kept:]):
        rollout = (manifest.get("dataset") or {}).get("rollout")
        added.append(url + (f" ({describe_rollout(rollout)})" if rollout else ""))
    shares = ", ".join(f"{url} {w:.0%}" for url, w in zip(cfg.stores, cfg.store_weights))
    return f"resuming {ckpt} with {len(added)} store(s) added: {'; '.join(added)}; share of every batch: {shares}"


def check_stores_kept(cfg: TrainConfig, saved_stores: list[str], manifests: list[dict[str, Any]], ckpt: Path) -> None:
    """Every store the checkpoint trained on is still there, first and in its place: the same --cache, or another
    path to a store with the same manifest (moved or copied; config.json of the checkpoint's run holds the manifests
    it trained on). Stores may be added after them, not removed or swapped."""
    if len(cfg.stores) < len(saved_stores):
        raise ConfigError(
            f"--cache {', '.join(cfg.stores)}: {ckpt} was trained on {len(saved_stores)} stores "
            f"({', '.join(saved_stores)}) — pass them all, in that order, first; a resume may add stores, not drop them"
        )
    trained_on = trained_manifests(ckpt)
    for index, (saved_cache, url) in enumerate(zip(saved_stores, cfg.stores)):
        if saved_cache == url:
            continue
        before = trained_on[index] if index < len(trained_on) else None
        if not isinstance(before, dict) or store_identity(before) != store_identity(manifests[index]):
            raise ConfigError(
                f"--cache {url}: {ckpt} was trained on another store ({saved_cache}) — resume with --cache "
                f"{saved_cache}, or start a new run (another --out, or --overwrite)"
            )


def trained_manifests(ckpt: Path) -> list[Any]:
    """The manifests of the stores the checkpoint's run trained on, in --cache order (config.json)."""
    config = ckpt.parent.parent / "config.json"
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict):
        return []
    return saved.get("cache_manifests") or [saved.get("cache_manifest")]


def store_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest_identity(manifest).items() if k != "shards"}


def peek_resume_meta(cfg: TrainConfig) -> tuple[Path, dict[str, Any]] | None:
    """meta.json of the checkpoint a resume would load first (JSON only, cheap), if one holds the run's config."""
    for path in resume_candidates(Path(cfg.out), cfg.resume):
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict) and isinstance(meta.get("step"), int):
            return path, meta
    return None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"curriculum": {"kd": 1}}`` -> ``{"curriculum.kd": 1}``; lists become tuples-free JSON values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = json.loads(json.dumps(value, default=str))
    return flat
