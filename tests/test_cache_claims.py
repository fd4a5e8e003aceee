"""Shard claims: two cache-teacher processes on one store split its shards; stale claims are taken over."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zarr

from distill.cache.claims import CLAIM_FILE, ShardBusy, claim_shard, read_shard_claim, write_claim_file
from tests.helpers import assert_stores_equal, cache_args, invoke, spawn

SETTINGS = {"max_rows": 48, "num_shards": 2}  # 6 chunks of 8 rows: two shards of 3 chunks

# Runs the real CLI, but holds both processes at their first shard claim until both are there, so that
# they always race for shard 0 (the creation of the fresh store is raced as it comes).
CLAIM_RACE_HARNESS = r"""
import os, sys, time
from pathlib import Path
import distill.pipeline.teacher.shard_policy as teacher

barrier = Path(sys.argv.pop(1))
real_claim = teacher.claim_shard

def claim(url, index):
    if not (barrier / str(os.getpid())).exists():
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 2:
            time.sleep(0.005)
    return real_claim(url, index)

teacher.claim_shard = claim
from distill.cli import main
sys.argv = ["distill", *sys.argv[1:]]
main()
"""


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_claim(store: Path, index: int, **fields: object) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    claim = {"host": socket.gethostname(), "pid": os.getppid(), "started_at": now, "refreshed_at": now, "token": "t"}
    (store / "shards" / f"{index:05d}" / CLAIM_FILE).write_text(json.dumps({**claim, **fields}))


def filled_shards(output: str) -> list[int]:
    found = re.search(r"filled shards: ([^;]*);", output)
    assert found, output
    return [] if found.group(1) == "none" else [int(i) for i in found.group(1).split(", ")]


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory) -> Path:
    """One process, every shard: what any mix of writers must reproduce."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1)
    out = tmp_path_factory.mktemp("reference") / "store"
    result = invoke("cache-teacher", *cache_args(tiny_assets, out, **SETTINGS))
    torch.set_num_threads(previous)
    assert result.exit_code == 0, result.output
    assert filled_shards(result.output) == [0, 1]
    assert not list(out.glob(f"shards/*/{CLAIM_FILE}"))  # released when done
    return out


@pytest.fixture
def half_done(reference, tmp_path) -> Path:
    """A copy of the reference whose shard 1 has only its first chunk committed."""
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    group = zarr.open_group(str(store / "shards" / "00001"), mode="a")
    record = dict(group.attrs["shard"])
    group.attrs["shard"] = {**record, "status": "partial", "checksums": record["checksums"][:1]}
    return store


def test_two_processes_without_shard_split_the_shards(tiny_assets, reference, tmp_path):
    store = tmp_path / "store"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    harness = [sys.executable, "-c", CLAIM_RACE_HARNESS, str(barrier), "cache-teacher"]
    procs = [spawn(harness + cache_args(tiny_assets, store, **SETTINGS)) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    filled = [filled_shards(out) for out, _ in outputs]
    assert sorted(filled) == [[0], [1]], outputs  # each shard filled once, by one of them
    assert sum(int(re.search(r"cached (\d+) rows", out).group(1)) for out, _ in outputs) == 48  # type: ignore[union-attr]
    assert not list(store.glob(f"shards/*/{CLAIM_FILE}"))
    verified = invoke("cache", "verify", store)
    assert verified.exit_code == 0 and "sound (2 shards, 48 rows, 6 chunks checksummed)" in verified.stdout
    assert_stores_equal(store, reference)


def test_claim_of_a_dead_process_is_taken_over(tiny_assets, reference, half_done, single_thread):
    write_claim(half_done, 1, pid=dead_pid())
    result = invoke("cache-teacher", *cache_args(tiny_assets, half_done, **SETTINGS))
    assert result.exit_code == 0, result.output
    assert "shard 1: taking over the stale claim of pid" in result.output
    assert filled_shards(result.output) == [1] and "cached 16 rows" in result.output
    assert read_shard_claim(str(half_done), 1) is None
    assert_stores_equal(half_done, reference)


def test_shard_of_a_live_process_is_skipped_or_refused(tiny_assets, reference, half_done, single_thread):
    write_claim(half_done, 1)  # our parent: alive, on this host
    refused = invoke("cache-teacher", *cache_args(tiny_assets, half_done, **SETTINGS, shard="1/2"))
    assert refused.exit_code == 1
    lines = refused.output.strip().splitlines()
    assert re.fullmatch(rf"error: .*shard 1 is being filled by pid {os.getppid()} on host .*--shard 1/2.*", lines[-1])
    assert "Traceback" not in refused.output

    skipped = invoke("cache-teacher", *cache_args(tiny_assets, half_done, **SETTINGS))
    assert skipped.exit_code == 0, skipped.output
    assert filled_shards(skipped.output) == [] and "cached 0 rows" in skipped.output
    host = socket.gethostname()
    assert f"shard 1 is being filled by pid {os.getppid()} on host {host}; re-run when it is done" in skipped.output
    assert read_shard_claim(str(half_done), 1)["token"] == "t"  # type: ignore[index]  # not ours to remove


@pytest.mark.parametrize("kind", ["memory", "path"])
def test_claims_other_hosts_and_refresh(kind, tmp_path, monkeypatch):
    url = f"memory://claims-{uuid.uuid4().hex[:8]}" if kind == "memory" else str(tmp_path / "store")
    if kind == "path":
        (tmp_path / "store" / "shards" / "00000").mkdir(parents=True)
    claim = claim_shard(url, 0)
    assert claim.replaced is None and read_shard_claim(url, 0) == claim.record

    other = {**claim.record, "host": "elsewhere", "pid": 1, "token": "theirs"}

    write_claim_file(url, 0, other, exclusive=False)  # another host took it over
    claim.refresh()
    assert claim.lost  # so this process leaves the shard
    claim.release()
    assert read_shard_claim(url, 0) == other  # not ours to remove

    monkeypatch.setenv("DISTILL_CLAIM_TIMEOUT", "60")
    with pytest.raises(ShardBusy, match="shard 0 is being filled by pid 1 on host elsewhere"):
        claim_shard(url, 0)  # refreshed just now
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 120))
    write_claim_file(url, 0, {**other, "refreshed_at": old}, exclusive=False)
    mine = claim_shard(url, 0)  # silent for longer than the timeout: taken over
    assert mine.replaced is not None and mine.replaced["token"] == "theirs"
    mine.release()
    assert read_shard_claim(url, 0) is None
