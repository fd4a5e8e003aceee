"""The zarr store: creation, shard writing with atomic commits, status and sizes.

Layout (docs/cache-format.md is the reference)::

    STORE/                      root group, attribute "distill" = manifest (immutable)
      teacher_tokenizer/<file>  uint8 arrays: the teacher tokenizer's files, byte for byte
      stats/hidden/<l>/mean|std float32 [D]: per-dimension statistics of stored hidden states
      standardize/hidden/<l>/mean|std float32 [H]: per-dimension standardization applied before storing
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

Missing chunks [missing-chunk note]: zarr reads a chunk whose data file is absent as its fill value
(zeros), silently. Writers therefore store every chunk, even an all-zero one (``write_empty_chunks``),
and every reader checks that the files of the committed chunks it reads exist (one listing per
shard); a chunk with an absent file is used only if its checksum still matches (a store written
before that setting may lack the files of all-zero chunks), else it is refused as damaged.

Creation note [creation note]: many processes may start on one fresh store at once (``--shard i/n``
on several machines, or ranks under torchrun). Exactly one creates it: it claims the creation
marker ``distill-creating.json`` with an exclusive create (``O_EXCL`` on local disks, a
conditional PUT on object stores, ``mode="create"`` in fsspec), writes arrays, root arrays and the
manifest last, then removes the marker. The others wait until the manifest appears, then check it
against their own settings. A creator that dies leaves the marker and no manifest: waiters stop
with an error that says so, and one process re-run with ``--overwrite`` starts the store again.

Shard claims [claim note]: a process fills a shard only while it holds the shard's claim record
``shards/NNNNN/claim.json`` (host, pid, started_at, refreshed_at, a random token), so that two
``cache-teacher`` processes on one store split the shards instead of both computing everything. The
claim is created exclusively (``O_EXCL`` on local disks; on fsspec URLs a ``mode="create"`` write,
then a read-back of our token: best effort where the backend has no conditional write), refreshed
after each committed chunk and removed when the shard is done or the process stops. A claim counts
as stale, and is taken over, when its process is gone (same host: ``os.kill(pid, 0)``) or, from
another host, when it was not refreshed for ``DISTILL_CLAIM_TIMEOUT`` seconds (default 1800; hosts'
clocks must roughly agree). Taking over is best effort too: a holder that finds another token in its
claim at a refresh leaves the shard. Two writers on one shard waste work but corrupt nothing
(chunks are deterministic, see [commit note]).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol
from zarr.codecs import BloscCodec, Delta

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
    shard_name,
)

SHARD_ATTR = "shard"
WRITE_CONFIG = {"write_empty_chunks": True}  # [missing-chunk note]
CREATION_MARKER = "distill-creating.json"
CREATE_TIMEOUT_ENV = "DISTILL_CREATE_TIMEOUT"
DEFAULT_CREATE_TIMEOUT_S = 600.0
CLAIM_FILE = "claim.json"
CLAIM_TIMEOUT_ENV = "DISTILL_CLAIM_TIMEOUT"
DEFAULT_CLAIM_TIMEOUT_S = 1800.0


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


def store_exists(url: str) -> bool:
    """True when ``url`` holds a zarr group (finished or not)."""
    try:
        open_group(url, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False


def find_manifest(url: str) -> dict[str, Any] | None:
    """The manifest of the store at ``url``, or None when there is no store or it has no manifest yet."""
    if not store_exists(url):
        return None
    root = open_group(url, mode="r")
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


def compressor_for(dtype: str, name: str = "") -> Any:
    """Blosc zstd with byte shuffle: fp16 log-probs and small ints compress well with it."""
    if dtype == "str":
        return "auto"
    if name in DELTA_FIELDS:  # small sorted gaps: a higher level pays ([target-codec note] in targets.py)
        return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


# Fields stored through zarr's Delta filter (numcodecs.delta): ascending unigram ranks become small gaps.
DELTA_FIELDS = ("target_ids",)
# zarr warns that numcodecs codecs are outside the v3 specification; zarr-python and numcodecs read them.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")


def filters_for(name: str, dtype: str) -> Any:
    """The array-to-array filters of a field: Delta for ``DELTA_FIELDS``, none (zarr's default) otherwise."""
    if name not in DELTA_FIELDS:
        return "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [Delta(dtype=np.dtype(dtype).str)]


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
    The location must be empty or hold only the creation marker (see [creation note]). ``write_manifest=False``
    leaves the manifest to the caller (import writes it after the data).
    """
    root = open_group(url, mode="a")
    for name, data in tokenizer_files.items():
        root.create_array(f"{TOKENIZER_GROUP}/{name}", data=np.frombuffer(data, dtype=np.uint8))
    for path, data in root_arrays.items():
        root.create_array(path, data=np.ascontiguousarray(data))
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
            compressors=compressor_for(spec.dtype, spec.name),
            filters=filters_for(spec.name, spec.dtype),
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
        for name, value in arrays.items():
            self.group[name].with_config(WRITE_CONFIG)[start : start + len(value)] = value  # type: ignore[union-attr]
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


class StoreDamaged(CacheError):
    """A store's data differs from what was committed (a failure, not a usage error)."""


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
    """All fields ``names`` of one chunk of a shard, as numpy arrays."""
    start = chunk * record["chunk_rows"]
    end = min(start + record["chunk_rows"], record["rows"])
    return {name: np.asarray(group[name][start:end]) for name in names}


def chunk_matches_checksum(group: zarr.Group, record: dict[str, Any], chunk: int, names: Any) -> bool:
    """True when chunk ``chunk`` reads back as it was committed (its data files may be absent: all zeros)."""
    return checksum_arrays(read_chunk(group, record, chunk, names)) == record["checksums"][chunk]


def describe_missing(url: str, index: int, chunk: int, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"{url}: shard {index:05d} chunk {chunk}: the data file of {shown} is missing (it would read back as zeros) "
        f"— run `distill cache verify --repair {url}`, then the same `distill cache-teacher` command recomputes it"
    )


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


# --- safe creation by one of many processes (see [creation note]) -------------------------


def claim_creation(url: str) -> bool:
    """Atomically claim the creation of the store at ``url``: True in exactly one of many racing processes."""
    fs, root = store_fs(url)
    token = uuid.uuid4().hex
    marker = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": utc_now(), "token": token}
    data = json.dumps(marker).encode()
    path = f"{root.rstrip('/')}/{CREATION_MARKER}"
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(root, exist_ok=True)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
                f.write(data)
        else:
            fs.pipe_file(path, data, mode="create")  # a conditional PUT on object stores that offer one
    except FileExistsError:
        return False
    # Reading our own token back also catches backends whose "create" is only check-then-write.
    return (read_creation_marker(url) or {}).get("token") == token


def read_creation_marker(url: str) -> dict[str, Any] | None:
    """The creation marker (who is creating the store, since when), {} while being written, None if absent."""
    fs, root = store_fs(url)
    return read_small_json(fs, f"{root.rstrip('/')}/{CREATION_MARKER}")


def read_small_json(fs: Any, path: str) -> dict[str, Any] | None:
    """A small JSON record written by another process: None if absent, {} while it is still being written."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return dict(json.loads(data))
    except ValueError:
        return {}


def release_creation(url: str) -> None:
    """Remove the creation marker (after the manifest is written, or when the claim is not needed)."""
    fs, root = store_fs(url)
    try:
        fs.rm_file(f"{root.rstrip('/')}/{CREATION_MARKER}")
    except FileNotFoundError:
        pass


def store_state(url: str) -> tuple[str, dict[str, Any] | None]:
    """``("ready", manifest)``, ``("creating", marker)``, ``("foreign", None)`` (a zarr group without a
    manifest and nobody creating it) or ``("empty", None)``."""
    manifest = find_manifest(url)
    if manifest is not None:
        return "ready", manifest
    marker = read_creation_marker(url)
    if marker is not None:
        return "creating", marker
    manifest = find_manifest(url)  # the creator may have finished between the two reads
    if manifest is not None:
        return "ready", manifest
    return ("foreign", None) if store_exists(url) else ("empty", None)


def read_seconds_env(name: str, default: float) -> float:
    """The number of seconds in environment variable ``name``, or ``default`` when it is unset."""
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise CacheError(f"{name}={raw!r}: expected a number of seconds") from None


def create_timeout() -> float:
    """Seconds a process waits for another to create a store (``DISTILL_CREATE_TIMEOUT``, default 600)."""
    return read_seconds_env(CREATE_TIMEOUT_ENV, DEFAULT_CREATE_TIMEOUT_S)


def wait_for_creation(url: str, timeout: float, poll_s: float | None = None) -> None:
    """Wait while another process creates the store; return when it is no longer being created.

    Polls every ``poll_s`` seconds (default 0.25 on local disks, 2 on remote stores: fewer requests)."""
    poll_s = poll_s if poll_s is not None else (0.25 if is_local(url) else 2.0)
    deadline = time.monotonic() + timeout
    while True:
        state, marker = store_state(url)
        if state != "creating":
            return
        assert marker is not None
        who = f"pid {marker.get('pid', '?')} on {marker.get('host', '?')} (since {marker.get('started_at', '?')})"
        if creator_died(marker):
            raise CacheError(
                f"{url}: the process creating this store ({who}) died before writing its manifest; re-run one "
                "`distill cache-teacher` with --overwrite to start the store again"
            )
        if time.monotonic() > deadline:
            raise CacheError(
                f"{url}: still being created by {who} after {timeout:.0f}s; if that process died, re-run one "
                f"`distill cache-teacher` with --overwrite, otherwise raise {CREATE_TIMEOUT_ENV}"
            )
        time.sleep(poll_s)


def creator_died(marker: dict[str, Any]) -> bool:
    """True when the marker's process ran on this host and is gone (elsewhere we cannot tell)."""
    if marker.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(marker["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- shard claims (see [claim note]) --------------------------------------------------------


class ShardBusy(CacheError):
    """The shard is claimed by another live process; ``holder`` is its claim record."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass
class ShardClaim:
    """This process's claim on one shard; ``replaced`` is the stale claim it took over, if any."""

    url: str
    index: int
    record: dict[str, Any]
    replaced: dict[str, Any] | None = None
    lost: bool = False

    def refresh(self) -> None:
        """Rewrite ``refreshed_at`` (after each committed chunk); mark the claim lost if another took it over."""
        if self.lost:
            return
        if (read_shard_claim(self.url, self.index) or {}).get("token") != self.record["token"]:
            self.lost = True
            return
        self.record["refreshed_at"] = utc_now()
        write_claim_file(self.url, self.index, self.record, exclusive=False)

    def release(self) -> None:
        """Remove the claim if it is still ours (idempotent)."""
        if (read_shard_claim(self.url, self.index) or {}).get("token") == self.record["token"]:
            remove_claim_file(self.url, self.index)


def claim_file_path(url: str, index: int) -> tuple[Any, str]:
    fs, root = store_fs(url)
    return fs, f"{root.rstrip('/')}/{shard_name(index)}/{CLAIM_FILE}"


def write_claim_file(url: str, index: int, record: dict[str, Any], exclusive: bool) -> None:
    """Write a claim: exclusively (FileExistsError if one exists) or replacing ours atomically."""
    fs, path = claim_file_path(url, index)
    data = json.dumps(record).encode()
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data, mode="create" if exclusive else "overwrite")  # one PUT: never torn
        return
    if exclusive:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            f.write(data)
        return
    temp = f"{path}.{record['token']}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def remove_claim_file(url: str, index: int) -> None:
    fs, path = claim_file_path(url, index)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def read_shard_claim(url: str, index: int) -> dict[str, Any] | None:
    """The claim record of shard ``index``: None when unclaimed, {} while it is being written."""
    fs, path = claim_file_path(url, index)
    return read_small_json(fs, path)


def claim_timeout() -> float:
    """Seconds after which another host's unrefreshed claim is stale (``DISTILL_CLAIM_TIMEOUT``, default 1800)."""
    return read_seconds_env(CLAIM_TIMEOUT_ENV, DEFAULT_CLAIM_TIMEOUT_S)


def claim_is_stale(claim: dict[str, Any], url: str, index: int) -> bool:
    """Same host: its process is gone (or is us: a reused pid). Elsewhere: not refreshed within the timeout."""
    if claim.get("host") == socket.gethostname() and claim.get("pid") is not None:
        return claim.get("pid") == os.getpid() or creator_died(claim)
    stamp = claim.get("refreshed_at") or claim.get("started_at")
    if stamp is None:  # unreadable (being written, or torn by a crash): judge it by the file's age
        fs, path = claim_file_path(url, index)
        try:
            modified = fs.modified(path).timestamp()
        except (FileNotFoundError, NotImplementedError, OSError):
            return False
        return time.time() - modified > claim_timeout()
    try:
        age = time.time() - calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return False
    return age > claim_timeout()


def describe_holder(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(since {holder.get('started_at', '?')}, last seen {holder.get('refreshed_at', '?')})"
    )


def claim_shard(url: str, index: int) -> ShardClaim:
    """Claim shard ``index`` for this process, taking over a stale claim; ShardBusy if a live process holds it."""
    now = utc_now()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now, "refreshed_at": now}
    record["token"] = uuid.uuid4().hex
    replaced = None
    for _ in range(3):  # a stale claim is removed, then the exclusive create is raced again
        try:
            write_claim_file(url, index, record, exclusive=True)
        except FileExistsError:
            holder = read_shard_claim(url, index)
            if holder is None:
                continue  # released meanwhile
            if not claim_is_stale(holder, url, index):
                raise ShardBusy(f"shard {index} is being filled by {describe_holder(holder)}", holder) from None
            if read_shard_claim(url, index) == holder:  # still the stale one: narrows the takeover race
                remove_claim_file(url, index)
            replaced = holder
            continue
        # Reading our token back also catches backends whose "create" is only check-then-write.
        holder = read_shard_claim(url, index) or {}
        if holder.get("token") == record["token"]:
            return ShardClaim(url, index, record, replaced)
        raise ShardBusy(f"shard {index} is being filled by {describe_holder(holder)}", holder)
    holder = read_shard_claim(url, index) or {}
    raise ShardBusy(f"shard {index} is being filled by {describe_holder(holder)}", holder)


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


__all__ = [
    "SHARDS_GROUP",
    "ShardBusy",
    "ShardClaim",
    "ShardWriter",
    "claim_shard",
    "read_shard_claim",
    "check_compatible",
    "claim_creation",
    "create_store",
    "delete_store",
    "find_manifest",
    "open_group",
    "release_creation",
    "store_state",
    "wait_for_creation",
    "field_bytes",
    "load_manifest",
    "open_root",
    "read_manifest",
    "shard_records",
    "shard_row_ranges",
    "store_exists",
]
