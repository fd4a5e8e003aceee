"""Sharing and scaling a store: parallel writers, torchrun, URLs, verify, merge, HDF5 export and import."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

from distill.cache.claims import CREATION_MARKER, claim_creation, store_state, wait_for_creation
from distill.cache.reader import CacheReader
from distill.cache.schema import CacheError, manifest_identity
from distill.cache.store import open_root, read_manifest, root_arrays
from distill.cache.verify import require_sound_store
from distill.config import CacheConfig, ConfigError
from distill.pipeline.teacher.shard_policy import new_store_shards, shards_to_fill
from tests.helpers import REPO, assert_stores_equal, cache_args, invoke, spawn, subprocess_env

SETTINGS = {"max_rows": 48}  # 6 chunks of 8 rows: two shards of 3 chunks

# Runs the real CLI, but makes both processes reach the creation claim together (a file barrier) and
# makes the creator slow, so that the race and the waiting path happen on every run of the test.
RACE_HARNESS = r"""
import os, sys, time
from pathlib import Path
import distill.cache.writer as teacher

barrier = Path(sys.argv.pop(1))
real_claim, real_create = teacher.claim_creation, teacher.create_store

def claim(url):
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.005)
    return real_claim(url)

def create(*args, **kwargs):
    time.sleep(0.5)
    return real_create(*args, **kwargs)

teacher.claim_creation, teacher.create_store = claim, create
from distill.cli import main
sys.argv = ["distill", *sys.argv[1:]]
main()
"""


def memory_url(name: str) -> str:
    return f"memory://{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory) -> Path:
    """One process, every shard: what any mix of writers must reproduce."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1) and the single_thread fixture
    out = tmp_path_factory.mktemp("reference") / "store"
    result = invoke("cache-teacher", *cache_args(tiny_assets, out, num_shards=2, **SETTINGS))
    torch.set_num_threads(previous)
    assert result.exit_code == 0, result.output
    return out


def assert_same_store(store: str, reference: Path) -> None:
    """Equal arrays per field (NaN-aware) and text, equal records, manifests and store-level arrays."""
    assert_stores_equal(store, reference)  # type: ignore[arg-type]
    a, b = read_manifest(store), read_manifest(str(reference))
    assert manifest_identity({**a, "shards": None}) == manifest_identity({**b, "shards": None})
    ra, rb = root_arrays(open_root(store)), root_arrays(open_root(str(reference)))
    assert sorted(ra) == sorted(rb)
    assert all(ra[k].dtype == rb[k].dtype and ra[k].tobytes() == rb[k].tobytes() for k in ra)


# --- parallel writers ---------------------------------------------------------------------


def test_two_processes_fill_one_fresh_url_store_at_once(tiny_assets, reference, tmp_path):
    store = f"file://{tmp_path / 'store'}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    harness = [sys.executable, "-c", RACE_HARNESS, str(barrier), "cache-teacher"]
    procs = [spawn(harness + cache_args(tiny_assets, store, shard=f"{i}/2", **SETTINGS)) for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    errs = [err for _, err in outputs]
    assert sum("creating file://" in e for e in errs) == 1, errs  # exactly one creator...
    assert sum("waiting for another process" in e for e in errs) == 1  # ...and the other waited for it

    verified = invoke("cache", "verify", store)
    assert verified.exit_code == 0 and "sound (2 shards, 48 rows, 6 chunks checksummed)" in verified.stdout
    assert_same_store(store, reference)


def test_torchrun_ranks_fill_their_shards(tiny_assets, reference, tmp_path):
    store = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "distill.cli", "cache-teacher", *cache_args(tiny_assets, store, **SETTINGS)],
        env=subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("creating ") == 1, proc.stderr[-3000:]
    assert proc.stdout.count("cached 24 rows") == 2  # each rank filled one shard of the two WORLD_SIZE implied
    assert_same_store(str(store), reference)


