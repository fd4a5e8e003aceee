"""Experiment trackers: what ``train`` writes to metrics.jsonl and what ``eval`` reports, sent to TensorBoard,
Weights & Biases or Trackio as well.

    distill train ... --report-to tensorboard --report-to wandb     # or --report-to tensorboard,wandb
    distill eval runs/kd runs/ce_only --baseline ce_only --report-to wandb

Every record of metrics.jsonl goes to each tracker under the same names and at the same step (a list such as
``expert_usage`` becomes ``expert_usage/0``, ``expert_usage/1``...), on rank 0 only. The run parameters are the
resolved config and the identity of the cache (teacher, dataset, top-K, temperatures). No tracker package is
imported unless it is asked for; each is an extra (``pip install 'distill[wandb]'``).

RUN_DIR/trackers.json holds each tracker's run identity (W&B run id, Trackio run name, TensorBoard log dir) and
the last step sent to it, so that ``--resume`` continues the same tracker run.

[tracker-resume note] A run resumed from the checkpoint at step s recomputes steps s+1.. that the interrupted
process may already have logged. TensorBoard writes into the same RUN_DIR/tensorboard with ``purge_step=s+1``:
its readers drop the earlier events from step s+1 on, so it shows the resumed values, once per step. W&B and
Trackio cannot rewrite a run's history, so records at or below the last step sent before the resume are not sent
again (W&B would drop them anyway: its steps only increase); with an exact resume they are the same values.
A run started afresh (no checkpoint) in the same directory starts new tracker runs and purges old TensorBoard
events.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from distill.config import ConfigError

STATE_FILE = "trackers.json"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # tracker -> package (= extra)


class Tracker(Protocol):
    """One backend; ``Trackers`` fans out to several."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None: ...
    def log_images(self, images: dict[str, Path]) -> None: ...
    def close(self) -> None: ...


def require_trackers(names: list[str]) -> None:
    """Refuse, in one line naming the extra, a tracker whose package is not installed (nothing is imported)."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"--report-to {name} needs the {PACKAGES[name]} package — pip install 'distill[{PACKAGES[name]}]'"
            )


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers as they are, lists as ``name/i``, nested dicts as ``name/key``; strings (``split``) are dropped."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten_metrics({str(i): v for i, v in enumerate(value)}, f"{name}/"))
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat


def describe_cache(manifest: dict[str, Any]) -> dict[str, Any]:
    """The identity of a teacher-output store, as run parameters: teacher, dataset, top-K, temperatures."""
    teacher, data, layout = manifest["teacher"], manifest["dataset"], manifest["layout"]
    return {
        "teacher": teacher["name_or_path"],
        "teacher_revision": teacher.get("revision"),
        "teacher_config_sha256": teacher.get("config_sha256"),
        "dataset": data.get("name"),
        "dataset_config": data.get("config"),
        "dataset_split": data.get("split"),
        "dataset_fingerprint": data.get("fingerprint"),
        "top_k": layout["top_k"],
        "temperatures": layout["temperatures"],
        "seq_len": layout["seq_len"],
        "num_rows": layout["num_rows"],
    }


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


# --- backends -----------------------------------------------------------------------------


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard (``tensorboard --logdir RUN_DIR``); see [tracker-resume note]."""

    def __init__(self, run_dir: Path, params: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        purge_step = 0 if resume_step is None else resume_step + 1
        log_dir = run_dir / "tensorboard"
        require_writable(log_dir)  # its writer thread would print a traceback of its own
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        if resume_step is None:  # step 0 survives a resume's purge: written once
            self.writer.add_text("params", "    " + json.dumps(params, indent=2).replace("\n", "\n    "), 0)
            flat = flatten_params(params)
            for summary in hparams({k: v if isinstance(v, (int, float, str)) else str(v) for k, v in flat.items()}, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.flush()

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crash loses nothing that metrics.jsonl has

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.writer.add_text(name, markdown_table(columns, rows), 0)

    def log_images(self, images: dict[str, Path]) -> None:
        import matplotlib.image

        for name, path in images.items():
            pixels = matplotlib.image.imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
            self.writer.add_image(f"plots/{name}", pixels, 0, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def require_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it, in this thread: an OSError naming ``folder`` when it cannot
    be written, before a tracker's writer thread meets the problem."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(folder)) from None


class WandbTracker:
    """A W&B run in RUN_DIR/wandb (or $WANDB_DIR), project $WANDB_PROJECT (default distill); WANDB_MODE=offline
    keeps it local (``wandb sync`` uploads it later)."""

    def __init__(self, run_dir: Path, params: dict[str, Any], run_id: str, job: str) -> None:
        import wandb

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "distill"),
                id=run_id,
                name=run_dir.resolve().name,
                dir=os.environ.get("WANDB_DIR", str(run_dir)),
                job_type=job,
                resume="allow",
                settings=wandb.Settings(console="off"),  # the run's numbers come from log(), not from stdout
            )
        except (wandb.Error, OSError) as exc:
            raise ConfigError(
                f"--report-to wandb: wandb.init failed ({str(exc).splitlines()[0]}); run `wandb login`, or set "
                "WANDB_MODE=offline and upload later with `wandb sync`"
            ) from None
        self.run.config.update(params, allow_val_change=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def log_images(self, images: dict[str, Path]) -> None:
        import wandb

        self.run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in images.items()})

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run in project $TRACKIO_PROJECT (default distill), stored under $TRACKIO_DIR (default
    $HF_HOME/trackio); ``trackio show`` opens the dashboard."""

    def __init__(self, params: dict[str, Any], run_name: str) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "distill"),
            name=run_name,
            config=flatten_params(params),
            resume="allow",
            embed=False,
            auto_log_cpu=False,  # only what metrics.jsonl has
            auto_log_gpu=False,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.trackio.log({name: self.trackio.Table(columns=columns, data=rows)})

    def log_images(self, images: dict[str, Path]) -> None:
        self.trackio.log({f"plots/{name}": self.trackio.Image(str(path)) for name, path in images.items()})

    def close(self) -> None:
        self.trackio.finish()


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train/lr": 1e-4}``: flat parameters for TensorBoard's hparams and
    Trackio's run table (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- the fan-out ----------------------------------------------------------------------------


@dataclass
class Trackers:
    """The trackers of one run: ``log`` sends one metrics record to each; empty when none is asked for (and on
    ranks other than 0)."""

    run_dir: Path = field(default_factory=Path)
    backends: dict[str, Tracker] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    sent_through: dict[str, int] = field(default_factory=dict)  # tracker -> last step it had before this process

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Send a metrics record (the record without ``split`` and ``step``) at ``step``."""
        if not self.backends:
            return
        flat = flatten_metrics(metrics)
        for name, backend in self.backends.items():
            if step <= self.sent_through.get(name, -1):  # [tracker-resume note]
                continue
            backend.log(flat, step)
            self.state[name]["last_step"] = max(step, self.state[name].get("last_step", -1))
        save_state(self.run_dir, self.state)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        for backend in self.backends.values():
            backend.log_table(name, columns, rows)

    def log_images(self, images: dict[str, Path]) -> None:
        for backend in self.backends.values():
            backend.log_images(images)

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends = {}


