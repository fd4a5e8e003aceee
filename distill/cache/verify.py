"""Verify a store: every manifest field, record, array shape and (deep) chunk checksum; repair marks bad chunks.

    distill cache verify STORE            # exit 0 only if sound; names each bad shard and chunk
    distill cache verify --repair STORE   # marks the bad chunks to redo; cache-teacher recomputes them

STORE is a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``...).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from distill.cache.schema import (
    TOKENIZER_GROUP,
    FieldSpec,
    build_field_specs,
    root_array_shapes,
    row_bytes,
    shard_name,
    tokenizer_sha256,
)
from distill.cache.shards import (
    StoreDamaged,
    checksum_arrays,
    chunk_matches_checksum,
    missing_chunk_files,
    read_chunk,
    stored_files,
)
from distill.cache.store import (
    SHARD_ATTR,
    load_manifest,
    open_root,
    shard_records,
)
from distill.cache.targets import ID_BY_RANK, kind_of

# --- verify -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One reason a store is not sound; ``where`` names the shard and chunk when there is one."""

    where: str
    what: str
    shard: int | None = None
    chunk: int | None = None
    unfilled: bool = False  # a shard not (yet) filled: a gap that cache-teacher fills, not damage

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class VerifyReport:
    """What ``verify_store`` checked and every problem it found (sound = no problem)."""

    url: str
    deep: bool
    shards: int = 0
    rows: int = 0
    chunks_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def sound(self) -> bool:
        return not self.problems


def verify_store(url: str, deep: bool = True, workers: int = 8) -> VerifyReport:
    """Check a store: manifest consistency, root arrays, each shard's record and arrays, and (``deep``) every
    committed chunk's checksum, row ids and token count. Raises CacheError only when there is no store."""
    root = open_root(url)
    manifest = load_manifest(root, url)
    layout = manifest["layout"]
    report = VerifyReport(url, deep, shards=len(layout.get("shard_rows", [])), rows=int(layout.get("num_rows", 0)))
    report.problems += check_manifest(manifest)
    if report.problems:
        return report  # the checks below trust the layout
    report.problems += check_root_arrays(root, manifest)
    specs = build_field_specs(layout)
    readable = []  # shards whose arrays are in place: their committed chunks can be checked
    for record in shard_records(root, manifest):
        report.problems += check_shard_record(record, layout["chunk_rows"])
        if record["status"] != "missing":
            problems = check_shard_arrays(root[shard_name(record["index"])], record, specs, layout["chunk_rows"])
            report.problems += problems
            if not problems and len(record["checksums"]) <= record["num_chunks"]:
                readable.append(record)
    # [missing-chunk note] in shards.py
    missing = {r["index"]: check_chunk_files(url, root, r, specs) for r in readable}
    for index, problems in missing.items():
        report.problems += problems
    if deep:
        jobs = [(record, chunk) for record in readable for chunk in committed_chunk_indices(record)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda job: check_chunk(root, job[0], job[1], specs), jobs))
        report.chunks_checked = len(jobs)
        named = {(p.shard, p.chunk) for problems in missing.values() for p in problems}
        report.problems += [p for problems, _ in results for p in problems if (p.shard, p.chunk) not in named]
        report.problems += check_token_counts(readable, jobs, [tokens for _, tokens in results])
    return report


def committed_chunk_indices(record: dict[str, Any]) -> list[int]:
    """The chunks of a shard whose data is committed: those with a checksum, less those marked to redo."""
    redo = set(record.get("redo", []))
    return [c for c in range(len(record["checksums"])) if c not in redo]


def check_chunk_files(url: str, root: zarr.Group, record: dict[str, Any], specs: dict[str, FieldSpec]) -> list:
    """Every committed chunk of a shard has its data files, or (a store written before empty chunks were stored)
    still matches its checksum: one listing, and a read only of the chunks with absent files."""
    index = record["index"]
    group = root[shard_name(index)]
    files = stored_files(url, shard_name(index))
    absent = missing_chunk_files(group, specs, committed_chunk_indices(record), files)  # type: ignore[arg-type]
    return [
        Problem(
            f"shard {index:05d} chunk {chunk}",
            f"the data file of {', '.join(names)} is missing (it reads back as zeros)",
            index,
            chunk,
        )
        for chunk, names in sorted(absent.items())
        if not chunk_matches_checksum(group, record, chunk, specs)  # type: ignore[arg-type]
    ]


