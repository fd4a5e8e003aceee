"""Many processes on one store: the creation marker (one creator, the others wait) and the shard claims.

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
(chunks are deterministic, see [commit note] in shards.py).
"""

from __future__ import annotations

import calendar
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from distill.cache.schema import (
    CacheError,
    shard_name,
)
from distill.cache.store import find_manifest, is_local, store_exists, store_fs

CREATION_MARKER = "distill-creating.json"
CREATE_TIMEOUT_ENV = "DISTILL_CREATE_TIMEOUT"
DEFAULT_CREATE_TIMEOUT_S = 600.0
CLAIM_FILE = "claim.json"
CLAIM_TIMEOUT_ENV = "DISTILL_CLAIM_TIMEOUT"
DEFAULT_CLAIM_TIMEOUT_S = 1800.0


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


__all__ = [
    "ShardBusy",
    "ShardClaim",
    "claim_creation",
    "claim_shard",
    "read_shard_claim",
    "release_creation",
    "store_state",
    "wait_for_creation",
]
