"""The zarr store: locations, opening and the manifest, creation of a new store, status and sizes.

Layout (docs/cache-format.md is the reference)::

    STORE/                      root group, attribute "distill" = manifest (immutable)
      teacher_tokenizer/<file>  uint8 arrays: the teacher tokenizer's files, byte for byte
      stats/hidden/<l>/mean|std float32 [D]: per-dimension statistics of stored hidden states
      standardize/hidden/<l>/mean|std float32 [H]: per-dimension standardization applied before storing
      pca/hidden/<l>/mean|components  float32 [H], [H, D]: the basis (only with --hidden-dim)
      shards/00000/             one group per shard; attribute "shard" = its commit record
        input_ids, text, topk_ids, hidden/<l>, ...   rows on the first axis

Shards are written and committed by ``shards.py`` (see [commit note] in shards.py); the creation marker and
the shard claims that let many processes share one store are in ``claims.py`` ([creation note], [claim note]).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.utils import get_protocol
from zarr.codecs import BloscCodec

from distill.cache.schema import (
    MANIFEST_ATTR,
    ROOT_ARRAY_GROUPS,
    TOKENIZER_GROUP,
    CacheError,
    FieldSpec,
    StoreDamaged,
    build_field_specs,
    check_schema,
    describe_manifest_difference,
    manifest_identity,
    shard_name,
)

SHARD_ATTR = "shard"
ROOT_GROUPS = (TOKENIZER_GROUP, *ROOT_ARRAY_GROUPS)


# --- locations: local paths and fsspec URLs -----------------------------------------------


def is_url(url: str) -> bool:
    return "://" in url


def is_local(url: str) -> bool:
    """True for a plain path or a ``file://`` URL."""
    return not is_url(url) or get_protocol(url) in ("file", "local")


def zarr_storage_options(url: str) -> dict[str, Any] | None:
    """fsspec options zarr needs for ``url``: ``file://`` stores must create their folders as they go."""
    return {"auto_mkdir": True} if is_url(url) and is_local(url) else None


def open_group(url: str, mode: str) -> zarr.Group:
    """``zarr.open_group`` at a local path (zarr's LocalStore) or an fsspec URL (zarr's FsspecStore)."""
    return zarr.open_group(url, mode=mode, storage_options=zarr_storage_options(url))


def store_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and root path of a store, for byte-level work (markers, raw copies)."""
    options = {"auto_mkdir": True} if is_local(url) else {}
    return fsspec.core.url_to_fs(url, **options)


def open_root(url: str, mode: str = "r") -> zarr.Group:
    """Open the store's root group at a local path or an fsspec URL."""
    try:
        return open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise CacheError(
            f"{url}: no cache store there — check the path, or create one with `distill cache-teacher`"
        ) from None
    except json.JSONDecodeError:
        raise damaged_metadata(url, "zarr.json", "the store's manifest") from None


def damaged_metadata(url: str, key: str, what: str) -> StoreDamaged:
    """A ``zarr.json`` that is not JSON (truncated by a full disk or an interrupted copy), as one line that names
    it and says what to do."""
    return StoreDamaged(
        f"{url}: {key} ({what}) is not valid JSON — the store is damaged (a truncated write or copy): restore it "
        "from a good copy, or re-create it with `distill cache-teacher ... --overwrite`"
    )


def store_exists(url: str) -> bool:
    """True when ``url`` holds a zarr group (finished or not)."""
    try:
        open_group(url, mode="r")
        return True
    except json.JSONDecodeError:  # its zarr.json is being written (see find_manifest)
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False


def find_manifest(url: str) -> dict[str, Any] | None:
    """The manifest of the store at ``url``, or None when there is no store or it has no manifest yet.

    A ``zarr.json`` that is not valid JSON reads as "no manifest yet": another process may be writing it
    right now (fsspec and zarr write it in place, not atomically), and the creation marker, which is
    removed only after the manifest is complete, tells the caller to wait ([creation note] in claims.py).
    """
    if not store_exists(url):
        return None
    try:
        root = open_group(url, mode="r")
    except json.JSONDecodeError:
        return None
    return load_manifest(root, url) if MANIFEST_ATTR in root.attrs else None


def load_manifest(root: zarr.Group, url: str) -> dict[str, Any]:
    """The immutable manifest of an opened store, checked for its schema version."""
    manifest = root.attrs.get(MANIFEST_ATTR)
    if manifest is None:
        raise CacheError(
            f"{url}: a zarr group without a distill manifest (an interrupted creation, or not a distill store); "
            "re-run `distill cache-teacher` with --overwrite to start it again"
        )
    check_schema(manifest, url)
    return dict(manifest)


# --- creation -----------------------------------------------------------------------------


def compressor_for(name: str = "") -> BloscCodec:
    """Blosc zstd with byte shuffle (a codec of the zarr v3 core specification): fp16 log-probs and small ints
    compress well with it; ``text`` is compressed the same way after zarr's ``vlen-utf8`` serializer."""
    if name in DELTA_FIELDS:  # small sorted gaps: a higher level pays ([target-codec note] in targets.py)
        return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


