"""Merge stores whose shards were filled apart into one store.

    distill cache merge OUT STORE1 STORE2 ...  # equal manifests, disjoint complete shards -> one store

Every STORE is a local path or an fsspec URL. Merge copies the stored bytes (chunks, records, manifest)
as they are, so checksums stay valid.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr

from distill.cache.claims import CLAIM_FILE, read_creation_marker
from distill.cache.schema import (
    SHARDS_GROUP,
    CacheError,
    describe_manifest_difference,
    manifest_identity,
    shard_name,
)
from distill.cache.store import (
    ROOT_GROUPS,
    load_manifest,
    open_root,
    root_arrays,
    shard_records,
    store_exists,
    store_fs,
)
from distill.cache.verify import require_sound_store

COPY_WORKERS = 16


# --- merge --------------------------------------------------------------------------------


def merge_stores(out: str, sources: list[str], workers: int = COPY_WORKERS) -> dict[str, Any]:
    """Copy stores with equal manifests and disjoint complete shards into a new store ``out``.

    Each shard comes from the store where it is complete (else the one where it is furthest along,
    so that re-running cache-teacher on ``out`` finishes it). Bytes are copied as stored; each shard's
    record is read before its data and written after it, so a store still being filled copies safely.
    With one source this is a verbatim copy (to an object store, say).

    [merge-verify note] Each source is verified first (quick: manifest, tokenizer hash, records against the layout,
    every committed chunk's files), so that a damaged store is refused rather than copied into one that looks
    complete; the bytes of the chunks are not re-checksummed here (``distill cache verify OUT`` does).
    """
    if not sources:
        raise CacheError("merge needs at least one store: distill cache merge OUT STORE1 STORE2 ...")
    if store_exists(out) or read_creation_marker(out) is not None:
        raise CacheError(f"{out} exists; merge writes a new store: choose another OUT")
    for src in sources:  # damage is refused, never copied ([merge-verify note])
        require_sound_store(src, deep=False, allow_unfilled=True)
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


def list_keys(url: str, prefix: str = "") -> list[str]:
    """Every stored key (file) under ``prefix`` of a store, relative to the store's root."""
    fs, root = store_fs(url)
    root = root.rstrip("/")
    base = f"{root}/{prefix}".rstrip("/")
    if not fs.exists(base):
        return []
    keys = [path[len(root) + 1 :] for path in fs.find(base)]
    # Neither zarr's temporary files of an ongoing write nor shard claims (see [claim note] in claims.py).
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


__all__ = ["merge_stores"]