def require_sound_store(url: str, deep: bool = True, allow_unfilled: bool = False) -> None:
    """Raise StoreDamaged (one line) unless the store verifies sound; for stage 2 setup, export and merge
    (``allow_unfilled``: shards not yet filled are no damage, as merge takes each shard from where it is)."""
    report = verify_store(url, deep=deep)
    problems = [p for p in report.problems if not (allow_unfilled and p.unfilled)]
    if not problems:
        return
    shown = "; ".join(str(p) for p in problems[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    raise StoreDamaged(
        f"{url}: the store is not sound ({shown}{more}); see `distill cache verify {url}`; `distill cache verify "
        "--repair` then the same `distill cache-teacher` command recomputes bad chunks"
    )


DEEP_VERIFY_LIMIT = 16 * 2**30  # bytes of uncompressed rows below which `auto` re-checksums every chunk


def check_store(url: str, mode: str) -> None:
    """The check before a store is used (train, eval): ``deep`` re-checksums every chunk, ``quick`` checks
    completeness and metadata, ``auto`` is deep below DEEP_VERIFY_LIMIT bytes of uncompressed rows, ``off`` skips.
    Raises StoreDamaged (one line) unless the store is sound."""
    if mode == "off":
        return
    deep = mode == "deep"
    if mode == "auto":
        layout = load_manifest(open_root(url), url)["layout"]
        deep = layout["num_rows"] * row_bytes(layout) < DEEP_VERIFY_LIMIT
    require_sound_store(url, deep=deep)


def check_manifest(manifest: dict[str, Any]) -> list[Problem]:
    """The field table and the shard layout agree with the layout settings."""
    layout = manifest["layout"]
    try:
        specs = build_field_specs(layout)
        chunk_rows, num_rows, shard_rows = layout["chunk_rows"], layout["num_rows"], layout["shard_rows"]
    except (KeyError, TypeError) as exc:
        return [Problem("manifest", f"the layout is incomplete ({exc!r})")]
    problems = []
    implied = {n: {"dtype": s.dtype, "row_shape": list(s.row_shape)} for n, s in specs.items()}
    stored = manifest.get("fields", {})
    for name in sorted(set(implied) | set(stored)):
        if implied.get(name) != stored.get(name):
            problems.append(
                Problem("manifest", f"field {name} is {stored.get(name)}, the layout implies {implied.get(name)}")
            )
    end_of_previous = 0
    for index, (start, end) in enumerate(shard_rows):
        if start != end_of_previous or end <= start or start % chunk_rows:
            problems.append(
                Problem(
                    "manifest",
                    f"layout.shard_rows[{index}] = [{start}, {end}) does not continue at row {end_of_previous} "
                    f"(a multiple of chunk_rows {chunk_rows})",
                )
            )
        end_of_previous = end
    if end_of_previous != num_rows:
        problems.append(Problem("manifest", f"layout.shard_rows end at row {end_of_previous}, not num_rows {num_rows}"))
    return problems


def check_root_arrays(root: zarr.Group, manifest: dict[str, Any]) -> list[Problem]:
    """Tokenizer files match the manifest's hash; statistics (and PCA bases) exist, finite, with their shapes."""
    problems = []
    files = {}
    for name in manifest["tokenizer"]["files"]:
        try:
            files[name] = np.asarray(root[f"{TOKENIZER_GROUP}/{name}"][:]).tobytes()
        except KeyError:
            problems.append(Problem(TOKENIZER_GROUP, f"file {name} is missing"))
    if not problems and tokenizer_sha256(files) != manifest["tokenizer"]["sha256"]:
        problems.append(Problem(TOKENIZER_GROUP, "the files do not match the manifest's tokenizer.sha256"))
    for path, shape in root_array_shapes(manifest["layout"]).items():
        try:
            data = np.asarray(root[path][:])
        except KeyError:
            problems.append(Problem(path, "missing"))
            continue
        if data.shape != shape or data.dtype != np.float32 or not np.isfinite(data).all():
            problems.append(
                Problem(path, f"expected finite float32 {list(shape)}, found {data.dtype} {list(data.shape)}")
            )
    if kind_of(manifest["layout"]).compact:
        problems += check_rank_table(root, manifest["teacher"]["vocab_size"])
    return problems


def check_rank_table(root: zarr.Group, vocab: int) -> list[Problem]:
    """The compact targets' ``targets/id_by_rank``: a permutation of the teacher's vocabulary, int32."""
    try:
        table = np.asarray(root[ID_BY_RANK][:])
    except KeyError:
        return [Problem(ID_BY_RANK, "missing")]
    if table.dtype != np.int32 or table.shape != (vocab,) or not np.array_equal(np.sort(table), np.arange(vocab)):
        return [
            Problem(ID_BY_RANK, f"expected a permutation of 0..{vocab - 1} (int32), found {table.dtype} {table.shape}")
        ]
    return []


def check_shard_record(record: dict[str, Any], chunk_rows: int) -> list[Problem]:
    """A shard's commit record exists, agrees with the layout, and says the shard is complete."""
    index = record["index"]
    where = f"shard {index:05d}"
    if record["status"] == "missing":
        return [Problem(where, "missing (no shard group or no commit record)", index, unfilled=True)]
    rows = record["row_end"] - record["row_start"]
    num_chunks = -(-rows // chunk_rows)
    problems = [
        Problem(where, f"the record says {key} = {record.get(key)}, the layout {value}", index)
        for key, value in (("rows", rows), ("chunk_rows", chunk_rows), ("num_chunks", num_chunks))
        if record.get(key) != value
    ]
    committed = len(record["checksums"]) - len(record.get("redo", []))
    if len(record["checksums"]) > num_chunks:
        problems.append(Problem(where, f"the record has {committed} checksums for {num_chunks} chunks", index))
    elif record["status"] != "complete" or committed < num_chunks:
        problems.append(
            Problem(
                where,
                f"incomplete ({record['status']}, {committed}/{num_chunks} chunks committed); finish it by "
                "re-running the same `distill cache-teacher` command",
                index,
                unfilled=True,
            )
        )
    return problems


def check_shard_arrays(
    group: zarr.Group, record: dict[str, Any], specs: dict[str, FieldSpec], chunk_rows: int
) -> list[Problem]:
    """Every field of a shard exists with the manifest's dtype, the shard's rows and whole-row chunks."""
    index = record["index"]
    where = f"shard {index:05d}"
    rows = record["row_end"] - record["row_start"]
    problems = []
    for name, spec in specs.items():
        try:
            array = group[name]
        except KeyError:
            problems.append(Problem(where, f"field {name} is missing", index))
            continue
        shape, chunks = (rows, *spec.row_shape), (chunk_rows, *spec.row_shape)
        dtype_ok = array.dtype.kind in ("O", "T", "U") if spec.dtype == "str" else array.dtype == np.dtype(spec.dtype)
        if not dtype_ok or tuple(array.shape) != shape or tuple(array.chunks) != chunks:
            problems.append(
                Problem(
                    where,
                    f"field {name} is {array.dtype} {list(array.shape)} in chunks {list(array.chunks)}, expected "
                    f"{spec.dtype} {list(shape)} in chunks {list(chunks)}",
                    index,
                )
            )
    return problems


def check_chunk(
    root: zarr.Group, record: dict[str, Any], chunk: int, specs: dict[str, FieldSpec]
) -> tuple[list[Problem], int | None]:
    """Recompute one committed chunk's checksum over all its fields and check its row ids.

    Returns the problems and the chunk's token count (None when it could not be read)."""
    index = record["index"]
    where = f"shard {index:05d} chunk {chunk}"
    try:
        arrays = read_chunk(root[shard_name(index)], record, chunk, specs)
    except Exception as exc:  # a damaged chunk fails to decompress in codec-specific ways
        return [Problem(where, f"cannot be read ({type(exc).__name__}: {exc})", index, chunk)], None
    problems = []
    if checksum_arrays(arrays) != record["checksums"][chunk]:
        problems.append(Problem(where, "checksum mismatch (the data differs from what was committed)", index, chunk))
    first = record["row_start"] + chunk * record["chunk_rows"]
    if not np.array_equal(arrays["row_id"], np.arange(first, first + len(arrays["row_id"]))):
        problems.append(Problem(where, "row ids do not match the shard's row range", index, chunk))
    return problems, int(arrays["length"].sum())


def check_token_counts(
    records: list[dict[str, Any]], jobs: list[tuple[dict[str, Any], int]], tokens: list[int | None]
) -> list[Problem]:
    """Each shard's ``tokens`` equals the sum of ``length`` over its committed rows (when every chunk was read)."""
    counted: dict[int, int | None] = {r["index"]: 0 for r in records}
    for (record, _), n in zip(jobs, tokens):
        previous = counted[record["index"]]
        counted[record["index"]] = None if previous is None or n is None else previous + n
    return [
        Problem(
            f"shard {r['index']:05d}",
            f"the record counts {r['tokens']} tokens, the rows hold {counted[r['index']]}",
            r["index"],
        )
        for r in records
        if counted[r["index"]] is not None and counted[r["index"]] != r["tokens"]
    ]


def repair_store(url: str, report: VerifyReport) -> list[int]:
    """Mark every bad chunk named in ``report`` to be redone (the record's ``redo`` list; the shard becomes
    partial), so that re-running the same ``distill cache-teacher`` command recomputes those chunks only.
    Returns the shards changed."""
    bad: dict[int, set[int]] = {}
    for p in report.problems:
        if p.shard is not None and p.chunk is not None:
            bad.setdefault(p.shard, set()).add(p.chunk)
    root = open_root(url, mode="a")
    starts = {r["index"]: r["row_start"] for r in shard_records(root, load_manifest(root, url))}
    for index, chunks in sorted(bad.items()):
        group = root[shard_name(index)]
        record = dict(group.attrs[SHARD_ATTR])
        redo = sorted({*record.get("redo", []), *chunks})
        rows, chunk_rows = record["rows"], record["chunk_rows"]
        lengths = np.asarray(group["length"][:])
        kept = np.ones(rows, dtype=bool)
        for chunk in redo:
            kept[chunk * chunk_rows : (chunk + 1) * chunk_rows] = False
        kept[len(record["checksums"]) * chunk_rows :] = False  # never committed
        record.update(
            status="partial",
            redo=redo,
            tokens=int(lengths[kept].sum()),
            nonfinite_rows=[r for r in record.get("nonfinite_rows", []) if kept[r - starts[index]]],
        )
        record.pop("completed_at", None)
        group.attrs[SHARD_ATTR] = record
    return sorted(bad)


__all__ = ["Problem", "VerifyReport", "check_store", "repair_store", "require_sound_store", "verify_store"]
