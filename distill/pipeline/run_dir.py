"""The run directory of ``distill train``: refusing to overwrite a run, config.json, metrics.jsonl, final.json.

RUN_DIR/config.json      the resolved config and what eval needs to score the same rows
RUN_DIR/metrics.jsonl    one JSON record per log step and per eval
RUN_DIR/checkpoints/     see checkpoint.py
RUN_DIR/final/           the student chosen by ``choose_final`` (final.json says which step and why)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distill.config import ConfigError, TrainConfig, config_to_dict
from distill.pipeline.checkpoint import load_best_meta


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


def prepare_run_dir(cfg: TrainConfig, delete: bool = True) -> None:
    """Refuse to start a second run into a run directory that holds one, unless told to resume or replace it."""
    import shutil

    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: a file, not a directory — choose another --out")
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
