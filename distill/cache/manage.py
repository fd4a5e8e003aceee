"""Manage stores: verify them, merge shards filled apart, export to one HDF5 file and back.

    distill cache verify STORE                 # exit 0 only if sound; names each bad shard and chunk
    distill cache merge OUT STORE1 STORE2 ...  # equal manifests, disjoint complete shards -> one store
    distill cache export STORE --format hdf5 FILE
    distill cache import FILE STORE

Every STORE and FILE is a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``...).
Merge copies the stored bytes (chunks, records, manifest) as they are, so checksums stay valid;
export and import re-check every chunk's checksum on the way, so a damaged store is never
handed on silently. docs/cache-format.md describes the HDF5 layout.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from distill.cache.schema import (
    MANIFEST_ATTR,
    ROOT_ARRAY_GROUPS,
    SHARDS_GROUP,
    TOKENIZER_GROUP,
    CacheError,
    FieldSpec,
    build_field_specs,
    check_schema,
    describe_manifest_difference,
    manifest_identity,
    root_array_shapes,
    row_bytes,
    shard_name,
    tokenizer_sha256,
)
from distill.cache.store import (
    CLAIM_FILE,
    SHARD_ATTR,
    WRITE_CONFIG,
    StoreDamaged,
    checksum_arrays,
    chunk_matches_checksum,
    create_store,
    delete_store,
    load_manifest,
    missing_chunk_files,
    open_root,
    read_chunk,
    read_creation_marker,
    shard_records,
    store_exists,
    store_fs,
    stored_files,
)
from distill.cache.targets import ID_BY_RANK, target_kind

ROOT_GROUPS = (TOKENIZER_GROUP, *ROOT_ARRAY_GROUPS)
HDF5_FORMAT = "distill-cache-hdf5"
HDF5_COMPRESSIONS = ("gzip", "lzf", "none")
COPY_WORKERS = 16


# --- verify -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One reason a store is not sound; ``where`` names the shard and chunk when there is one."""

    where: str
    what: str
    shard: int | None = None
    chunk: int | None = None

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
    missing = {r["index"]: check_chunk_files(url, root, r, specs) for r in readable}  # [missing-chunk note]
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


def require_sound_store(url: str, deep: bool = True) -> None:
    """Raise CacheError (one line) unless the store verifies sound; for stage 2 setup."""
    report = verify_store(url, deep=deep)
    if report.sound:
        return
    shown = "; ".join(str(p) for p in report.problems[:3])
    more = f"; and {len(report.problems) - 3} more" if len(report.problems) > 3 else ""
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
    if target_kind(manifest["layout"]) != "topk-fp16":
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
        return [Problem(where, "missing (no shard group or no commit record)", index)]
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


# --- merge --------------------------------------------------------------------------------


def merge_stores(out: str, sources: list[str], workers: int = COPY_WORKERS) -> dict[str, Any]:
    """Copy stores with equal manifests and disjoint complete shards into a new store ``out``.

    Each shard comes from the store where it is complete (else the one where it is furthest along,
    so that re-running cache-teacher on ``out`` finishes it). Bytes are copied as stored; each shard's
    record is read before its data and written after it, so a store still being filled copies safely.
    With one source this is a verbatim copy (to an object store, say).
    """
    if not sources:
        raise CacheError("merge needs at least one store: distill cache merge OUT STORE1 STORE2 ...")
    if store_exists(out) or read_creation_marker(out) is not None:
        raise CacheError(f"{out} exists; merge writes a new store: choose another OUT")
    roots = [open_root(src) for src in sources]
    manifests = [load_manifest(root, src) for root, src in zip(roots, sources)]
    check_mergeable(sources, roots, manifests)
    records = [shard_records(root, m) for root, m in zip(roots, manifests)]
    owners = choose_shard_sources(sources, records)
    fs_out, path_out = store_fs(out)
    fs_base, path_base = store_fs(sources[0])
    base_meta = fs_base.cat_file(f"{path_base}/zarr.json")  # root metadata with the manifest: written last
    jobs = [(sources[0], key) for group in ROOT_GROUPS for key in list_keys(sources[0], group)]
    jobs.append((sources[0], f"{SHARDS_GROUP}/zarr.json"))
    shard_meta = {}
    for index, owner in enumerate(owners):
        prefix = shard_name(index)
        if records[owner][index]["status"] == "missing":
            raise CacheError(f"shard {index:05d} is missing from every store (no shard group or record); cannot merge")
        fs_src, path_src = store_fs(sources[owner])
        shard_meta[index] = fs_src.cat_file(f"{path_src}/{prefix}/zarr.json")  # the record, before the data
        jobs += [(sources[owner], key) for key in list_keys(sources[owner], prefix) if key != f"{prefix}/zarr.json"]
    copy_keys(jobs, out, workers)
    for index, data in shard_meta.items():
        fs_out.pipe_file(f"{path_out}/{shard_name(index)}/zarr.json", data)
    fs_out.pipe_file(f"{path_out}/zarr.json", base_meta)
    shards = shard_records(open_root(out), load_manifest(open_root(out), out))
    return {
        "store": out,
        "shards": [{"index": i, "from": sources[o], "status": shards[i]["status"]} for i, o in enumerate(owners)],
        "complete": all(s["status"] == "complete" for s in shards),
    }


