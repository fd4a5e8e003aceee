"""The zarr store: creation, shard writing with atomic commits, status and sizes.

Layout (docs/cache-format.md is the reference)::

    STORE/                      root group, attribute "distill" = manifest (immutable)
      teacher_tokenizer/<file>  uint8 arrays: the teacher tokenizer's files, byte for byte
      stats/hidden/<l>/mean|std float32 [D]: per-dimension statistics of stored hidden states
      pca/hidden/<l>/mean|components  float32 [H], [H, D]: the basis (only with --hidden-dim)
      shards/00000/             one group per shard; attribute "shard" = its commit record
        input_ids, text, topk_ids, hidden/<l>, ...   rows on the first axis

Commit protocol [commit note]: a shard's rows are written chunk by chunk (``chunk_rows``
rows, aligned to the arrays' chunks, so one writer owns every chunk it touches). After the
data of chunk k is written, its checksum is appended to the shard record, which is one
small JSON object rewritten atomically (temp file + rename on local disk, a single PUT on
object stores). The record therefore never names a chunk whose data is incomplete; a
writer killed mid-chunk leaves a record that ends before that chunk, and a re-run rewrites
it. The record's status becomes ``complete`` only after the last chunk is committed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from distill.cache.schema import (
    MANIFEST_ATTR,
    PCA_GROUP,
    SHARDS_GROUP,
    STATS_GROUP,
    TOKENIZER_GROUP,
    CacheError,
    FieldSpec,
    build_field_specs,
    check_schema,
    describe_manifest_difference,
    manifest_identity,
    shard_name,
)

SHARD_ATTR = "shard"


def open_root(url: str, mode: str = "r") -> zarr.Group:
    """Open the store's root group at a local path or an fsspec URL."""
    try:
        return zarr.open_group(url, mode=mode)
    except FileNotFoundError:
        raise CacheError(f"{url}: no cache store there (create one with `distill cache-teacher`)") from None


def store_exists(url: str) -> bool:
    """True when ``url`` holds a zarr group (finished or not)."""
    try:
        zarr.open_group(url, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False


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


def compressor_for(dtype: str) -> Any:
    """Blosc zstd with byte shuffle: fp16 log-probs and small ints compress well with it."""
    if dtype == "str":
        return "auto"
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


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
) -> zarr.Group:
    """Create a new store: shard groups with pre-sized arrays, tokenizer files, stats; the manifest last.

    ``root_arrays`` maps paths under the root (``stats/hidden/6/mean``...) to small float arrays.
    Writing the manifest last means a creation that dies half-way is recognisable (no manifest).
    """
    root = zarr.open_group(url, mode="w")
    for name, data in tokenizer_files.items():
        root.create_array(f"{TOKENIZER_GROUP}/{name}", data=np.frombuffer(data, dtype=np.uint8))
    for path, data in root_arrays.items():
        root.create_array(path, data=np.ascontiguousarray(data))
    layout = manifest["layout"]
    specs = build_field_specs(layout)
    for index, (start, end) in enumerate(layout["shard_rows"]):
        create_shard_arrays(root, index, end - start, layout["chunk_rows"], specs)
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
            compressors=compressor_for(spec.dtype),
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


# --- writing ------------------------------------------------------------------------------


def checksum_arrays(arrays: dict[str, Any]) -> str:
    """blake2b of a chunk's fields, in name order; strings hashed as length-prefixed UTF-8."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        digest.update(name.encode())
        value = arrays[name]
        if isinstance(value, np.ndarray) and value.dtype.kind not in ("O", "U", "T"):
            digest.update(np.ascontiguousarray(value).tobytes())
        else:
            for s in value:
                b = str(s).encode()
                digest.update(len(b).to_bytes(8, "little") + b)
    return digest.hexdigest()


@dataclass
class ShardWriter:
    """Writes one shard chunk by chunk and commits each chunk after its data (see [commit note])."""

    group: zarr.Group
    index: int

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.group.attrs[SHARD_ATTR])

    def committed_chunks(self) -> int:
        return len(self.record["checksums"])

    def write_chunk(self, chunk: int, arrays: dict[str, Any], tokens: int, nonfinite_rows: Iterable[int]) -> None:
        """Write chunk ``chunk`` (all fields), then commit it. Chunks must be written in order."""
        record = self.record
        if chunk != len(record["checksums"]):
            raise CacheError(f"shard {self.index}: chunk {chunk} written out of order")
        start = chunk * record["chunk_rows"]
        for name, value in arrays.items():
            self.group[name][start : start + len(value)] = value
        record["checksums"].append(checksum_arrays(arrays))
        record["tokens"] += int(tokens)
        record["nonfinite_rows"] += [int(r) for r in nonfinite_rows]
        if len(record["checksums"]) == record["num_chunks"]:
            record["status"] = "complete"
            record["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.group.attrs[SHARD_ATTR] = record


def open_shard_writer(root: zarr.Group, index: int) -> ShardWriter:
    return ShardWriter(root[shard_name(index)], index)  # type: ignore[arg-type]


# --- status and manifest ------------------------------------------------------------------


def shard_records(root: zarr.Group, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each shard's commit record plus its global row range."""
    records = []
    for index, (start, end) in enumerate(manifest["layout"]["shard_rows"]):
        try:
            record = dict(root[shard_name(index)].attrs[SHARD_ATTR])
        except KeyError:
            record = {"status": "missing", "rows": end - start, "checksums": [], "tokens": 0}
        record.update(index=index, row_start=start, row_end=end)
        records.append(record)
    return records


def read_manifest(url: str) -> dict[str, Any]:
    """The full manifest of a store: the immutable part plus every shard's status, rows and checksums."""
    root = open_root(url)
    manifest = load_manifest(root, url)
    manifest["shards"] = shard_records(root, manifest)
    return manifest


def check_compatible(existing: dict[str, Any], wanted: dict[str, Any], url: str) -> None:
    """Refuse to resume into a store whose manifest differs from the one this run would write."""
    diffs = describe_manifest_difference(manifest_identity(existing), manifest_identity(wanted))
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise CacheError(
            f"{url} holds a store with a different manifest ({shown}); pass --overwrite to replace it, "
            "or choose another --out"
        )


def delete_store(url: str) -> None:
    """Remove a store (for --overwrite)."""
    zarr.open_group(url, mode="w")


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
    """Bytes of the store-level arrays: tokenizer files, stats, PCA bases."""
    sizes = {}
    for group_name in (TOKENIZER_GROUP, STATS_GROUP, PCA_GROUP):
        if group_name in root:
            sizes[group_name] = sum(int(a.nbytes_stored()) for _, a in _walk_arrays(root[group_name]))
    return sizes


def _walk_arrays(group: zarr.Group) -> Iterable[tuple[str, zarr.Array]]:
    for name, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            yield name, node


def local_path(url: str) -> str | None:
    """The filesystem path of a local store, or None for a remote URL."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else os.path.abspath(url)


__all__ = [
    "SHARDS_GROUP",
    "ShardWriter",
    "check_compatible",
    "create_store",
    "field_bytes",
    "load_manifest",
    "open_root",
    "read_manifest",
    "shard_records",
    "shard_row_ranges",
    "store_exists",
]
