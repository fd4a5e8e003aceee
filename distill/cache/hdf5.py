"""Export a store to one HDF5 file and import it back.

    distill cache export STORE --format hdf5 FILE
    distill cache import FILE STORE

STORE and FILE are local paths or fsspec URLs. Export and import re-check every chunk's checksum on the
way, so a damaged store is never handed on silently. docs/cache-format.md describes the HDF5 layout.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import zarr

from distill.cache.claims import read_creation_marker
from distill.cache.schema import (
    MANIFEST_ATTR,
    ROOT_ARRAY_GROUPS,
    TOKENIZER_GROUP,
    CacheError,
    FieldSpec,
    build_field_specs,
    check_schema,
    shard_name,
)
from distill.cache.shards import (
    WRITE_CONFIG,
    StoreDamaged,
    checksum_arrays,
    read_chunk,
)
from distill.cache.store import (
    SHARD_ATTR,
    create_store,
    delete_store,
    encode_rows,
    load_manifest,
    open_root,
    root_arrays,
    shard_records,
    store_exists,
)
from distill.cache.verify import committed_chunk_indices, require_sound_store

HDF5_FORMAT = "distill-cache-hdf5"
HDF5_COMPRESSIONS = ("gzip", "lzf", "none")


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
    require_sound_store(url, deep=False)  # a false tokenizer hash or a missing chunk file is refused, not written out
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
            array = group[name]
            array.with_config(WRITE_CONFIG)[start:end] = encode_rows(array, value)  # type: ignore[union-attr]
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


__all__ = ["export_hdf5", "import_hdf5"]