def check_mergeable(sources: list[str], roots: list[zarr.Group], manifests: list[dict[str, Any]]) -> None:
    """Equal manifest identity, and equal store-level arrays (one set of statistics and PCA bases)."""
    base = manifest_identity(manifests[0])
    for src, manifest in zip(sources[1:], manifests[1:]):
        diffs = describe_manifest_difference(base, manifest_identity(manifest))
        if diffs:
            shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
            raise CacheError(
                f"cannot merge {src} with {sources[0]}: their manifests differ ({shown}); only stores made by the "
                "same cache-teacher settings on the same teacher and dataset merge"
            )
    base_arrays = root_arrays(roots[0])
    for src, root in zip(sources[1:], roots[1:]):
        arrays = root_arrays(root)
        for path in sorted(set(base_arrays) | set(arrays)):
            a, b = base_arrays.get(path), arrays.get(path)
            if a is None or b is None or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
                raise CacheError(
                    f"cannot merge {src} with {sources[0]}: {path} differs (each store was calibrated on its own); "
                    "create the store once and fill its shards from every machine with --shard i/n (docs/scaling.md)"
                )


def choose_shard_sources(sources: list[str], records: list[list[dict[str, Any]]]) -> list[int]:
    """For each shard, the one source where it is complete; refuse a shard complete in two sources."""
    owners = []
    for index in range(len(records[0])):
        complete = [k for k, recs in enumerate(records) if recs[index]["status"] == "complete"]
        if len(complete) > 1:
            names = " and ".join(sources[k] for k in complete)
            raise CacheError(
                f"shard {index:05d} is complete in both {names}: the stores overlap; merge stores that hold "
                "disjoint shards (each filled with its own --shard i/n)"
            )
        if complete:
            owners.append(complete[0])
        else:
            progress = [len(recs[index]["checksums"]) for recs in records]
            owners.append(int(np.argmax(progress)))
    return owners


def root_arrays(root: zarr.Group) -> dict[str, np.ndarray]:
    """Every store-level array (tokenizer files, statistics, PCA bases) by path."""
    arrays = {}
    for group_name in ROOT_GROUPS:
        if group_name in root:
            for name, node in root[group_name].members(max_depth=None):
                if isinstance(node, zarr.Array):
                    arrays[f"{group_name}/{name}"] = np.asarray(node[:])
    return arrays


def list_keys(url: str, prefix: str = "") -> list[str]:
    """Every stored key (file) under ``prefix`` of a store, relative to the store's root."""
    fs, root = store_fs(url)
    root = root.rstrip("/")
    base = f"{root}/{prefix}".rstrip("/")
    if not fs.exists(base):
        return []
    keys = [path[len(root) + 1 :] for path in fs.find(base)]
    # Neither zarr's temporary files of an ongoing write nor shard claims (see [claim note] in store.py).
    return [k for k in keys if not k.endswith(".partial") and CLAIM_FILE not in k.rsplit("/", 1)[-1]]


