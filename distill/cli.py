"""The ``distill`` command line: parse flags, load the config, print it, call the stage's ``run``.

distill demo                       # the whole mission offline on a CPU, on generated data
distill cache-teacher --help       # stage 1
distill cache info STORE           # what a store holds

Errors: an expected one prints one line, ``error: <what> — <what to do>``, and exits 2 for a usage
error (a flag, a path, a config), 1 for a failure (a damaged store or checkpoint, a full disk, a
bug). ``distill --debug ...`` or ``DISTILL_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from distill.config import CacheConfig, ConfigError, RolloutConfig, TrainConfig, config_to_dict
from distill.flags import ConfigSources, config_flags

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distill a large (MoE) language model into a small one with another tokenizer, "
    "through a teacher-output cache.",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and manage cache stores.")
app.add_typer(cache_app, name="cache")


def show_types_as_words() -> None:
    """typer (>= 0.20) shows a parameter without a metavar by its Python type (``<list[Path]>``, ``<bool>``); show
    it the way the generated flags are (TEXT, INT, PATH..., nothing for an on/off flag), in every command's help."""
    import re

    import typer.core

    base = getattr(typer.core, "_TyperParameter", None)
    if base is None or getattr(base.display_type, "as_words", False):
        return
    python_type = base.display_type
    words = {"str": "TEXT", "int": "INT", "float": "FLOAT", "Path": "PATH", "bool": ""}

    def display_type(self: Any, ctx: click.Context) -> str:
        label = python_type(self, ctx).strip("<>")
        listed = re.fullmatch(r"list\[(\w+)\]", label)
        return words.get(listed.group(1), "TEXT") + "..." if listed else words.get(label, label.upper())

    display_type.as_words = True  # type: ignore[attr-defined]
    base.display_type = display_type


def usage_errors_in_one_line() -> None:
    """An unknown flag or a missing argument: one ``error:`` line, as every other error, not typer's boxed panel."""
    import typer.rich_utils

    def one_line(exc: click.ClickException) -> None:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed
            return
        ctx = getattr(exc, "ctx", None)
        where = f" — see `{ctx.command_path} --help`" if ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{where}", err=True)

    typer.rich_utils.rich_format_error = one_line


show_types_as_words()
usage_errors_in_one_line()

DEBUG_ENV = "DISTILL_DEBUG"
DEBUG = {"on": False}
USAGE, FAILURE = 2, 1


