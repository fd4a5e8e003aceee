"""Stage 1 — ``distill cache-teacher``: run the teacher once, store what stage 2 needs.

    distill cache-teacher --teacher huihui-ai/Huihui-MoE-1B-A0.6B --dataset wikitext \
        --dataset-config wikitext-103-raw-v1 --split train --out cache/wt103 --seq-len 512

Flow: ``setup(cfg)`` loads the teacher and its tokenizer (teacher/model.py) and the dataset and cuts its documents
into rows (text/data.py); ``prepare_store`` opens the store, or creates it after a calibration pass over a sample
of the rows (hidden-state statistics and PCA basis, the targets' rank table and fidelity, and those rows' own
fields, kept for the fill: calibration.py) with its manifest (manifest.py, cache/writer.py); ``fill_store``
claims the shards this process owns (shard_policy.py) and, for each chunk not yet committed, runs the teacher in
batches over the rows the calibration did not keep, computes the fields (fields.py) and hands the chunk to a
background writer, which writes and commits it while the next chunk runs through the teacher. Each row runs
through the teacher once.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.cache.claims import ShardClaim
from distill.cache.shards import open_shard_writer
from distill.cache.store import open_root, shard_records
from distill.cache.writer import BackgroundWriter, chunks_to_fill, commit_chunk, open_or_create_store
from distill.config import CacheConfig, ConfigError
from distill.pipeline.losses.hidden_targets import describe_clip_share
from distill.pipeline.teacher.calibration import Calibration, calibrate_rows
from distill.pipeline.teacher.fields import FieldSettings, blank_rows, compute_batch_fields, field_settings
from distill.pipeline.teacher.manifest import build_layout, build_manifest, text_digest, tokenizer_files
from distill.pipeline.teacher.model import (
    TeacherSource,
    check_teacher_source,
    load_teacher,
    load_teacher_tokenizer,
    output_device,
)
from distill.pipeline.teacher.shard_policy import claim_in_turn, new_store_shards, shards_to_fill
from distill.pipeline.text.data import Row, RowBuilder, RowPlan, dataset_identity, load_text_dataset, plan_rows
from distill.pipeline.text.packing import check_packed_forward
from distill.runtime import DTYPE_NAMES, rank_device, resolve_device, resolve_dtype, torchrun_rank


class NonFiniteTeacherOutput(RuntimeError):
    """The teacher produced inf/nan for a row (typically fp16 overflow)."""


def prepare_store(t: TeacherRun) -> tuple[Any, dict[str, Any], Calibration | None]:
    """Open the store to resume it, or create it after the calibration pass (see cache/writer.py).

    Also returns the calibration, with its rows' stored fields ([calibration note] in calibration.py), when this
    process created the store; None when it opened one (a store is calibrated once, when it is created)."""
    cfg, model, tokenizer, dataset, plan, dtype = t.cfg, t.model, t.tokenizer, t.dataset, t.plan, t.dtype
    files = tokenizer_files(tokenizer)
    data_id = dataset_identity(dataset, cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    data_id["text_sha256"] = text_digest(dataset, cfg.text_field)

    def manifest_for(num_shards: int) -> dict[str, Any]:
        layout = build_layout(CacheConfig(**{**cfg.__dict__, "num_shards": num_shards}), model, plan)
        return build_manifest(cfg, model, tokenizer, files, data_id, plan, layout, dtype)

    def calibration_arrays(layout: dict[str, Any]) -> dict[str, np.ndarray]:
        row_ids = sample_calibration_rows(layout["num_rows"], layout["calibration_rows"], cfg.calibration_seed)
        rows = [t.builder.row(i) for i in row_ids]
        calibration = calibrate_rows(model, rows, layout, cfg.hidden_dim, cfg.batch_size, t.device)
        # what the pass measured goes into the manifest written next
        wanted["calibration"] = {"seed": cfg.calibration_seed, "rows": row_ids.tolist(), **calibration.report}
        if calibration.fidelity is not None:
            wanted["fidelity"] = calibration.fidelity
        say_calibration(wanted["calibration"])
        created.append(calibration)
        return calibration.arrays

    created: list[Calibration] = []
    wanted = manifest_for(new_store_shards(cfg))  # validates the settings before anything is touched
    root, manifest = open_or_create_store(cfg.out, wanted, manifest_for, files, calibration_arrays, cfg.overwrite)
    return root, manifest, created[0] if created else None


def sample_calibration_rows(num_rows: int, count: int, seed: int) -> np.ndarray:
    """(count,) int64 row ids drawn without replacement from all ``num_rows`` rows with ``seed``, ascending: the
    first rows of an ordered dataset are one domain (its first source, its first book), not a sample of it."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_rows, size=min(count, num_rows), replace=False)).astype(np.int64)