def copy_keys(jobs: list[tuple[str, str]], out: str, workers: int) -> None:
    """Copy ``(source url, key)`` pairs byte for byte into the store at ``out``."""
    fs_out, path_out = store_fs(out)
    handles = {src: store_fs(src) for src, _ in jobs}

    def copy(job: tuple[str, str]) -> None:
        fs_src, path_src = handles[job[0]]
        fs_out.pipe_file(f"{path_out}/{job[1]}", fs_src.cat_file(f"{path_src}/{job[1]}"))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(copy, jobs))


# --- HDF5 export and import ---------------------------------------------------------------


def export_hdf5(url: str, path: str, compression: str = "gzip") -> dict[str, Any]:
    """Write a complete store to one HDF5 file (layout in docs/cache-format.md), checking every chunk."""
    import h5py

    if compression not in HDF5_COMPRESSIONS:
        raise CacheError(f"--compression {compression}: choose one of {', '.join(HDF5_COMPRESSIONS)}")
    root = open_root(url)
    manifest = load_manifest(root, url)
    records = shard_records(root, manifest)
    incomplete = [f"{r['index']:05d} ({r['status']})" for r in records if r["status"] != "complete"]
    if incomplete:
        raise CacheError(
            f"{url}: shard(s) {', '.join(incomplete[:5])} not complete; export needs a complete store: finish it by "
            "re-running the same `distill cache-teacher` command"
        )
    specs = build_field_specs(manifest["layout"])
    codec = None if compression == "none" else compression
    with writable_local_file(path) as local, h5py.File(local, "w") as f:
        f.attrs["format"] = HDF5_FORMAT
        f.attrs["manifest"] = json.dumps(manifest)
        for name, data in root_arrays(root).items():
            f.create_dataset(name, data=data, compression=codec if data.size else None)
        for record in records:
            export_shard(f, root[shard_name(record["index"])], record, specs, codec)
    return {"store": url, "file": path, "shards": len(records), "rows": manifest["layout"]["num_rows"]}


def export_shard(f: Any, group: zarr.Group, record: dict[str, Any], specs: dict[str, FieldSpec], codec: Any) -> None:
    """One shard's record (a JSON attribute) and fields (datasets), chunk by chunk, each chunk checked."""
    import h5py

    out = f.create_group(shard_name(record["index"]))
    out.attrs[SHARD_ATTR] = json.dumps({k: v for k, v in record.items() if k not in ("index", "row_start", "row_end")})
    rows, chunk_rows = record["rows"], record["chunk_rows"]
    datasets = {}
    for name, spec in specs.items():
        dtype = h5py.string_dtype("utf-8") if spec.dtype == "str" else np.dtype(spec.dtype)
        chunks = (min(chunk_rows, rows), *spec.row_shape)
        datasets[name] = out.create_dataset(
            name, shape=(rows, *spec.row_shape), dtype=dtype, chunks=chunks, compression=codec
        )
    for chunk in range(record["num_chunks"]):
        arrays = read_chunk(group, record, chunk, specs)
        require_checksum(arrays, record, record["index"], chunk, "the store")
        start = chunk * chunk_rows
        for name, value in arrays.items():
            datasets[name][start : start + len(value)] = value.astype(object) if name == "text" else value


def import_hdf5(path: str, url: str) -> dict[str, Any]:
    """Create the store ``url`` from an HDF5 file written by ``export_hdf5``: same manifest, records, arrays.

    A file that is not HDF5, or not a complete export, is refused; a half-made store is removed."""
    import h5py

    if store_exists(url) or read_creation_marker(url) is not None:
        raise CacheError(f"{url} exists; import writes a new store: choose another path")
    with readable_local_file(path) as local:
        try:
            f = h5py.File(local, "r")
        except OSError as exc:
            raise CacheError(
                f"{path}: not an HDF5 file ({first_line(exc)}) — pass a file written by `distill cache export`"
            ) from None
        with f:
            if f.attrs.get("format") != HDF5_FORMAT:
                raise CacheError(f"{path}: not a distill cache export (no format attribute {HDF5_FORMAT!r})")
            try:
                manifest = json.loads(f.attrs["manifest"])
                check_schema(manifest, path)
                import_file(f, url, manifest)
            except StoreDamaged:
                delete_store(url)
                raise
            except Exception as exc:  # a damaged or crafted file fails in h5py's and json's own ways
                delete_store(url)
                raise CacheError(
                    f"{path}: not a valid distill cache export ({type(exc).__name__}: {first_line(exc)}) — export the "
                    "store again; nothing was written"
                ) from None
    return {"file": path, "store": url, "shards": len(manifest["layout"]["shard_rows"])}