# [delta note] Fields whose values ascend along their last axis are stored as differences along it: the first
# slot as it is, each next one minus the one before (in the array's dtype). Distill codes and decodes them itself
# (``encode_rows``, ``decode_rows``), so the chunks go through core zarr v3 codecs only (bytes, blosc) and any v3
# reader opens them; the array's attribute ``DELTA_ATTR`` = {"axis": a} says to take a cumulative sum along axis a.
# Schema-3 stores hold the plain values behind numcodecs' Delta filter (over the flattened chunk) and have no such
# attribute: zarr-python undoes that filter itself, so the same code reads them unchanged.
DELTA_FIELDS = ("target_ids",)
DELTA_ATTR = "delta_coding"
# zarr warns about numcodecs' Delta filter when it opens a field of such an older store; it reads it all the same.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def delta_attributes(name: str, ndim: int) -> dict[str, Any]:
    """The attributes of a new field array: ``DELTA_ATTR`` for ``DELTA_FIELDS`` ([delta note]), none otherwise."""
    return {DELTA_ATTR: {"axis": ndim - 1}} if name in DELTA_FIELDS else {}


def encode_rows(array: zarr.Array, rows: Any) -> Any:
    """What to write into ``array`` for ``rows`` (a run of whole rows, every axis but the first complete): the
    differences along the delta axis for a delta-coded array ([delta note]), ``rows`` unchanged otherwise."""
    coding = array.attrs.get(DELTA_ATTR)
    if coding is None:
        return rows
    values = np.asarray(rows).astype(array.dtype)
    first = np.zeros_like(values.take([0], axis=coding["axis"]))
    return np.diff(values, axis=coding["axis"], prepend=first)  # wraps around in an unsigned dtype; cumsum undoes it


def decode_rows(array: zarr.Array, stored: np.ndarray) -> np.ndarray:
    """The values of whole rows read from ``array`` as stored: the cumulative sum along the delta axis for a
    delta-coded array ([delta note]), ``stored`` unchanged otherwise."""
    coding = array.attrs.get(DELTA_ATTR)
    if coding is None:
        return stored
    return np.cumsum(stored, axis=coding["axis"], dtype=stored.dtype)