@app.callback()
def options(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show the traceback of an error (or set {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    """Distill a large (MoE) language model into a small one with another tokenizer, through a teacher-output cache."""
    DEBUG["on"] = debug


def debugging() -> bool:
    return DEBUG["on"] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fail(message: str, code: int = USAGE) -> None:
    """One line on stderr, exit status ``code`` (2: usage error, 1: failure)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_os_error(exc: OSError) -> str:
    """A full disk and the like, in one line naming the path."""
    where = exc.filename or "(path unknown)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (
            f"no space left on the device writing {where} ({exc.strerror or exc}) — free space there and re-run the "
            "same command: what was committed is kept and the run resumes from it"
        )
    return f"{exc.strerror or first_line(exc)}: {where} — check the path, its permissions and free space"


@contextlib.contextmanager
def reported_errors(
    usage: tuple[type[BaseException], ...] = (), failure: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Turn an exception into one ``error:`` line and an exit status; keep the traceback for --debug.

    ``usage`` exceptions exit 2, ``failure`` exceptions and OSError exit 1, anything else is reported as a bug."""
    from distill.cache.schema import CacheError
    from distill.pipeline.train.checkpoint import CheckpointError

    try:
        yield
    except (typer.Exit, click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
        raise
    except Exception as exc:
        if debugging():
            raise
        from distill.cache.shards import StoreDamaged

        if isinstance(exc, (StoreDamaged, CheckpointError, *failure)):
            fail(first_line(exc), FAILURE)
        if isinstance(exc, (ConfigError, CacheError, *usage)):
            fail(first_line(exc), USAGE)
        if isinstance(exc, OSError):
            fail(describe_os_error(exc), FAILURE)
        fail(
            f"unexpected {type(exc).__name__}: {first_line(exc)} — this is a bug: re-run with --debug (or "
            f"{DEBUG_ENV}=1) for the traceback and report it",
            FAILURE,
        )


def print_config(title: str, cfg: Any) -> None:
    from distill.runtime import is_main_process

    if not is_main_process():
        return
    typer.echo(f"{title} config:\n" + "\n".join(f"  {k}: {v}" for k, v in config_to_dict(cfg).items()), err=True)


class Stopped(BaseException):
    """SIGTERM/SIGINT during cache-teacher: unwinds like KeyboardInterrupt, so committed chunks are flushed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into ``Stopped`` in the main thread (a no-op elsewhere)."""
    import signal

    def handle(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def report_stopped_cache(out: str, signum: int) -> None:
    """What a stopped cache-teacher committed, and how to resume; exits 128 + signal like train."""
    from distill.cache.store import read_manifest

    try:
        shards = read_manifest(out)["shards"]
        done = sum(len(s["checksums"]) - len(s.get("redo", [])) for s in shards)
        total = sum(s.get("num_chunks", 0) for s in shards)
        committed = f"{done}/{total} chunks are committed in {out}"
    except Exception:  # stopped before the store was created
        committed = f"no store was created at {out}"
    typer.echo(
        f"stopped by signal {signum}: {committed}; nothing committed is lost — re-run the same command to resume",
        err=True,
    )
    raise typer.Exit(128 + signum)


@app.command("cache-teacher")
@config_flags(CacheConfig)
def cache_teacher(sources: ConfigSources) -> None:
    """Stage 1: run the teacher once over a dataset and store its outputs in a resumable, shardable store.

    Example:

        distill cache-teacher --teacher huihui-ai/Huihui-MoE-1B-A0.6B --dataset wikitext
        --dataset-config wikitext-103-raw-v1 --out cache/wt103 --seq-len 512

    Re-running the same command resumes; complete shards are skipped.
    """
    from distill.cache.claims import ShardBusy
    from distill.pipeline.teacher.cache_teacher import NonFiniteTeacherOutput, run
    from distill.pipeline.text.data import DataError

    with reported_errors(usage=(DataError,), failure=(NonFiniteTeacherOutput, ShardBusy)):
        cfg = sources.load()
        cfg.require_io()
        for warning in cfg.ignored_settings():
            typer.echo(f"warning: {warning}", err=True)
        print_config("cache-teacher", cfg)
        try:
            with stop_on_signals():
                summary = run(cfg)
        except Stopped as stop:
            report_stopped_cache(cfg.out, stop.signum)
        except OSError as exc:  # zarr's writes do not name the file: name the store
            exc.filename = exc.filename or cfg.out
            raise
    from distill.cache.store import find_manifest

    filled = ", ".join(str(i) for i in summary["filled_shards"]) or "none"
    blank = ((find_manifest(cfg.out) or {}).get("dataset") or {}).get("empty_documents", 0)
    typer.echo(
        f"cached {summary['rows']} rows, {summary['tokens']:,} tokens in {summary['seconds']:.1f}s "
        f"({summary['tokens_per_s']:,.0f} tok/s); filled shards: {filled}; {summary['skipped_chunks']} chunks were "
        f"already committed; non-finite rows skipped: {len(summary['nonfinite_rows'])}; blank documents skipped: "
        f"{blank}. Inspect: distill cache info {cfg.out}"
    )
    for index, holder in summary["busy_shards"].items():
        typer.echo(
            f"shard {index} is being filled by pid {holder.get('pid', '?')} on host {holder.get('host', '?')}; "
            "re-run when it is done"
        )


@app.command("train")
@config_flags(TrainConfig)
def train(sources: ConfigSources) -> None:
    """Stage 2: train the student and its student-aware router against the cache, with the curriculum.

    Example:

        distill train --cache cache/wt103 --student HuggingFaceTB/SmolLM-135M --out runs/smol
        --config configs/reference.yaml --resume auto

    A cross-entropy baseline on the same rows: --objective ce --out runs/ce.

    Settings of the cache (layers, top-K, temperatures) are read from its manifest. SIGINT/SIGTERM
    save an emergency checkpoint; --resume auto continues exactly where the run stopped.
    """
    from distill.pipeline.train.loop import run

    with reported_errors(usage=(FileNotFoundError,)):
        cfg = sources.load()
        cfg.require_io()
        print_config("train", cfg)
        summary = run(cfg)
    if summary["stop_reason"] == "signal":
        typer.echo(
            f"stopped by signal {summary['signal']} at step {summary['steps']}: emergency checkpoint saved; "
            f"continue with --resume auto",
            err=True,
        )
        raise typer.Exit(128 + int(summary["signal"]))
    from distill.runtime import is_main_process

    if not is_main_process():
        return
    chosen = summary["final_choice"]
    typer.echo(
        f"trained {summary['steps']} steps ({summary['stop_reason']}); best eval loss "
        f"{summary['best_eval']:.4g}; student saved in {summary['final']} (step {chosen['step']}: {chosen['reason']})"
    )


@app.command("rollout")
@config_flags(RolloutConfig)
def rollout(sources: ConfigSources) -> None:
    """The student writes continuations of prompts (a JSONL file) for the teacher to score: on-policy data.

    Example:

        distill rollout --student runs/smol --dataset data/train.jsonl --out rollouts/r1.jsonl
        --num-prompts 1024 --prompt-chars 256 --max-new-tokens 128 --temperature 1 --top-p 0.95

    Then: distill cache-teacher --dataset rollouts/r1.jsonl --out cache/r1 ... and
    distill train --cache cache/wt103 --cache cache/r1 --cache-weights 0.7,0.3 --resume auto ...
    Re-running the same command appends only the prompts the file lacks.
    """
    from distill.pipeline.teacher.rollout import run
    from distill.pipeline.text.data import DataError

    with reported_errors(usage=(DataError, FileNotFoundError)):
        cfg = sources.load()
        cfg.require_io()
        print_config("rollout", cfg)
        summary = run(cfg)
    student = summary["student"]
    who = student["path"] + (f" (step {student['step']})" if student["step"] is not None else "")
    typer.echo(
        f"rollout: {summary['written']} prompts written, {summary['kept']} kept from a previous run, "
        f"{summary['prompts']} in {summary['path']}; student {who}. Score them: distill cache-teacher --dataset "
        f"{summary['path']} ..."
    )


@cache_app.command("info")
def cache_info(
    store: Annotated[str, typer.Argument(metavar="STORE", help="Store path or fsspec URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """What a store holds: manifest, rows, tokens, shards and their status, bytes per field and per token.

    Example: distill cache info cache/wt103 --json
    """
    from distill.cache.info import format_info, store_info

    with reported_errors():
        info = store_info(store)
    typer.echo(json.dumps(info, indent=2) if as_json else format_info(info))


@cache_app.command("audit")
def cache_audit(
    store: Annotated[str, typer.Argument(metavar="STORE", help="Store path or fsspec URL.")],
    student: Annotated[
        str, typer.Option(metavar="TEXT", help="Student (model folder or hub id) whose tokenizer to audit against.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    max_rows: Annotated[int, typer.Option(metavar="INT", help="Rows read at most, spread over the store.")] = 256,
    score_rows: Annotated[
        int,
        typer.Option(
            metavar="INT", help="Rows the teacher and the student are both scored on (bits per byte); 0 skips it."
        ),
    ] = 32,
) -> None:
    """Will this pair distill well? Per category of the teacher's next token: where its top-K mass maps on the
    student side (exact / prefix / tail), the aligned-position rate, next tokens without a student token; and
    whether the teacher predicts the stored text better than the student does at all (bits per byte on identical
    bytes, with a paired interval): if not, KD can only pull the student towards a worse model.

    Example: distill cache audit cache/wt103 --student HuggingFaceTB/SmolLM-135M --json
    """
    from distill.pipeline.eval.audit import audit_store, format_audit

    with reported_errors():
        report = audit_store(store, student, max_rows, score_rows)
    typer.echo(json.dumps(report, indent=2) if as_json else format_audit(report))


@cache_app.command("verify")
def cache_verify(
    store: Annotated[str, typer.Argument(metavar="STORE", help="Store path or fsspec URL.")],
    quick: Annotated[bool, typer.Option("--quick", help="Check manifest, records and arrays, not chunk data.")] = False,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Un-commit bad chunks so that re-running cache-teacher recomputes only them."),
    ] = False,
) -> None:
    """Check a store: every shard complete, every chunk's checksum, manifest consistency.

    Exit status 0 only if the store is sound; otherwise each problem is printed with its shard and chunk
    and the status is 1.

    Example: distill cache verify s3://bucket/cache/wt103
    """
    from distill.cache.verify import repair_store, verify_store

    with reported_errors():
        report = verify_store(store, deep=not quick)
        repaired = repair_store(store, report) if repair and not report.sound else []
    for problem in report.problems:
        typer.echo(str(problem))
    checked = f"{report.chunks_checked} chunks checksummed" if report.deep else "chunk data not read (--quick)"
    if report.sound:
        typer.echo(f"{store}: sound ({report.shards} shards, {report.rows:,} rows, {checked})")
        return
    if repaired:
        typer.echo(
            f"un-committed the bad chunks of shard(s) {', '.join(f'{i:05d}' for i in repaired)}: re-run the same "
            "`distill cache-teacher` command to recompute them (only them)"
        )
    typer.echo(f"{store}: NOT sound, {len(report.problems)} problem(s) ({checked})")
    raise typer.Exit(1)


@cache_app.command("merge")
def cache_merge(
    out: Annotated[str, typer.Argument(metavar="OUT", help="New store to write: a path or fsspec URL.")],
    stores: Annotated[
        list[str], typer.Argument(metavar="STORES...", help="Stores with equal manifests and disjoint complete shards.")
    ],
) -> None:
    """Merge stores filled apart (each with its own --shard i/n) into one store holding the union.

    With a single STORE it copies it verbatim (to an object store, say).

    Example: distill cache merge cache/wt103 /mnt/a/wt103 /mnt/b/wt103
    """
    from distill.cache.merge import merge_stores

    with reported_errors():
        summary = merge_stores(out, stores)
    missing = [f"{s['index']:05d}" for s in summary["shards"] if s["status"] != "complete"]
    tail = (
        "complete"
        if summary["complete"]
        else f"shard(s) {', '.join(missing)} not complete: fill them with `distill cache-teacher ... --out {out}`"
    )
    typer.echo(
        f"merged {len(stores)} store(s) into {out} ({len(summary['shards'])} shards, {tail}); check it with "
        f"distill cache verify {out}"
    )


@cache_app.command("export")
def cache_export(
    store: Annotated[str, typer.Argument(metavar="STORE", help="Complete store: a path or fsspec URL.")],
    file: Annotated[str, typer.Argument(metavar="FILE", help="HDF5 file to write: a path or fsspec URL.")],
    format_: Annotated[str, typer.Option("--format", metavar="TEXT", help="File format (hdf5).")] = "hdf5",
    compression: Annotated[
        str, typer.Option(metavar="TEXT", help="gzip (any HDF5 reader), lzf (h5py only, faster) or none.")
    ] = "gzip",
) -> None:
    """Write a complete store to one portable file (every chunk's checksum is checked on the way).

    Example: distill cache export cache/wt103 --format hdf5 wt103.h5
    """
    from distill.cache.hdf5 import export_hdf5

    if format_ != "hdf5":
        fail(f"--format {format_}: only hdf5 is supported — pass --format hdf5")
    with reported_errors():
        summary = export_hdf5(store, file, compression)
    typer.echo(f"exported {store} ({summary['shards']} shards, {summary['rows']:,} rows) to {file}")


@cache_app.command("import")
def cache_import(
    file: Annotated[
        str, typer.Argument(metavar="FILE", help="HDF5 file written by `distill cache export`: a path or fsspec URL.")
    ],
    store: Annotated[str, typer.Argument(metavar="STORE", help="New store to create: a path or fsspec URL.")],
) -> None:
    """Create a store from a file written by `distill cache export`: the same manifest, records and arrays.

    Example: distill cache import wt103.h5 cache/wt103
    """
    from distill.cache.hdf5 import import_hdf5

    with reported_errors():
        summary = import_hdf5(file, store)
    typer.echo(f"imported {file} into {store} ({summary['shards']} shards); check it with distill cache verify {store}")


@app.command("eval")
def eval_(
    students: Annotated[
        list[Path],
        typer.Argument(metavar="STUDENTS...", help="Run directories (of distill train) or HF model folders."),
    ],
    cache: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            help="Store to score plain model folders on; run directories use the store and rows they held out "
            "(another store for a run is refused unless --split all scores every row of it).",
        ),
    ] = None,
    split: Annotated[
        str, typer.Option(metavar="TEXT", help="eval: the rows each run held out; all: every row of the store.")
    ] = "eval",
    baseline: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            help="Name (folder name) of the baseline student, e.g. ce_only, for the share of the gap closed.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(metavar="PATH", help="Folder for report.json, report.md and PNG plots.")] = Path(
        "report"
    ),
    verify_cache: Annotated[
        str, typer.Option(metavar="TEXT", help="Check the store first, as train does: auto, deep, quick or off.")
    ] = "auto",
    report_to: Annotated[
        list[str] | None,
        typer.Option(
            metavar="TEXT,...", help="Also log the report table and plots to tensorboard|wandb|trackio (as for train)."
        ),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            metavar="FLOAT", help="The one T of every model's kd column (a stored T; bits per byte is at T=1)."
        ),
    ] = 1.0,
) -> None:
    """Tokenizer-independent quality: bits per byte of each student and of the teacher, held-out kd loss,
    top-1 agreement with the teacher, calibration (ECE), and the share of the baseline->teacher gap closed.

    Example: distill eval runs/kd runs/ce_only --baseline ce_only --out reports/demo
    """
    from distill.config import parse_report_to
    from distill.pipeline.eval.evaluate import format_report, run_eval

    if split not in ("eval", "all"):
        fail("--split must be eval or all")
    if verify_cache not in ("auto", "deep", "quick", "off"):
        fail("--verify-cache must be auto, deep, quick or off")
    with reported_errors(usage=(ValueError, FileNotFoundError)):
        report = run_eval(students, cache, split, baseline, out, verify_cache, parse_report_to(report_to), temperature)
    typer.echo(format_report(report))
    typer.echo(
        f"written: {out / 'report.json'}, {out / 'report.md'}, " + ", ".join(str(out / p) for p in report["plots"])
    )


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(metavar="PATH", help="Folder for everything the demo makes.")] = Path("demo_out"),
    seed: Annotated[int, typer.Option(metavar="INT", help="Seed of the corpus, the models and training.")] = 0,
) -> None:
    """Run the whole mission offline on a CPU (about 75 s of CPU time, README): generated corpus, two local
    tokenizers, a tiny Qwen3-MoE teacher pretrained briefly, cache-teacher, train (KD) and train (CE-only) on the
    same rows, eval.
    Finished stages are reused when run again; the report lands in OUT/report.

    Example: distill demo --out demo_out
    """
    from distill.pipeline.demo import run_demo

    if out.exists() and not out.is_dir():
        fail(f"--out {out}: a file, not a folder — choose another --out")
    with reported_errors():
        run_demo(out, seed)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no bar per model load or checkpoint save: distill prints its own progress
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