def import_file(f: Any, url: str, manifest: dict[str, Any]) -> None:
    """Write the store from an opened export: root arrays, shards chunk by chunk (checked), the manifest last."""
    files = {name: bytes(np.asarray(ds[:]).tobytes()) for name, ds in f[TOKENIZER_GROUP].items()}
    arrays: dict[str, np.ndarray] = {}
    for group_name in ROOT_ARRAY_GROUPS:
        if group_name in f:
            f[group_name].visititems(lambda name, node, g=group_name: collect_dataset(arrays, f"{g}/{name}", node))
    root = create_store(url, manifest, files, arrays, write_manifest=False)  # the manifest goes in last
    specs = build_field_specs(manifest["layout"])
    for index in range(len(manifest["layout"]["shard_rows"])):
        import_shard(f[shard_name(index)], root[shard_name(index)], index, specs)
    root.attrs[MANIFEST_ATTR] = manifest


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def collect_dataset(arrays: dict[str, np.ndarray], path: str, node: Any) -> None:
    if hasattr(node, "shape"):
        arrays[path] = np.asarray(node[()])


def import_shard(source: Any, group: zarr.Group, index: int, specs: dict[str, FieldSpec]) -> None:
    """Copy one shard's committed chunks from HDF5 into the pre-sized zarr arrays, each checked; record last."""
    record = json.loads(source.attrs[SHARD_ATTR])
    chunk_rows = record["chunk_rows"]
    for chunk in committed_chunk_indices(record):
        start = chunk * chunk_rows
        end = min(start + chunk_rows, record["rows"])
        arrays = {
            name: source[name].asstr()[start:end] if spec.dtype == "str" else source[name][start:end]
            for name, spec in specs.items()
        }
        require_checksum(arrays, record, index, chunk, "the HDF5 file")
        for name, value in arrays.items():
            group[name].with_config(WRITE_CONFIG)[start:end] = value  # type: ignore[union-attr]
    group.attrs[SHARD_ATTR] = record


def require_checksum(arrays: dict[str, Any], record: dict[str, Any], index: int, chunk: int, where: str) -> None:
    """Refuse to hand on a chunk whose data does not match its committed checksum."""
    if checksum_arrays(arrays) != record["checksums"][chunk]:
        raise StoreDamaged(
            f"shard {index:05d} chunk {chunk}: checksum mismatch in {where}; it is damaged (`distill cache verify` "
            "lists the bad chunks of a store)"
        )


@contextmanager
def writable_local_file(path: str) -> Iterator[str]:
    """A local path to write that becomes ``path`` only if the block ends without error.

    Local: ``path.partial`` renamed at the end. URL: a temporary file (in ``TMPDIR``) uploaded at the end."""
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "export.h5")
            yield local
            fs, remote = fsspec.core.url_to_fs(path)
            fs.put_file(local, remote)
        return
    target = path[len("file://") :] if path.startswith("file://") else path
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    partial = f"{target}.partial"
    try:
        yield partial
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@contextmanager
def readable_local_file(path: str) -> Iterator[str]:
    """A local path to read; a URL is downloaded to a temporary file first."""
    if "://" not in path or path.startswith("file://"):
        local = path[len("file://") :] if path.startswith("file://") else path
        if not os.path.isfile(local):
            raise CacheError(f"{path}: no such file")
        yield local
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(path)
    if not fs.isfile(remote):
        raise CacheError(f"{path}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "import.h5")
        fs.get_file(remote, local)
        yield local


__all__ = [
    "Problem",
    "StoreDamaged",
    "VerifyReport",
    "export_hdf5",
    "import_hdf5",
    "merge_stores",
    "repair_store",
    "require_sound_store",
    "verify_store",
]