def say_calibration(calibration: dict[str, Any]) -> None:
    """One line on the calibration pass: its rows, and the share of each hidden layer's values stage 2 clips."""
    shares = describe_clip_share(calibration["hidden_clip_share"])
    line = f"cache-teacher: calibrated on {len(calibration['rows'])} rows sampled with seed {calibration['seed']}"
    if shares:
        line += f"; hidden values beyond ±{calibration['hidden_clip']:g} std (clipped in training): {shares}"
    tqdm.write(line, file=sys.stderr)


def iter_chunk_batches(
    builder: RowBuilder, start: int, end: int, batch_size: int, skip: Collection[int] = ()
) -> Iterator[list[Row]]:
    """Rows ``start:end`` but those in ``skip``, ``batch_size`` at a time."""
    row_ids = [i for i in range(start, end) if i not in skip]
    for a in range(0, len(row_ids), batch_size):
        yield [builder.row(i) for i in row_ids[a : a + batch_size]]


def count_tokens(plan: RowPlan, todo: list[tuple[int, int, int]]) -> int:
    """Text tokens plus each piece's prefix, as the rows of ``todo`` hold them."""
    return sum(plan.count_tokens(a, b) for _, a, b in todo)


@dataclass
class TeacherRun:
    """One ``cache-teacher`` process's teacher, rows and settings, as ``setup(cfg)`` loads and checks them."""

    cfg: CacheConfig
    model: Any
    tokenizer: Any
    dataset: Any
    plan: RowPlan  # the dataset's documents cut (and packed) into rows
    builder: RowBuilder  # row id -> the row's tokens, spans and text
    device: torch.device  # where the fields are computed (the output head's GPU under --device-map)
    dtype: torch.dtype


