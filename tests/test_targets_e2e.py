"""Compact teacher targets through the real CLI on the tiny teacher: what is stored against the full logits, and
verify, info, merge, export/import, resume, training and schema-2 stores with the new fields."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from distill.cache.reader import CacheReader
from distill.cache.schema import CacheError
from distill.cli import app
from tests.helpers import cache_args, run_train, train_args
from tests.test_cache_resume import assert_stores_equal

SETTINGS = dict(
    max_rows=32,
    hidden_layers="none",
    attention_layers="none",
    vocab_proj=None,
    top_k=16,
    target_samples=8,
    target_mass=0.8,
    packing="none",  # each row is compared with the model on that row alone
)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def stores(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("targets")
    out = {}
    for kind in ("topk", "sampled", "hybrid"):
        out[kind] = root / kind
        result = invoke("cache-teacher", *cache_args(tiny_assets, out[kind], targets=kind, **SETTINGS))
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def full_logits(tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], dtype=torch.float32).eval()

    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids[None]).logits[0].float()  # (n, V)

    return run


@pytest.mark.parametrize("kind", ["topk", "sampled", "hybrid"])
def test_stored_targets_are_the_teachers(stores, full_logits, kind):
    reader = CacheReader(str(stores[kind]))
    data = reader.read_rows([0, 5], ["input_ids", "length", "topk_ids", "topk_logits", "target_multiplier", "lse"])
    raw = zarr.open_group(str(stores[kind]), mode="r")["shards/00000"]
    for i, row in enumerate([0, 5]):
        n = int(data["length"][i])
        logits = full_logits(data["input_ids"][i, :n])
        assert torch.allclose(data["lse"][i, :n, 0], logits.logsumexp(-1), atol=1e-4)
        for pos in range(n):
            ids, z = data["topk_ids"][i, pos], data["topk_logits"][i, pos]
            used = ids >= 0
            assert (z[used] - logits[pos, ids[used]]).abs().max() <= 0.05 + 1e-3  # value_error_bound
            assert (z[used][:-1] >= z[used][1:]).all()  # largest first
            probs = logits[pos].softmax(-1)
            top = probs.sort(descending=True)
            head = int((top.values.cumsum(0) - top.values < 0.8).sum().clamp(max=16))
            if kind != "sampled":
                assert set(top.indices[:head].tolist()) <= set(ids[used].tolist())
            if kind != "topk":
                assert int(raw["target_draws"][row, pos].sum()) == 8  # every draw counted once
                w = data["target_multiplier"][i, pos] * torch.exp(z - data["lse"][i, pos, 0])
                assert float(w.sum()) == pytest.approx(1.0, abs=1e-4)  # at T=1: head + r̂ · draws / n, or draws / n


def test_info_reports_fidelity_and_bytes_and_verify_passes(stores):
    for kind, path in stores.items():
        assert invoke("cache", "verify", path).exit_code == 0
        info = json.loads(invoke("cache", "info", path, "--json").stdout)
        fidelity = info["manifest"]["fidelity"]
        assert fidelity["kind"] == kind and fidelity["positions"] > 0
        if kind != "sampled":  # [fidelity note]: what the stored head loses over K+1 bins, and the tail beyond it
            assert set(fidelity["kl_head_bins"]) == set(fidelity["tail_mass"]) == {"1.0", "2.0", "4.0"}
            assert all(0 <= v < 1e-3 for v in fidelity["kl_head_bins"].values())  # 8-bit values: ±0.05 nats
            assert 0 < fidelity["tail_mass"]["1.0"] < fidelity["tail_mass"]["4.0"] < 1
        if kind != "topk":  # the draws' effective sample size: all of them at T=1, fewer above
            ess = fidelity["ess"]
            assert ess["1.0"] == pytest.approx(8.0) and 1.0 <= ess["4.0"] < ess["1.0"] and fidelity["ess_samples"] == 8
        assert "kl_full_reconstructed" not in fidelity
        per = info["bytes_per_token"]["fields"]
        assert per["target_ids"] > 0 and per["target_values"] > 0 and "topk_ids" not in per
        text = invoke("cache", "info", path).stdout
        assert f"targets    {kind}" in text
        assert ("K+1-bin KL(true || decoded)" in text) == (kind != "sampled")
        assert ("effective sample size of the 8 draws" in text) == (kind != "topk")


def test_export_import_merge_and_resume_keep_the_targets(tiny_assets, stores, tmp_path):
    source = stores["hybrid"]
    h5 = tmp_path / "s.h5"
    assert invoke("cache", "export", source, "--format", "hdf5", h5).exit_code == 0
    imported = tmp_path / "imported"
    assert invoke("cache", "import", h5, imported).exit_code == 0
    assert invoke("cache", "verify", imported).exit_code == 0
    assert_stores_equal(str(imported), source)  # type: ignore[arg-type]

    halves = [tmp_path / f"half{i}" for i in range(2)]
    for i, half in enumerate(halves):
        args = cache_args(tiny_assets, half, targets="hybrid", shard=f"{i}/2", **SETTINGS)
        assert invoke("cache-teacher", *args).exit_code == 0
    merged = tmp_path / "merged"
    assert invoke("cache", "merge", merged, *halves).exit_code == 0
    assert invoke("cache", "verify", merged).exit_code == 0
    a, b = CacheReader(str(merged)), CacheReader(str(source))
    fields = ["topk_ids", "topk_logits", "target_multiplier"]
    for name, value in a.read_rows(range(32), fields).items():
        assert torch.equal(value, b.read_rows(range(32), fields)[name])

    resumed = tmp_path / "resumed"  # a crash after the first chunk: the rerun recomputes the same draws
    shutil.copytree(source, resumed)
    group = zarr.open_group(str(resumed / "shards" / "00000"), mode="a")
    record = dict(group.attrs["shard"])
    group.attrs["shard"] = {**record, "status": "partial", "checksums": record["checksums"][:1]}
    assert invoke("cache-teacher", *cache_args(tiny_assets, resumed, targets="hybrid", **SETTINGS)).exit_code == 0
    assert_stores_equal(str(resumed), source)  # type: ignore[arg-type]


# The codecs of the zarr v3 core specification (zarr-specs v3.0); vlen-utf8, registered in zarr-extensions, is the
# serializer of the string data type, which the core has not, so only ``text`` may use it.
CORE_V3_CODECS = {"bytes", "transpose", "gzip", "blosc", "crc32c", "sharding_indexed"}


def test_a_new_store_needs_only_core_v3_codecs_and_reads_without_warnings(stores):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns on opening an array with a codec outside the specification
        root = zarr.open_group(str(stores["hybrid"]), mode="r")
        arrays = {name: node for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}
        for name, array in arrays.items():
            codecs = {c["name"] for c in array.metadata.to_dict()["codecs"]}
            allowed = CORE_V3_CODECS | ({"vlen-utf8"} if name.endswith("/text") else set())
            assert codecs <= allowed, (name, codecs)
            np.asarray(array[:])
        stored = np.asarray(root["shards/00000/target_ids"][:])  # (rows, L, S): as a plain zarr reader sees it
        coding = root["shards/00000/target_ids"].attrs["delta_coding"]
        ranks = np.cumsum(stored, axis=coding["axis"], dtype=stored.dtype)
        id_by_rank = np.asarray(root["targets/id_by_rank"][:])
        counts = np.asarray(root["shards/00000/target_count"][:])
    assert coding == {"axis": 2} and (np.diff(ranks, axis=-1).astype(np.int64) >= 0).all()  # ascending ranks
    assert not np.array_equal(stored, ranks)  # the gaps are stored, not the ranks
    decoded = CacheReader(str(stores["hybrid"])).read_rows(range(len(ranks)), ["topk_ids"])["topk_ids"].numpy()
    for row, pos in [(0, 0), (3, 5), (len(ranks) - 1, 2)]:
        k = int(counts[row, pos])
        assert sorted(id_by_rank[ranks[row, pos, :k]]) == sorted(decoded[row, pos][decoded[row, pos] >= 0])


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3 specification")
def test_schema_3_stores_with_numcodecs_delta_are_read_as_they_are_and_not_resumed(tiny_assets, stores, tmp_path):
    from zarr.codecs.numcodecs import Delta

    from distill.cache.shards import read_rows_of
    from distill.cache.store import DELTA_ATTR, compressor_for

    source, old = stores["topk"], tmp_path / "old"
    shutil.copytree(source, old)
    root = zarr.open_group(str(old), mode="a")
    root.attrs["distill"] = {**dict(root.attrs["distill"]), "schema_version": 3}
    for _, group in root["shards"].groups():  # schema 3's layout: plain ranks behind numcodecs' Delta
        array = group["target_ids"]
        ranks = read_rows_of(array, slice(0, array.shape[0]))
        group.create_array(
            "target_ids", shape=array.shape, chunks=array.chunks, dtype=array.dtype, filters=[Delta(dtype="<u4")],
            compressors=compressor_for("target_ids"), overwrite=True, config={"write_empty_chunks": True},
        )[:] = ranks  # fmt: skip
    assert DELTA_ATTR not in root["shards/00000/target_ids"].attrs
    assert invoke("cache", "verify", old).exit_code == 0  # read back as committed: no second cumulative sum
    assert_stores_equal(str(old), source)  # type: ignore[arg-type]
    h5, imported = tmp_path / "old.h5", tmp_path / "imported"
    assert invoke("cache", "export", old, "--format", "hdf5", h5).exit_code == 0
    assert invoke("cache", "import", h5, imported).exit_code == 0
    assert_stores_equal(str(imported), source)  # type: ignore[arg-type]
    group = root["shards/00000"]
    group.attrs["shard"] = {**dict(group.attrs["shard"]), "status": "partial", "checksums": []}
    resumed = invoke("cache-teacher", *cache_args(tiny_assets, old, targets="topk", **SETTINGS))
    assert resumed.exit_code != 0 and "schema version 3" in resumed.stderr and "--overwrite" in resumed.stderr


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_students_train_from_compact_targets(train_assets, stores, tmp_path, kind):
    out = tmp_path / kind
    assets = {**train_assets, "store": stores[kind]}
    # One tokenizer: every stored token has its student token, so the sampled estimate is of the whole KL (> 0
    # here); across tokenizers the unmatched draws are left out ([unbiased-kd note]) and it can read below 0.
    args = train_args(assets, out, student="student_same_tok", objective="kd-only", eval_fraction=0.1)
    run_train(args, steps=3, log_every=1, eval_every=3)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [r["loss/kd"] for r in records if r.get("split") == "train"]
    assert len(kd) == 3 and all(np.isfinite(kd)) and max(kd) > 0


def test_schema_2_stores_are_read_and_older_ones_refused(train_assets, tmp_path):
    old = tmp_path / "v2"
    shutil.copytree(train_assets["store"], old)  # the fixed top-K fp16 layout
    root = zarr.open_group(str(old), mode="a")
    manifest = dict(root.attrs["distill"])
    manifest["schema_version"] = 2
    manifest["layout"] = {k: v for k, v in manifest["layout"].items() if k != "targets"}
    root.attrs["distill"] = manifest
    reader = CacheReader(str(old))
    assert reader.target_kind == "topk-fp16"
    data = reader.read_rows([0], ["topk_ids", "topk_logits", "target_multiplier"])
    assert data["target_multiplier"] is None and data["topk_logits"].dtype == torch.float16  # as stored
    assert invoke("cache", "verify", old).exit_code == 0
    resumed = invoke("cache-teacher", *cache_args(train_assets, old))  # cannot add rows: says what to do
    assert resumed.exit_code != 0 and "schema version 2" in resumed.stderr and "--overwrite" in resumed.stderr
    root.attrs["distill"] = {**manifest, "schema_version": 1}
    with pytest.raises(CacheError, match="re-create the store"):
        CacheReader(str(old))
