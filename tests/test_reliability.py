"""Faults and bad input end in one clear line and lose nothing (issue: reliability).

Each test here failed before its fix; they run the real CLI in-process on the tiny assets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import final_weights, invoke, read_metrics, run_train, train_args

STEPS = 3


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_settings(assets: dict, out: Path) -> list[str]:
    return [*train_args(assets, out, save_every=1, keep_checkpoints=3), "--log-every", "1", "--eval-every", "1000"]


@pytest.fixture(scope="module")
def base_run(train_assets, tmp_path_factory) -> Path:
    """A 3-step run with checkpoints at steps 1 and 2 and its final student."""
    out = tmp_path_factory.mktemp("reliab") / "base"
    run_train(run_settings(train_assets, out), STEPS)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


def resume(assets: dict, out: Path, *extra: str):
    return invoke("train", *run_settings(assets, out), "--max-steps", STEPS, "--resume", *extra)


# --- 1: nothing untrusted is unpickled ------------------------------------------------------


class RunsCode:
    """Unpickling this object opens (creates) a file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(train_assets, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoints" / "step_000002"
    state = torch.load(ckpt / "state.pt", weights_only=True)  # what train writes loads with weights_only
    state["student"] = RunsCode(marker)
    torch.save(state, ckpt / "state.pt")
    result = resume(train_assets, out, str(ckpt))
    assert_one_line_error(result, 1, str(ckpt), "not loaded")
    assert not marker.exists()


# --- 4: a second run into the same --out ------------------------------------------------------


def test_a_second_train_into_the_same_out_is_refused_unless_overwrite(train_assets, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    refused = invoke("train", *run_settings(train_assets, out), "--max-steps", 1)
    assert_one_line_error(refused, 2, f"--out {out} holds a previous run", "--resume auto", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == before
    replaced = invoke("train", *run_settings(train_assets, out), "--max-steps", 1, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1]
    kept = {p.name for p in (out / "checkpoints").glob("step_*")}
    assert kept <= {"step_000001"}  # the old run's checkpoints went with it


# --- 6 and 7: resume after a torn metrics line, and from a damaged latest checkpoint ----------


def test_resume_drops_a_torn_metrics_line_and_the_records_after_the_checkpoint(train_assets, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    (out / "checkpoints" / "latest").write_text("step_000001")  # killed before the checkpoint of step 2
    shutil.rmtree(out / "checkpoints" / "step_000002")
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[: len(text) - 17])  # a crash mid-line
    result = resume(train_assets, out, "auto")
    assert result.exit_code == 0, result.output
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == [1, 2, 3]
    assert final_weights(out).keys() == final_weights(base_run).keys()


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(train_assets, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    state = out / "checkpoints" / "step_000002" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    result = resume(train_assets, out, "auto")
    assert result.exit_code == 0, result.output
    assert "step_000002" in result.output and "falling back to" in result.output and "step_000001" in result.output
    a, b = final_weights(out), final_weights(base_run)
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0  # resumed exactly from step 1


# --- 15: a checkpoint of the wrong format -----------------------------------------------------


def test_a_checkpoint_of_the_wrong_format_is_one_line(train_assets, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    ckpt = out / "checkpoints" / "step_000002"
    torch.save({"model": torch.zeros(2)}, ckpt / "state.pt")
    assert_one_line_error(resume(train_assets, out, str(ckpt)), 1, "not a `distill train` checkpoint", "student")
    for name in ("step_000001", "step_000002"):
        (out / "checkpoints" / name / "state.pt").write_bytes(b"not a zip file")
    assert_one_line_error(resume(train_assets, out, "auto"), 1, "no readable checkpoint", "--overwrite")


# --- 2 and 3: a missing chunk file is detected on every read path -----------------------------


@pytest.fixture
def store_missing_a_chunk(train_assets, tmp_path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(train_assets["store"], store)
    chunk = store / "shards" / "00000" / "topk_logits" / "c" / "1" / "0" / "0"
    assert chunk.exists()
    chunk.unlink()
    return store


def test_a_missing_chunk_file_is_found_by_verify_quick_and_deep(store_missing_a_chunk):
    for flags in (["--quick"], []):
        result = invoke("cache", "verify", store_missing_a_chunk, *flags)
        assert result.exit_code == 1, result.output
        assert "shard 00000 chunk 1: the data file of topk_logits is missing" in result.stdout
        assert "NOT sound" in result.stdout and "chunk 0" not in result.stdout


def test_a_missing_chunk_file_is_refused_by_the_reader_and_train(train_assets, store_missing_a_chunk, tmp_path):
    from distill.cache.reader import CacheReader
    from distill.cache.shards import StoreDamaged
    from distill.cache.verify import check_store

    reader = CacheReader(str(store_missing_a_chunk))
    assert reader.read_rows([0, 7], ["topk_logits"])["topk_logits"].shape[0] == 2  # chunk 0 is whole
    with pytest.raises(StoreDamaged, match="shard 00000 chunk 1: the data file of topk_logits is missing"):
        reader.read_rows([3, 9], ["topk_logits"])
    for mode in ("quick", "deep"):  # what train and eval call before reading
        with pytest.raises(StoreDamaged, match="chunk 1: the data file of topk_logits is missing"):
            check_store(str(store_missing_a_chunk), mode)
    assets = {**train_assets, "store": store_missing_a_chunk}
    for mode in ("quick", "off"):
        result = invoke("train", *train_args(assets, tmp_path / mode, verify_cache=mode), "--max-steps", 2)
        assert_one_line_error(result, 1, "chunk 1", "missing", "--repair")


def test_eval_of_a_store_missing_chunk_files_fails(train_assets, base_run, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(train_assets["store"], store)
    shutil.rmtree(store / "shards" / "00000" / "target_logprob" / "c")
    result = invoke("eval", base_run / "final", "--cache", store, "--split", "all", "--out", tmp_path / "report")
    assert_one_line_error(result, 1, "target_logprob is missing")
    assert not (tmp_path / "report" / "report.json").exists()


# --- 5: short documents with the default --attention-topk -------------------------------------


def test_short_documents_with_more_attention_keys_than_tokens(tiny_assets, tmp_path):
    from distill.cache.reader import CacheReader
    from tests.helpers import cache_args

    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": "The cat sees a red book."}) + "\n" for _ in range(40)))
    store = tmp_path / "store"
    # one short document per row (unpacked): rows shorter than the attention keys asked for
    args = cache_args({**tiny_assets, "data": data}, store, attention_topk=32, calibration_rows=4, packing="none")
    result = invoke("cache-teacher", *args)
    assert result.exit_code == 0, result.output
    rows = CacheReader(str(store)).read_rows([0, 39], ["attn/2", "attn_ids/2", "length"])
    n = int(rows["length"][0])
    assert n < 32  # every row is shorter than the keys asked for
    values, ids = rows["attn/2"].float(), rows["attn_ids/2"]
    assert values.shape[-1] == 32
    # query t has t + 1 keys: its row sums to 1 over them, the other slots are empty (value 0, id 0)
    torch.testing.assert_close(values[:, :n].sum(-1), torch.ones(2, n), atol=2e-3, rtol=0)
    assert (values[:, :n, n:] == 0).all() and (ids[:, :n, n:] == 0).all()
    assert (ids[:, :n] <= torch.arange(n)[None, :, None]).all()  # causal: never a later key


# --- 9: cache-teacher on SIGTERM ----------------------------------------------------------------


def test_cache_teacher_on_sigterm_says_what_was_committed_and_resumes(tiny_assets, tmp_path, monkeypatch):
    import os
    import signal

    from distill.cache import shards as shards_module
    from distill.cache.verify import verify_store
    from tests.helpers import cache_args

    out = tmp_path / "store"
    args = cache_args(tiny_assets, out, max_rows=40)  # 5 chunks of 8 rows
    original = shards_module.ShardWriter.write_chunk

    def write_then_terminate(self, chunk, *rest):  # the real write; then a real SIGTERM, as `kill` sends it
        original(self, chunk, *rest)
        if chunk == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(shards_module.ShardWriter, "write_chunk", write_then_terminate)
    stopped = invoke("cache-teacher", *args)
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    assert "Traceback" not in stopped.output
    line = [x for x in stopped.stderr.splitlines() if x.startswith("stopped by signal 15")]
    assert len(line) == 1 and "chunks are committed" in line[0] and "re-run the same command" in line[0]
    monkeypatch.setattr(shards_module.ShardWriter, "write_chunk", original)
    resumed = invoke("cache-teacher", *args)
    assert resumed.exit_code == 0, resumed.output
    assert verify_store(str(out)).sound


# --- 16: a student context shorter than the rows ------------------------------------------------


def test_a_student_context_shorter_than_the_rows_warns_once_with_the_share_lost(train_assets, tmp_path):
    cut = run_train(train_args(train_assets, tmp_path / "cut", student_max_length=8), 1)
    warnings = [line for line in cut.output.splitlines() if line.startswith("warning: the student's context")]
    assert len(warnings) == 1 and "(8 tokens)" in warnings[0] and "student_max_length" in warnings[0]
    share = float(warnings[0].split(": ")[2].split("%")[0].split()[-1])
    assert 0 < share < 100
    whole = run_train(train_args(train_assets, tmp_path / "whole"), 1)
    assert "warning: the student's context" not in whole.output


# --- 17: the demo's teacher pretraining shows progress -------------------------------------------


def test_demo_teacher_pretraining_prints_progress(tiny_assets, tmp_path, capsys):
    from distill.pipeline.demo import pretrain_teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    losses = pretrain_teacher(teacher, tiny_assets["texts"], steps=20, seq_len=16, batch_size=2)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[demo] teacher pretraining: step")]
    assert len(lines) == 10 and lines[-1].startswith("[demo] teacher pretraining: step 20/20")
    assert f"loss {losses[-1]:.3f}" in lines[-1]


# --- 8: a full disk --------------------------------------------------------------------------


FULL_DISK_SCRIPT = r"""
set -u
mount -t tmpfs -o size=400k tmpfs "$DISK" || exit 90
for stage in train cache; do
    mount -o remount,size=400k "$DISK"
    if [ $stage = train ]; then eval "set -- train $TRAIN --out $DISK/run"
    else eval "set -- cache-teacher $CACHE --out $DISK/store"; fi
    "$PY" -m distill.cli "$@" > "$LOGS/$stage-full.out" 2> "$LOGS/$stage-full.err"; echo $? > "$LOGS/$stage-full.rc"
    mount -o remount,size=64m "$DISK"
    [ $stage = train ] && set -- "$@" --resume auto
    "$PY" -m distill.cli "$@" > "$LOGS/$stage-again.out" 2> "$LOGS/$stage-again.err"; echo $? > "$LOGS/$stage-again.rc"
    rm -rf "$DISK"/*
done
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_path_and_a_rerun_resumes(train_assets, tmp_path):
    """Real ENOSPC: a 400 KiB tmpfs in a private mount namespace (unshare), grown after the failure."""
    import os
    import shlex
    import subprocess
    import sys

    from tests.helpers import cache_args

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a private tmpfs")
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir(), logs.mkdir()

    def without_out(args: list) -> str:
        i = [str(a) for a in args].index("--out")
        return shlex.join(str(a) for a in args[:i] + args[i + 2 :])

    train = without_out([*train_args(train_assets, Path("x"), grad_accum=1, save_every=1), "--max-steps", "3"])
    cache = without_out(cache_args(train_assets, Path("x"), max_rows=48))
    env = {
        **os.environ,
        "DISK": str(disk),
        "LOGS": str(logs),
        "PY": sys.executable,
        "TRAIN": train,
        "CACHE": cache,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK_SCRIPT], env=env, capture_output=True, text=True)
    if proc.returncode == 90 or not (logs / "train-full.rc").exists():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr[-300:]}")
    for stage, path in (("train", "run/checkpoints"), ("cache", "store")):
        err = (logs / f"{stage}-full.err").read_text()
        assert (logs / f"{stage}-full.rc").read_text().strip() == "1", err
        assert "Traceback" not in err
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "no space left on the device writing" in lines[0] and str(disk / path) in lines[0]
        again = (logs / f"{stage}-again.err").read_text()
        assert (logs / f"{stage}-again.rc").read_text().strip() == "0", again


# --- round 3, 1: a resume checks its settings against the checkpoint's ------------------------


def store_with_another_manifest(store: Path, dest: Path) -> Path:
    """A copy of ``store`` whose manifest says it was made from another dataset: another store."""
    shutil.copytree(store, dest)
    meta = json.loads((dest / "zarr.json").read_text())
    meta["attributes"]["distill"]["dataset"]["name"] = "another/dataset"
    (dest / "zarr.json").write_text(json.dumps(meta))
    return dest


def test_a_resume_with_another_store_student_or_too_few_steps_is_refused(train_assets, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    config = (out / "config.json").read_text()
    other = store_with_another_manifest(train_assets["store"], tmp_path / "other")
    refused = invoke("train", *run_settings({**train_assets, "store": other}, out), "--max-steps", STEPS, "--resume",
                     "auto")  # fmt: skip
    assert_one_line_error(refused, 2, f"--cache {other}", "another store", f"--cache {train_assets['store']}")
    refused = invoke("train", *run_settings(train_assets, out), "--student", train_assets["student_same_tok"],
                     "--max-steps", STEPS, "--resume", "auto")  # fmt: skip
    assert_one_line_error(refused, 2, "--student", "step_000002 was trained with --student")
    refused = invoke("train", *run_settings(train_assets, out), "--max-steps", 1, "--resume", "auto")
    assert_one_line_error(refused, 2, "--max-steps 1 is below step 2", "step_000002")
    assert "Loading" not in refused.output and "train config" in refused.stderr  # refused before the model loads
    assert (out / "config.json").read_text() == config  # a refused resume leaves the run as it was


def test_a_resume_names_the_settings_that_changed_and_accepts_a_copied_store(train_assets, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(train_assets["store"], copy)
    result = invoke("train", *run_settings({**train_assets, "store": copy}, out), "--set", "lr=0.001",
                    "--max-steps", STEPS, "--resume", "auto")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if "with changed settings" in x]
    assert len(lines) == 1, result.output
    assert f"cache {train_assets['store']} -> {copy} (the same store" in lines[0] and "lr 5e-05 -> 0.001" in lines[0]


# --- round 3, 2: one process trains into a run directory at a time ----------------------------


def test_a_second_train_into_a_running_run_is_refused_and_a_stale_lock_taken_over(train_assets, base_run, tmp_path):
    import os
    import socket

    from distill.pipeline.train.run_dir import lock_run_dir

    out = copy_run(base_run, tmp_path)
    before = {p.name for p in out.rglob("*")}, (out / "metrics.jsonl").read_text()
    with lock_run_dir(out):  # another process training into it (flock conflicts between open files)
        for args in (["--resume", "auto"], ["--overwrite"]):
            refused = invoke("train", *run_settings(train_assets, out), "--max-steps", STEPS + 1, *args)
            assert_one_line_error(refused, 2, f"--out {out} is being trained into by pid {os.getpid()}", "--out")
    assert ({p.name for p in out.rglob("*")}, (out / "metrics.jsonl").read_text()) == before
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname()}  # a lock file left by a process that died
    (out / ".lock").write_text(json.dumps(dead))
    resumed = resume(train_assets, out, "auto")
    assert resumed.exit_code == 0, resumed.output


# --- round 3, 4: a truncated zarr.json ----------------------------------------------------------


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("key", ["zarr.json", "shards/00000/zarr.json"])
def test_a_truncated_zarr_json_is_one_line_naming_the_store_everywhere(train_assets, tmp_path, key):
    from tests.helpers import cache_args

    store = tmp_path / "store"
    shutil.copytree(train_assets["store"], store)
    text = (store / key).read_text()
    (store / key).write_text(text[: len(text) // 2])  # a full disk or an interrupted copy
    commands = {
        "verify": ["cache", "verify", store],
        "info": ["cache", "info", store],
        "export": ["cache", "export", store, tmp_path / "out.h5"],
        "merge": ["cache", "merge", tmp_path / "merged", store],
        "train": ["train", *train_args({**train_assets, "store": store}, tmp_path / "run"), "--max-steps", 1],
        "cache-teacher resume": ["cache-teacher", *cache_args(train_assets, store)],
    }
    for name, args in commands.items():
        line = assert_one_line_error(invoke(*args), 1, str(store), key, "not valid JSON", "restore it")
        assert "bug" not in line, name
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "merged").exists()
    assert (store / key).read_text() == text[: len(text) // 2]  # left as it was for the user to restore


# --- round 3, 5: merge and export refuse a damaged store -----------------------------------------


def damage_chunk_file(store: Path) -> None:
    (store / "shards" / "00000" / "topk_logits" / "c" / "1" / "0" / "0").unlink()


def damage_tokenizer_hash(store: Path) -> None:
    edit_json(store / "zarr.json", lambda m: m["attributes"]["distill"]["tokenizer"].update(sha256="0" * 64))


def damage_row_count(store: Path) -> None:
    edit_json(store / "shards" / "00000" / "zarr.json", lambda m: m["attributes"]["shard"].update(rows=3))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (damage_chunk_file, "shard 00000 chunk 1: the data file of topk_logits is missing"),
        (damage_tokenizer_hash, "teacher_tokenizer: the files do not match the manifest's tokenizer.sha256"),
        (damage_row_count, "shard 00000: the record says rows = 3"),
    ],
)
def test_merge_and_export_refuse_a_damaged_store(train_assets, tmp_path, damage, problem):
    store = tmp_path / "store"
    shutil.copytree(train_assets["store"], store)
    damage(store)
    merged = invoke("cache", "merge", tmp_path / "merged", store)
    assert_one_line_error(merged, 1, f"{store}: the store is not sound", problem, "--repair")
    exported = invoke("cache", "export", store, tmp_path / "out.h5")
    assert_one_line_error(exported, 1, f"{store}: the store is not sound", problem)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out.h5").exists()


# --- round 3, 6: a full disk while cache-teacher writes the teacher tokenizer --------------------


def test_a_write_error_of_the_rust_tokenizer_is_the_full_disk_line(tiny_assets, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    from tests.helpers import cache_args

    def full(self, *args, **kwargs):  # what tokenizers (Rust) raises on a full disk or a file-size limit
        raise Exception("File too large (os error 27)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    result = invoke("cache-teacher", *cache_args(tiny_assets, tmp_path / "store"))
    line = assert_one_line_error(result, 1, "no space left on the device writing", "File too large", "re-run")
    assert "bug" not in line
    assert not (tmp_path / "store").exists()


# --- round 3, 8: an unwritable tensorboard folder -----------------------------------------------

TRACKER_SCRIPT = """
import sys
from pathlib import Path
import typer
from distill.cli import reported_errors
from distill.pipeline.tracking import open_trackers
try:
    with reported_errors():
        open_trackers(["tensorboard"], Path(sys.argv[1]), {"lr": 1e-4})
except typer.Exit as exc:
    sys.exit(exc.exit_code)
"""


def test_an_unwritable_tensorboard_folder_is_one_line_without_a_thread_traceback(tmp_path):
    import os
    import subprocess
    import sys
    import tempfile

    from tests.helpers import REPO, subprocess_env

    pytest.importorskip("tensorboard")
    command = [sys.executable, "-c", TRACKER_SCRIPT]
    if os.geteuid() == 0:  # root writes anywhere: run as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to run as another user")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    run_dir = Path(tempfile.mkdtemp(prefix="distill-tb-"))  # tmp_path's parents are closed to other users
    try:
        run_dir.chmod(0o755)
        (run_dir / "tensorboard").mkdir(mode=0o555)
        (run_dir / "tensorboard").chmod(0o555)
        proc = subprocess.run([*command, str(run_dir)], env=subprocess_env(), cwd=REPO, capture_output=True, text=True)
    finally:
        shutil.rmtree(run_dir)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Permission denied"), proc.stderr
    assert str(run_dir / "tensorboard") in lines[0]


# --- round 3, doubtful: blank documents are counted where the user sees them --------------------


def test_cache_teacher_says_how_many_blank_documents_it_skipped(tiny_assets, tmp_path):
    from tests.helpers import cache_args

    data = tmp_path / "data.jsonl"
    texts = ["A first document.", "", "   \n", "A second one."]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = invoke("cache-teacher", *cache_args({**tiny_assets, "data": data}, tmp_path / "store"))
    assert result.exit_code == 0, result.output
    assert "blank documents skipped: 2." in result.stdout


def test_without_flock_the_lock_record_decides(tmp_path, monkeypatch):
    import os
    import socket

    from distill.config import ConfigError
    from distill.pipeline.train import run_dir as run_dir_module

    monkeypatch.setattr(run_dir_module, "take_flock", lambda fd: False)  # a file system without flock
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process
    with pytest.raises(ConfigError, match=f"pid {os.getppid()} on host {host}.*if that process is gone, delete"):
        with run_dir_module.lock_run_dir(out):
            pass
    (out / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": host}))  # a dead one: taken over
    with run_dir_module.lock_run_dir(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert (out / ".lock").read_text() == ""  # released: the next run finds no holder