def setup(cfg: CacheConfig) -> TeacherRun:
    """Check the settings, load the teacher, its tokenizer and the dataset, and plan the rows (no store touched)."""
    cfg.require_io()
    check_teacher_source(cfg.teacher)
    check_one_process_per_device_map(cfg)
    device = rank_device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    source = TeacherSource.of(cfg)
    tokenizer = load_teacher_tokenizer(source)
    dataset = load_text_dataset(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    need_attention = cfg.attention_layers is None or len(cfg.attention_layers) > 0
    model = load_teacher(source, device, dtype, need_attention)
    if cfg.device_map is not None:  # [device-map note] in teacher/model.py
        device = output_device(model)
    if cfg.packing != "none":
        try:
            check_packed_forward(model, f"--teacher {cfg.teacher}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    plan = plan_rows(dataset, cfg.text_field, tokenizer, cfg.seq_len, packing=cfg.packing).truncated(cfg.max_rows)
    builder = RowBuilder(dataset, cfg.text_field, tokenizer, plan)
    return TeacherRun(cfg, model, tokenizer, dataset, plan, builder, device, dtype)


def run(cfg: CacheConfig) -> dict[str, Any]:
    """Fill the store at ``cfg.out`` (creating or resuming it). Returns a summary of the work done.

    Each shard is filled under its claim (see [claim note] in claims.py): shards claimed by another live
    process are skipped (tried again once after the others) and listed in ``busy_shards``."""
    t = setup(cfg)
    started = time.perf_counter()  # a new store's calibration is part of the work: its rows are stored
    root, manifest, calibration = prepare_store(t)
    summary = fill_store(t, root, manifest, calibration)
    summary["seconds"] = time.perf_counter() - started
    summary["tokens_per_s"] = summary["tokens"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    return summary


def fill_store(t: TeacherRun, root: Any, manifest: dict[str, Any], calibration: Calibration | None) -> dict[str, Any]:
    """Fill this process's shards of an open store, chunk by chunk, each under its claim; the summary of the work."""
    cfg, plan, layout = t.cfg, t.plan, manifest["layout"]
    chunk_settings = ChunkSettings(t.model, t.builder, field_settings(layout, root, t.device), t.device, cfg, t.dtype)
    records = shard_records(root, manifest)
    mine = shards_to_fill(cfg, len(records))
    queue_ = [i for i in mine if records[i]["status"] != "complete" or records[i].get("redo")]
    planned = {i: count_tokens(plan, chunks_to_fill(records[i], layout["chunk_rows"])) for i in queue_}
    calibrated = CalibratedRows.of(manifest, cfg.batch_size, calibration, records, queue_, layout["chunk_rows"])
    summary: dict[str, Any] = {
        "rows": 0,
        "tokens": 0,
        "nonfinite_rows": [],
        "skipped_chunks": sum(len(records[i]["checksums"]) - len(records[i].get("redo", [])) for i in mine),
        "filled_shards": [],
        "busy_shards": {},
    }
    writer_thread = BackgroundWriter()
    bar = tqdm(
        total=sum(planned.values()),
        unit="tok",
        unit_scale=True,
        desc="cache-teacher",
        dynamic_ncols=True,
        disable=not planned,
    )

    def skip_busy(index: int, holder: Any) -> None:
        summary["busy_shards"][index] = holder
        bar.total -= planned[index]

    claims: list[ShardClaim] = []
    try:
        for index, claim in claim_in_turn(cfg, queue_, skip_busy):
            claims.append(claim)
            # Another process may have filled some of it before we held the claim: read its record again.
            fresh = open_root(cfg.out, mode="a")  # zarr caches a group's attributes: open it again
            todo = chunks_to_fill(shard_records(fresh, manifest)[index], layout["chunk_rows"])
            bar.total -= planned[index] - count_tokens(plan, todo)
            writer = open_shard_writer(fresh, index)
            for chunk, start, end in todo:
                if claim.lost:  # taken over by another process (see [claim note])
                    break
                arrays, bad_rows = compute_chunk(chunk_settings, start, end, bar, calibrated)
                summary["nonfinite_rows"] += bad_rows
                summary["rows"] += end - start
                summary["tokens"] += count_tokens(plan, [(chunk, start, end)])
                writer_thread.submit(
                    functools.partial(commit_chunk, writer, claim, chunk, arrays, int(arrays["length"].sum()), bad_rows)
                )
            if todo:
                summary["filled_shards"].append(index)
            writer_thread.submit(claim.release)  # after its last chunk is committed
    finally:
        bar.close()
        try:
            writer_thread.close()
        finally:
            for claim in claims:  # on errors and signals too; a no-op for those already released
                claim.release()
    return summary


def check_one_process_per_device_map(cfg: CacheConfig) -> None:
    """--device-map spreads one teacher over every visible GPU: several ranks of one machine would each do so."""
    ranks = torchrun_rank()
    if cfg.device_map is not None and ranks is not None and ranks[1] > 1:
        raise ConfigError(
            f"--device-map {cfg.device_map} spreads one teacher over all the GPUs of a machine: run one process per "
            "machine (not torchrun), each with its own --shard i/n"
        )


@dataclass
class CalibratedRows:
    """The store's calibration rows, which are always stored as their calibration batch computes them.

    Under several intra-op threads a row's values may differ in the last bit with the shape of its batch, so a
    chunk recomputed after a crash (or filled by another process) gets a calibration row from the same batch of
    calibration rows as the pass that created the store, and every other row from the same fill batch: a resumed
    store is byte for byte the uninterrupted one ([calibration note] in calibration.py)."""

    batches: list[list[int]]  # row ids of each calibration batch, as calibrate_rows made them
    calibration: Calibration | None  # the creating process's calibration, its batches finished when taken
    kept: dict[int, dict[str, np.ndarray]]  # row id -> its stored fields, computed and not yet handed out
    bad: set[int]  # kept rows whose teacher output is not finite

    @classmethod
    def of(
        cls,
        manifest: dict[str, Any],
        batch_size: int,
        calibration: Calibration | None,
        records: list[dict[str, Any]],
        shards: list[int],
        chunk_rows: int,
    ) -> CalibratedRows:
        """From the manifest's calibration rows (none in stores made before it listed them) and, in the process
        that created the store, the calibration's batches holding rows of the chunks it is to fill."""
        ids = [int(i) for i in manifest.get("calibration", {}).get("rows", [])]
        batches = [ids[a : a + batch_size] for a in range(0, len(ids), batch_size)]
        if calibration is not None:
            own = {
                i for s in shards for _, start, end in chunks_to_fill(records[s], chunk_rows) for i in range(start, end)
            }
            calibration.keep_only(own)
        return cls(batches, calibration, {}, set())

    def rows(self) -> set[int]:
        return {i for batch in self.batches for i in batch}

    def take(self, row_id: int, compute: Any) -> dict[str, np.ndarray]:
        """Row ``row_id``'s fields: kept, finished from the calibration pass's batch, or computed with its calibration
        batch by ``compute(row ids)`` (which returns compute_batch_fields's output), the batch's other rows kept."""
        if row_id not in self.kept:
            finished = None if self.calibration is None else self.calibration.finish_batch_of(row_id)
            if finished is None:
                batch = next(batch for batch in self.batches if row_id in batch)
                arrays, bad = compute(batch)
                finished = (
                    {i: {k: v[j : j + 1] for k, v in arrays.items()} for j, i in enumerate(batch)},
                    [batch[j] for j in bad],
                )
            self.kept.update(finished[0])
            self.bad.update(finished[1])
        return self.kept.pop(row_id)


@dataclass
class ChunkSettings:
    """What computing a chunk's fields needs besides its rows: the teacher, the row builder, the store's field
    settings, the device, the command's settings (batch size, --on-nonfinite) and the teacher's dtype."""

    model: Any
    builder: RowBuilder
    fields: FieldSettings
    device: torch.device
    cfg: CacheConfig
    dtype: torch.dtype


def compute_chunk(
    s: ChunkSettings, start: int, end: int, bar: Any, calibrated: CalibratedRows
) -> tuple[dict[str, np.ndarray], list[int]]:
    """The fields of rows ``start:end`` and the rows whose teacher output is not finite (blanked).

    The calibration rows come from ``calibrated`` (kept from the calibration pass, not run again), the others are
    run ``cfg.batch_size`` at a time."""
    parts, row_ids, bad_rows = [], [], []
    skip = calibrated.rows()
    for batch in iter_chunk_batches(s.builder, start, end, s.cfg.batch_size, skip=skip):
        fields, bad = compute_batch_fields(s.model, batch, s.fields, s.device)
        bad_rows += [batch[i].row_id for i in bad]
        parts.append(fields)
        row_ids += [r.row_id for r in batch]
        bar.update(sum(len(r.input_ids) for r in batch))
    compute = lambda ids: compute_batch_fields(s.model, [s.builder.row(i) for i in ids], s.fields, s.device)  # noqa: E731
    for i in [i for i in range(start, end) if i in skip]:
        parts.append(calibrated.take(i, compute))  # stored as it is, and freed
        row_ids.append(i)
        bad_rows += [i] if i in calibrated.bad else []
        bar.update(int(parts[-1]["length"][0]))
    order = np.argsort(row_ids, kind="stable")  # row order
    arrays = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
    bad_rows.sort()
    if bad_rows and s.cfg.on_nonfinite == "error":
        raise NonFiniteTeacherOutput(
            f"teacher output is not finite for row {bad_rows[0]} (document "
            f"{s.builder.plan.first_document(bad_rows[0])}) in {DTYPE_NAMES[s.dtype]}; run the teacher in "
            "--dtype bf16 or fp32, or pass --on-nonfinite skip to store such rows empty and count them"
        )
    if bad_rows:
        blank_rows(arrays, [r - start for r in bad_rows])
    return arrays, bad_rows