def load_state(run_dir: Path) -> dict[str, dict[str, Any]]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(run_dir: Path, state: dict[str, dict[str, Any]]) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / STATE_FILE)


def open_trackers(
    names: list[str], run_dir: Path, params: dict[str, Any], resume_step: int | None = None, job: str = "train"
) -> Trackers:
    """Start (or, when ``resume_step`` is the step of the checkpoint resumed from, continue) one run per tracker.

    Args:
        names: trackers asked for (``TrainConfig.report_to``); empty -> a ``Trackers`` that does nothing.
        run_dir: where trackers.json and the local tracker files go (the run directory, or eval's ``--out``).
        params: the run parameters (resolved config, cache identity).
        resume_step: None for a fresh run (new tracker runs); the checkpoint's step for a resumed one.
        job: ``train`` or ``eval`` (the W&B job type).
    """
    if not names:
        return Trackers()
    require_trackers(names)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = load_state(run_dir) if resume_step is not None else {}
    state: dict[str, dict[str, Any]] = {}
    sent_through: dict[str, int] = {}
    backends: dict[str, Tracker] = {}
    for name in names:
        entry = dict(previous.get(name, {}))
        if name != "tensorboard" and "last_step" in entry:
            sent_through[name] = entry["last_step"]
        if name == "tensorboard":
            entry.setdefault("log_dir", "tensorboard")
            backends[name] = TensorBoardTracker(run_dir, params, resume_step)
        elif name == "wandb":
            entry.setdefault("id", secrets.token_hex(4))
            backends[name] = WandbTracker(run_dir, params, entry["id"], job)
        else:
            entry.setdefault("name", f"{run_dir.resolve().name}-{secrets.token_hex(3)}")
            backends[name] = TrackioTracker(params, entry["name"])
        state[name] = entry
    save_state(run_dir, state)
    return Trackers(run_dir, backends, state, sent_through)


def log_eval_report(names: list[str], out: Path, report: dict[str, Any]) -> None:
    """``distill eval --report-to``: the report table and its plots, as a new tracker run in ``out``."""
    if not names:
        return
    params = {key: report[key] for key in ("store", "split", "baseline", "rows", "scored_bytes", "row_selection")}
    params["students"] = list(report["students"])
    trackers = open_trackers(names, out, params, job="eval")
    columns = ["model", "bpb", "bpb_ci_low", "bpb_ci_high", "gap_closed", "kd_loss", "top1_agreement", "ece"]
    ci = report["teacher_bpb_ci"] or [None, None]
    rows = [["teacher", report["teacher_bpb"], ci[0], ci[1], None, None, None, None]]
    for name, s in report["students"].items():
        ci = s["bpb_ci"] or [None, None]
        rows.append([name, s["bpb"], ci[0], ci[1], s["gap_closed"], s["kd_loss"], s["top1_agreement"], s["ece"]])
    trackers.log_table("report", columns, rows)
    trackers.log_images({Path(p).stem: out / p for p in report["plots"]})
    trackers.close()
