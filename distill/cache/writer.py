"""Writing a store from many processes: who creates it, who fills which shard, and a background writer.

Creation ([creation note] in claims.py): the first process to claim the creation calibrates and writes
the store, manifest last; the others wait for the manifest and check it against their own settings.
Filling ([claim note] in claims.py): each shard is filled under its claim, chunk by chunk; a
``BackgroundWriter`` writes and commits one chunk while the teacher computes the next.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from distill.cache.claims import (
    ShardClaim,
    claim_creation,
    create_timeout,
    release_creation,
    store_state,
    wait_for_creation,
)
from distill.cache.shards import ShardWriter
from distill.cache.store import check_compatible, create_store, delete_store, find_manifest, load_manifest, open_root


def open_or_create_store(
    out: str,
    wanted: dict[str, Any],
    manifest_for: Callable[[int], dict[str, Any]],
    files: dict[str, bytes],
    make_root_arrays: Callable[[dict[str, Any]], dict[str, Any]],
    overwrite: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Open the store at ``out`` to resume it, or create it with the ``wanted`` manifest.

    ``manifest_for(num_shards)`` is this process's manifest for a store of that many shards (an existing
    store must match it); ``make_root_arrays(layout)`` runs the calibration of a new store. Safe when many
    processes start on one fresh store at once: one claims the creation, the others wait for its manifest.
    """
    if overwrite:
        delete_store(out)
    while True:
        state, found = store_state(out)
        if state == "ready":
            assert found is not None
            check_compatible(found, manifest_for(len(found["layout"]["shard_rows"])), out)
            return open_root(out, mode="a"), found
        if state == "foreign":
            load_manifest(open_root(out), out)  # raises: a zarr group without a manifest
        if state == "empty" and claim_creation(out):
            if find_manifest(out) is not None:  # another process finished just before our claim
                release_creation(out)
                continue
            create_new_store(out, wanted, files, make_root_arrays)
            return open_root(out, mode="a"), wanted
        tqdm.write(f"cache-teacher: waiting for another process to create {out}", file=sys.stderr)
        wait_for_creation(out, create_timeout())


def create_new_store(
    out: str,
    manifest: dict[str, Any],
    files: dict[str, bytes],
    make_root_arrays: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """Calibrate, write the store (manifest last) and release the claim; on failure remove the partial store."""
    layout = manifest["layout"]
    tqdm.write(f"cache-teacher: creating {out} ({len(layout['shard_rows'])} shards)", file=sys.stderr)
    try:
        create_store(out, manifest, files, make_root_arrays(layout))
    except BaseException:
        delete_store(out)  # so that a waiting process can claim the creation (or fail the same way)
        raise
    release_creation(out)


class BackgroundWriter:
    """Runs storage jobs (write and commit a chunk, release a claim) on a thread, in order, so storage
    overlaps the next teacher forward."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._error is None:
                    job()
            except BaseException as exc:  # re-raised in the main thread
                self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_error()
        self._queue.put(job)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.raise_error()


def commit_chunk(writer: ShardWriter, claim: ShardClaim, chunk: int, arrays: dict, tokens: int, bad: list) -> None:
    """Write and commit one chunk, then refresh the shard's claim (see [claim note] in claims.py)."""
    writer.write_chunk(chunk, arrays, tokens, bad)
    claim.refresh()


def chunks_to_fill(record: dict[str, Any], chunk_rows: int) -> list[tuple[int, int, int]]:
    """``(chunk, global start, global end)`` of a shard's uncommitted chunks (first those --repair marked)."""
    todo = []
    for chunk in [*record.get("redo", []), *range(len(record["checksums"]), record["num_chunks"])]:
        start = record["row_start"] + chunk * chunk_rows
        todo.append((chunk, start, min(start + chunk_rows, record["row_end"])))
    return todo
