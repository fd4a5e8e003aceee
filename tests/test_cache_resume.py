"""Stage 1 under failure: SIGKILL mid-run then resume; bad input; reading a store with plain zarr."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from distill.cache.reader import CacheReader
from distill.cache.schema import CacheError
from distill.cli import app
from distill.pipeline.demo import generate_corpus, write_jsonl
from tests.helpers import assert_stores_equal, cache_args, launch_cli


def shard_record(store: Path, index: int = 0) -> dict | None:
    try:
        return dict(zarr.open_group(str(store / "shards" / f"{index:05d}"), mode="r").attrs["shard"])
    except Exception:  # not created yet
        return None


@pytest.fixture(scope="module")
def bigger_data(tiny_assets) -> Path:
    return write_jsonl(generate_corpus(120, seed=7), tiny_assets["root"] / "bigger.jsonl")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_assets, bigger_data, tmp_path):
    args = dict(dataset=bigger_data, batch_size=2, chunk_rows=4, num_shards=2)
    reference = tmp_path / "reference"
    done = launch_cli(["cache-teacher", *cache_args(tiny_assets, reference, **args)], threads=None)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err

    killed = tmp_path / "killed"
    proc = launch_cli(
        ["cache-teacher", *cache_args(tiny_assets, killed, **args)],
        threads=None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        record = shard_record(killed)
        if record and len(record["checksums"]) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record = shard_record(killed)
    assert record is not None and record["status"] == "partial", "the run finished before it could be killed"

    with pytest.raises(CacheError, match="not complete"):
        CacheReader(str(killed))
    info = json.loads(CliRunner().invoke(app, ["cache", "info", str(killed), "--json"]).stdout)
    assert not info["complete"] and info["shards"][0]["status"] == "partial"
    partial = CacheReader(str(killed), allow_partial=True)
    assert partial.num_rows < CacheReader(str(reference)).num_rows

    resumed = launch_cli(["cache-teacher", *cache_args(tiny_assets, killed, **args)], threads=None)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert_stores_equal(killed, reference)


def test_same_manifest_resumes_and_different_manifest_is_refused(tiny_assets, tmp_path):
    out = tmp_path / "store"
    runner = CliRunner()
    first = runner.invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, max_rows=16)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, max_rows=16)])
    assert again.exit_code == 0 and "cached 0 rows" in again.stdout and "2 chunks were already" in again.stdout

    refused = runner.invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, max_rows=16, top_k=8)])
    assert refused.exit_code == 2
    assert "different manifest" in refused.stderr and "top_k: 16 != 8" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert CacheReader(str(out)).layout["top_k"] == 16  # untouched

    replaced = runner.invoke(
        app, ["cache-teacher", *cache_args(tiny_assets, out, max_rows=16, top_k=8, overwrite=True)]
    )
    assert replaced.exit_code == 0, replaced.output
    assert CacheReader(str(out)).layout["top_k"] == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"text_field": "body"}, "no text field 'body'"),
        ({"teacher": "/nonexistent/teacher"}, "--teacher /nonexistent/teacher: no such directory"),
        ({"seq_len": 1}, "--seq-len must be at least 2"),
        ({"top_k": 100000}, "--top-k 100000 is larger than the teacher's vocabulary"),
        ({"attention_layers": "9"}, "--attention-layers [9]"),
        ({"shard": "3/2"}, "--shard 3/2"),
    ],
)
def test_bad_input_is_one_line_error_and_leaves_no_store(tiny_assets, tmp_path, extra, message):
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, **extra)])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


PLAIN_READER = r"""
import json, sys
import numpy as np
import zarr

root = zarr.open_group(sys.argv[1], mode="r")
manifest = root.attrs["distill"]
layout = manifest["layout"]
shard = root["shards/00000"]
assert shard.attrs["shard"]["status"] == "complete"
n = int(shard["length"][0])
ids = shard["input_ids"][0, :n]
text = str(shard["text"][0])  # a 0-d array of a variable-length string
offsets = shard["offsets"][0, :n]
t_index = layout["temperatures"].index(1.0)
logits = shard["topk_logits"][0, :n].astype(np.float32)
lse = shard["lse"][0, :n, t_index]
probs = np.exp(logits - lse[:, None])
tail = 1.0 - probs.sum(-1)
print(json.dumps({
    "imported_distill": "distill" in sys.modules,
    "ids": ids.tolist(), "text": str(text), "first_span": text[offsets[0][0]:offsets[0][1]],
    "top1": shard["topk_ids"][0, :n, 0].tolist(), "p_top1": probs[:, 0].tolist(), "tail": tail.tolist(),
    "hidden_shape": list(shard[f"hidden/{layout['hidden_layers'][-1]}"].shape),
}))
"""


def test_plain_zarr_reads_a_row_following_the_format_doc(tiny_assets, tmp_path):
    out = tmp_path / "store"
    assert CliRunner().invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, max_rows=8)]).exit_code == 0
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_READER, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(proc.stdout)
    assert plain["imported_distill"] is False
    row = CacheReader(str(out)).read_rows([0])
    n = int(row["length"][0])
    assert plain["ids"] == row["input_ids"][0, :n].tolist() and plain["text"] == row["text"][0]
    assert plain["top1"] == row["topk_ids"][0, :n, 0].tolist()
    p = np.asarray(plain["p_top1"])
    assert ((p > 0) & (p <= 1)).all() and (np.asarray(plain["tail"]) > -1e-3).all()
    assert plain["first_span"] and plain["text"].startswith(plain["first_span"])
