"""Shard writing with atomic commits, and the checks for chunk data files that went missing.

Commit protocol [commit note]: a shard's rows are written chunk by chunk (``chunk_rows``
rows, aligned to the arrays' chunks, so one writer owns every chunk it touches). After the
data of chunk k is written, its checksum is appended to the shard record, which is one
small JSON object rewritten atomically (temp file + rename on local disk, a single PUT on
object stores). The record therefore never names a chunk whose data is incomplete; a
writer killed mid-chunk leaves a record that ends before that chunk, and a re-run rewrites
it. The record's status becomes ``complete`` only after the last chunk is committed.

Missing chunks [missing-chunk note]: zarr reads a chunk whose data file is absent as its fill value
(zeros), silently. Writers therefore store every chunk, even an all-zero one (``write_empty_chunks``),
and every reader checks that the files of the committed chunks it reads exist (one listing per
shard); a chunk with an absent file is used only if its checksum still matches (a store written
before that setting may lack the files of all-zero chunks), else it is refused as damaged.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from distill.cache.schema import (
    CacheError,
    StoreDamaged,
    shard_name,
)
from distill.cache.store import SHARD_ATTR, decode_rows, encode_rows, store_fs

WRITE_CONFIG = {"write_empty_chunks": True}  # [missing-chunk note]


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
    arrays: dict[str, Any] = field(default_factory=dict)  # name -> the field's array, opened once for the writes

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.group.attrs[SHARD_ATTR])

    def committed_chunks(self) -> int:
        record = self.record
        return len(record["checksums"]) - len(record.get("redo", []))

    def write_chunk(self, chunk: int, arrays: dict[str, Any], tokens: int, nonfinite_rows: Iterable[int]) -> None:
        """Write chunk ``chunk`` (all fields), then commit it. Chunks are written in order, except those that
        ``cache verify --repair`` marked to redo, which are rewritten in place."""
        record = self.record
        redo = list(record.get("redo", []))
        if chunk != len(record["checksums"]) and chunk not in redo:
            raise CacheError(f"shard {self.index}: chunk {chunk} written out of order")
        start = chunk * record["chunk_rows"]
        for name in arrays:
            if name not in self.arrays:  # opening an array reads its metadata: once per shard, not per chunk
                self.arrays[name] = self.group[name].with_config(WRITE_CONFIG).async_array  # type: ignore[union-attr]
        rows = {name: encode_rows(self.arrays[name], value) for name, value in arrays.items()}

        async def write_all() -> list:  # every field at once: their chunks are encoded and written concurrently
            writes = (self.arrays[n].setitem(slice(start, start + len(v)), v) for n, v in rows.items())
            return await asyncio.gather(*writes, return_exceptions=True)  # all finished before any error is raised

        for outcome in sync(write_all()):
            if isinstance(outcome, BaseException):
                raise outcome
        if chunk in redo:
            record["checksums"][chunk] = checksum_arrays(arrays)
            record["redo"] = [c for c in redo if c != chunk]
        else:
            record["checksums"].append(checksum_arrays(arrays))
        record["tokens"] += int(tokens)
        record["nonfinite_rows"] = sorted({*record["nonfinite_rows"], *(int(r) for r in nonfinite_rows)})
        if len(record["checksums"]) == record["num_chunks"] and not record.get("redo"):
            record["status"] = "complete"
            record["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.group.attrs[SHARD_ATTR] = record


def open_shard_writer(root: zarr.Group, index: int) -> ShardWriter:
    return ShardWriter(root[shard_name(index)], index)  # type: ignore[arg-type]


# --- missing chunk files (see [missing-chunk note]) ----------------------------------------


def chunk_file(array: zarr.Array, chunk: int) -> str:
    """The key, relative to the store's root, of the data file of row-chunk ``chunk`` of ``array``."""
    return f"{array.path}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"


def stored_files(url: str, prefix: str) -> set[str]:
    """Every file (key) under ``prefix`` of the store at ``url``, relative to its root: one listing."""
    fs, root = store_fs(url)
    root = root.rstrip("/")
    base = f"{root}/{prefix}".rstrip("/")
    if not fs.exists(base):
        return set()
    return {path[len(root) + 1 :] for path in fs.find(base)}


def missing_chunk_files(group: zarr.Group, names: Iterable[str], chunks: Iterable[int], files: set[str]) -> dict:
    """``{chunk: [field, ...]}`` for the chunks among ``chunks`` whose data file of some field is absent."""
    missing: dict[int, list[str]] = {}
    for chunk in chunks:
        for name in names:
            if chunk_file(group[name], chunk) not in files:  # type: ignore[arg-type]
                missing.setdefault(chunk, []).append(name)
    return missing


def read_chunk(group: zarr.Group, record: dict[str, Any], chunk: int, names: Any) -> dict[str, np.ndarray]:
    """All fields ``names`` of one chunk of a shard, as numpy arrays of their values (decoded: [delta note] in
    store.py)."""
    start = chunk * record["chunk_rows"]
    end = min(start + record["chunk_rows"], record["rows"])
    return {name: read_rows_of(group[name], slice(start, end)) for name in names}  # type: ignore[arg-type]


def read_rows_of(array: zarr.Array, rows: slice | np.ndarray) -> np.ndarray:
    """Rows ``rows`` (a slice, or local indices) of one shard array, as their values: a delta-coded field decoded
    ([delta note] in store.py)."""
    stored = array[rows] if isinstance(rows, slice) else array.oindex[rows]
    return decode_rows(array, np.asarray(stored))


def chunk_matches_checksum(group: zarr.Group, record: dict[str, Any], chunk: int, names: Any) -> bool:
    """True when chunk ``chunk`` reads back as it was committed (its data files may be absent: all zeros)."""
    return checksum_arrays(read_chunk(group, record, chunk, names)) == record["checksums"][chunk]


def describe_missing(url: str, index: int, chunk: int, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"{url}: shard {index:05d} chunk {chunk}: the data file of {shown} is missing (it would read back as zeros) "
        f"— run `distill cache verify --repair {url}`, then the same `distill cache-teacher` command recomputes it"
    )


__all__ = ["ShardWriter", "StoreDamaged", "checksum_arrays", "missing_chunk_files", "open_shard_writer", "read_chunk"]