def test_shard_assignment(monkeypatch):
    cfg = CacheConfig(teacher="t", dataset="d", out="o")
    assert shards_to_fill(cfg, 5) == [0, 1, 2, 3, 4] and new_store_shards(cfg) == 1
    assert new_store_shards(CacheConfig(shard="1/3")) == 3  # --shard i/n sets n for a new store
    with pytest.raises(ConfigError, match="--num-shards 2 and --shard 1/3 disagree"):
        new_store_shards(CacheConfig(shard="1/3", num_shards=2))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shards_to_fill(cfg, 5) == [1, 3] and new_store_shards(cfg) == 2
    assert new_store_shards(CacheConfig(num_shards=8)) == 8
    assert shards_to_fill(CacheConfig(shard="0/5"), 5) == [0]  # an explicit --shard wins


@pytest.mark.parametrize("kind", ["memory", "path"])
def test_exactly_one_of_many_racing_claims_wins(kind, tmp_path):
    url = memory_url("claim") if kind == "memory" else str(tmp_path / "store")
    results: list[bool] = []
    start = threading.Barrier(8)

    def race() -> None:
        start.wait()
        results.append(claim_creation(url))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_a_half_written_root_reads_as_being_created(tmp_path):
    """Another process may be writing zarr.json in place: a torn read is 'creating', then 'ready', never a crash."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')  # cut mid-write
    (store / CREATION_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": "x"}))
    assert store_state(str(store)) == ("creating", {"host": socket.gethostname(), "pid": os.getpid(), "token": "x"})
    (store / CREATION_MARKER).unlink()
    assert store_state(str(store))[0] == "foreign"  # torn with nobody creating it: refused, not a JSON traceback


def test_waiting_for_a_dead_or_stuck_creator_fails_clearly(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    marker = {"host": socket.gethostname(), "pid": int(dead.stdout), "started_at": "then", "token": "x"}
    (store / CREATION_MARKER).write_text(json.dumps(marker))
    with pytest.raises(CacheError, match="died before writing its manifest.*--overwrite"):
        wait_for_creation(str(store), timeout=30)
    (store / CREATION_MARKER).write_text(json.dumps({**marker, "host": "elsewhere"}))
    with pytest.raises(CacheError, match=r"still being created by pid \d+ on elsewhere \(since then\) after 0s"):
        wait_for_creation(str(store), timeout=0.2, poll_s=0.05)


# --- verify -------------------------------------------------------------------------------


def test_flipped_byte_is_named_refused_and_repaired(tiny_assets, reference, single_thread, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    assert invoke("cache", "verify", store).exit_code == 0
    chunk_file = store / "shards" / "00000" / "topk_logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk_file.write_bytes(bytes(data))

    result = invoke("cache", "verify", store)
    assert result.exit_code == 1
    assert "shard 00000 chunk 1: " in result.stdout and "NOT sound" in result.stdout
    assert "shard 00001" not in result.stdout
    with pytest.raises(CacheError, match="not sound.*shard 00000 chunk 1"):
        require_sound_store(str(store))  # what stage 2 calls before training
    exported = invoke("cache", "export", store, tmp_path / "damaged.h5")
    assert exported.exit_code == 1 and "error: shard 00000 chunk 1: checksum mismatch" in exported.stderr
    assert not list(tmp_path.glob("damaged.h5*"))  # no half-written file left behind

    repaired = invoke("cache", "verify", store, "--repair")
    assert repaired.exit_code == 1 and "un-committed the bad chunks of shard(s) 00000" in repaired.stdout
    resumed = invoke("cache-teacher", *cache_args(tiny_assets, store, **SETTINGS))
    assert resumed.exit_code == 0 and "cached 8 rows" in resumed.stdout  # chunk 1 of shard 0 only
    assert invoke("cache", "verify", store).exit_code == 0
    assert_same_store(str(store), reference)


def test_verify_reports_incomplete_shards_and_missing_stores(tiny_assets, single_thread, tmp_path):
    url = memory_url("half")
    assert invoke("cache-teacher", *cache_args(tiny_assets, url, shard="0/2", **SETTINGS)).exit_code == 0
    result = invoke("cache", "verify", url)
    assert result.exit_code == 1
    assert "shard 00001: incomplete (partial, 0/3 chunks committed)" in result.stdout
    missing = invoke("cache", "verify", tmp_path / "nothing")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ") and "no cache store" in missing.stderr


# --- merge --------------------------------------------------------------------------------


def test_merge_gives_the_union_and_refuses_other_manifests_or_overlaps(tiny_assets, reference, single_thread):
    halves = [memory_url(f"half{i}") for i in range(2)]
    for i, url in enumerate(halves):
        result = invoke("cache-teacher", *cache_args(tiny_assets, url, shard=f"{i}/2", **SETTINGS))
        assert result.exit_code == 0, result.output
    merged = memory_url("merged")
    result = invoke("cache", "merge", merged, *halves)
    assert result.exit_code == 0 and "(2 shards, complete)" in result.stdout, result.output
    assert invoke("cache", "verify", merged).exit_code == 0
    info = json.loads(invoke("cache", "info", merged, "--json").stdout)
    assert info["complete"] and info["rows_committed"] == 48
    assert_same_store(merged, reference)

    other = memory_url("other")
    assert invoke("cache-teacher", *cache_args(tiny_assets, other, shard="1/2", top_k=8, **SETTINGS)).exit_code == 0
    refused = invoke("cache", "merge", memory_url("no"), halves[0], other)
    assert refused.exit_code == 2
    assert refused.stderr.count("\n") == 1 and "manifests differ" in refused.stderr
    assert "layout.top_k: 16 != 8" in refused.stderr

    overlap = invoke("cache", "merge", memory_url("no"), halves[0], str(reference))
    assert overlap.exit_code == 2 and "shard 00000 is complete in both" in overlap.stderr
    exists = invoke("cache", "merge", merged, *halves)
    assert exists.exit_code == 2 and "exists" in exists.stderr


# --- HDF5 export / import -----------------------------------------------------------------


def test_hdf5_export_import_round_trip_is_identical(tiny_assets, reference, single_thread, tmp_path):
    source = memory_url("source")
    assert invoke("cache-teacher", *cache_args(tiny_assets, source, num_shards=2, **SETTINGS)).exit_code == 0
    h5 = tmp_path / "store.h5"
    exported = invoke("cache", "export", source, "--format", "hdf5", h5)
    assert exported.exit_code == 0, exported.output
    with h5py.File(h5, "r") as f:  # readable without distill: JSON attributes and plain datasets
        assert json.loads(f.attrs["manifest"])["layout"]["num_rows"] == 48
        assert json.loads(f["shards/00001"].attrs["shard"])["status"] == "complete"
        assert f["shards/00000/text"].asstr()[0] == CacheReader(source).read_rows([0])["text"][0]

    target = f"file://{tmp_path / 'imported'}"
    imported = invoke("cache", "import", h5, target)
    assert imported.exit_code == 0, imported.output
    assert invoke("cache", "verify", target).exit_code == 0
    assert read_manifest(target) == read_manifest(source)  # manifest and every shard record, created_at included
    assert_same_store(target, reference)
    assert CacheReader(target).tokenizer_files() == CacheReader(source).tokenizer_files()

    remote_file = f"{memory_url('file')}/store.h5"  # FILE may be a URL too
    assert invoke("cache", "export", target, remote_file, "--compression", "lzf").exit_code == 0
    from_remote = memory_url("from-remote")
    assert invoke("cache", "import", remote_file, from_remote).exit_code == 0
    assert read_manifest(from_remote) == read_manifest(source)
    assert_same_store(from_remote, reference)

    again = invoke("cache", "import", h5, target)
    assert again.exit_code == 2 and "exists" in again.stderr
    not_ours = tmp_path / "other.h5"
    with h5py.File(not_ours, "w") as f:
        f["x"] = np.zeros(3)
    bad = invoke("cache", "import", not_ours, memory_url("bad"))
    assert bad.exit_code == 2 and "not a distill cache export" in bad.stderr