def shard_row_ranges(num_rows: int, chunk_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Split rows into ``num_shards`` contiguous ranges whose starts are multiples of ``chunk_rows``."""
    num_chunks = -(-num_rows // chunk_rows)
    if num_shards > num_chunks:
        raise CacheError(
            f"{num_shards} shards but only {num_chunks} chunks of {chunk_rows} rows: use fewer shards "
            "(--num-shards) or smaller chunks (--chunk-rows)"
        )
    bounds = [i * num_chunks // num_shards for i in range(num_shards + 1)]
    return [(min(a * chunk_rows, num_rows), min(b * chunk_rows, num_rows)) for a, b in zip(bounds, bounds[1:])]


def create_store(
    url: str,
    manifest: dict[str, Any],
    tokenizer_files: dict[str, bytes],
    root_arrays: dict[str, np.ndarray],
    write_manifest: bool = True,
) -> zarr.Group:
    """Create a new store: shard groups with pre-sized arrays, tokenizer files, stats; the manifest last.

    ``root_arrays`` maps paths under the root (``stats/hidden/6/mean``...) to small float arrays.
    Writing the manifest last means a creation that dies half-way is recognisable (no manifest).
    The location must be empty or hold only the creation marker (see [creation note] in claims.py).
    ``write_manifest=False`` leaves the manifest to the caller (import writes it after the data).
    """
    root = open_group(url, mode="a")
    for name, data in tokenizer_files.items():
        file_bytes = np.frombuffer(data, dtype=np.uint8)
        root.create_array(f"{TOKENIZER_GROUP}/{name}", data=file_bytes, compressors=compressor_for())
    for path, data in root_arrays.items():
        root.create_array(path, data=np.ascontiguousarray(data), compressors=compressor_for())
    layout = manifest["layout"]
    specs = build_field_specs(layout)
    for index, (start, end) in enumerate(layout["shard_rows"]):
        create_shard_arrays(root, index, end - start, layout["chunk_rows"], specs)
    if write_manifest:
        root.attrs[MANIFEST_ATTR] = manifest
    return root


def create_shard_arrays(root: zarr.Group, index: int, rows: int, chunk_rows: int, specs: dict[str, FieldSpec]) -> None:
    """Pre-size every field of one shard and write its empty commit record."""
    group = root.create_group(shard_name(index))
    for spec in specs.values():
        dtype: Any = str if spec.dtype == "str" else spec.dtype
        group.create_array(
            spec.name,
            shape=(rows, *spec.row_shape),
            chunks=(chunk_rows, *spec.row_shape),
            dtype=dtype,
            compressors=compressor_for(spec.name),
            attributes=delta_attributes(spec.name, 1 + len(spec.row_shape)),
        )
    group.attrs[SHARD_ATTR] = new_shard_record(rows, chunk_rows)


def new_shard_record(rows: int, chunk_rows: int) -> dict[str, Any]:
    return {
        "status": "partial",
        "rows": rows,
        "chunk_rows": chunk_rows,
        "num_chunks": -(-rows // chunk_rows),
        "checksums": [],
        "tokens": 0,
        "nonfinite_rows": [],
    }


# --- status and manifest ------------------------------------------------------------------


def shard_records(root: zarr.Group, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each shard's commit record plus its global row range."""
    records = []
    for index, (start, end) in enumerate(manifest["layout"]["shard_rows"]):
        try:
            record = read_shard_record(root, index)
        except KeyError:
            record = {"status": "missing", "rows": end - start, "checksums": [], "tokens": 0}
        record.update(index=index, row_start=start, row_end=end)
        records.append(record)
    return records


RECORD_READ_TRIES = 20  # x 0.05 s: the time another process may take to rewrite a record in place


def read_shard_record(root: zarr.Group, index: int) -> dict[str, Any]:
    """Shard ``index``'s commit record. Its zarr.json is rewritten in place at every commit of the process filling
    it: a read that finds it cut short tries again, and only one that stays so reports a damaged store."""
    for _ in range(RECORD_READ_TRIES):
        try:
            return dict(root[shard_name(index)].attrs[SHARD_ATTR])
        except json.JSONDecodeError:
            time.sleep(0.05)
    where = str(root.store).removeprefix("file://")
    raise damaged_metadata(where, f"{shard_name(index)}/zarr.json", f"shard {index}'s record")


def read_manifest(url: str) -> dict[str, Any]:
    """The full manifest of a store: the immutable part plus every shard's status, rows and checksums."""
    root = open_root(url)
    manifest = load_manifest(root, url)
    manifest["shards"] = shard_records(root, manifest)
    return manifest


def check_compatible(existing: dict[str, Any], wanted: dict[str, Any], url: str) -> None:
    """Refuse to resume into a store whose manifest differs from the one this run would write."""
    if existing.get("schema_version") != wanted.get("schema_version"):
        raise CacheError(
            f"{url} was written by schema version {existing.get('schema_version')} (distill "
            f"{existing.get('code_version')}); this distill writes version {wanted.get('schema_version')} and reads "
            "the old store as it is (train, eval, verify, merge, export), but cannot add rows to it: finish it with "
            "the distill that made it, or re-create it with --overwrite"
        )
    diffs = describe_manifest_difference(manifest_identity(existing), manifest_identity(wanted))
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise CacheError(
            f"{url} holds a store with a different manifest ({shown}); pass --overwrite to replace it, "
            "or choose another --out"
        )


def delete_store(url: str) -> None:
    """Remove a store and everything under its location (for --overwrite, and after a failed creation)."""
    fs, root = store_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- sizes --------------------------------------------------------------------------------


def field_bytes(root: zarr.Group, manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes on disk (compressed chunks plus metadata) per field, summed over shards."""
    sizes: dict[str, int] = {}
    specs = build_field_specs(manifest["layout"])
    for index in range(len(manifest["layout"]["shard_rows"])):
        group = root[shard_name(index)]
        for name in specs:
            array = group[name]
            sizes[name] = sizes.get(name, 0) + int(array.nbytes_stored())
    return sizes


def other_bytes(root: zarr.Group) -> dict[str, int]:
    """Bytes of the store-level arrays: tokenizer files, stats, PCA bases, standardization."""
    sizes = {}
    for group_name in (TOKENIZER_GROUP, *ROOT_ARRAY_GROUPS):
        if group_name in root:
            sizes[group_name] = sum(int(a.nbytes_stored()) for _, a in _walk_arrays(root[group_name]))
    return sizes


def _walk_arrays(group: zarr.Group) -> Iterable[tuple[str, zarr.Array]]:
    for name, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            yield name, node


def root_arrays(root: zarr.Group) -> dict[str, np.ndarray]:
    """Every store-level array (tokenizer files, statistics, PCA bases) by path."""
    arrays = {}
    for group_name in ROOT_GROUPS:
        if group_name in root:
            for name, node in root[group_name].members(max_depth=None):
                if isinstance(node, zarr.Array):
                    arrays[f"{group_name}/{name}"] = np.asarray(node[:])
    return arrays


__all__ = [
    "DELTA_ATTR",
    "ROOT_GROUPS",
    "SHARD_ATTR",
    "check_compatible",
    "create_store",
    "decode_rows",
    "delete_store",
    "encode_rows",
    "field_bytes",
    "find_manifest",
    "load_manifest",
    "open_group",
    "open_root",
    "other_bytes",
    "read_manifest",
    "root_arrays",
    "shard_records",
    "shard_row_ranges",
    "store_exists",
]
