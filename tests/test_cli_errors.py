"""Every command, given bad input, exits non-zero with one `error:` line and no traceback.

In-process through typer's CliRunner (a traceback would show as an unhandled exception); each case builds
its bad input in tmp_path. Exit status 2 = usage error (a flag, a path, a config), 1 = failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from tests.helpers import cache_args, train_args


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def student_without_tokenizer(assets: dict, tmp: Path) -> Path:
    import shutil

    folder = tmp / "student_no_tok"
    shutil.copytree(assets["student"], folder)
    for name in folder.iterdir():
        if "token" in name.name or name.name in ("vocab.json", "merges.txt"):
            name.unlink()
    return folder


def crafted_hdf5(tmp: Path) -> Path:
    """A file that claims to be an export and holds a manifest, but no arrays."""
    import h5py

    path = tmp / "crafted.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "distill-cache-hdf5"
        f.attrs["manifest"] = json.dumps({"schema_version": 1, "layout": {}})
    return path


def crafted_hdf5_from_store(assets: dict, tmp: Path) -> Path:
    """A real export with one shard group deleted: the import fails half-way through."""
    import h5py

    path = tmp / "export.h5"
    assert CliRunner().invoke(app, ["cache", "export", str(assets["store"]), str(path)]).exit_code == 0
    with h5py.File(path, "a") as f:
        del f["shards/00000/topk_ids"]
    return path


# (command and arguments, exit status, text the error line must hold); {tmp} and assets are filled in.
CASES = {
    # --- cache-teacher
    "cache-teacher without --teacher": (
        lambda a, t: ["cache-teacher", "--dataset", "x", "--out", t / "s"],
        2,
        "--teacher is required",
    ),
    "cache-teacher --seq-len not a number": (
        lambda a, t: ["cache-teacher", *cache_args(a, t / "s", seq_len="abc")],
        2,
        "--seq-len abc: expected an integer",
    ),
    "cache-teacher bad --dtype": (lambda a, t: ["cache-teacher", *cache_args(a, t / "s", dtype="fp8")], 2, "--dtype"),
    "cache-teacher config not YAML": (
        lambda a, t: ["cache-teacher", *cache_args(a, t / "s"), "--config", write(t / "c.yaml", "seq_len: [1,\n")],
        2,
        "not valid YAML",
    ),
    "cache-teacher config JSON broken": (
        lambda a, t: ["cache-teacher", *cache_args(a, t / "s"), "--config", write(t / "c.json", '{"seq_len" 4}')],
        2,
        "not valid JSON",
    ),
    "cache-teacher config a list": (
        lambda a, t: ["cache-teacher", *cache_args(a, t / "s"), "--config", write(t / "c.yaml", "- 1\n- 2\n")],
        2,
        "not a mapping",
    ),
    "cache-teacher config a scalar": (
        lambda a, t: ["cache-teacher", *cache_args(a, t / "s"), "--config", write(t / "c.yaml", "hello\n")],
        2,
        "not a mapping",
    ),
    "cache-teacher config wrong type": (
        lambda a, t: ["cache-teacher", *cache_args(a, t / "s"), "--config", write(t / "c.yaml", "max_rows: many\n")],
        2,
        "max_rows = 'many': expected an integer",
    ),
    "cache-teacher empty dataset file": (
        lambda a, t: ["cache-teacher", *cache_args({**a, "data": write(t / "empty.jsonl", "")}, t / "s")],
        2,
        "no documents",
    ),
    "cache-teacher only whitespace": (
        lambda a, t: [
            "cache-teacher",
            *cache_args({**a, "data": write(t / "ws.jsonl", '{"text": "   "}\n{"text": "\\n\\t"}\n')}, t / "s"),
        ],
        2,
        "no text to cache",
    ),
    "cache-teacher non-UTF-8 txt": (
        lambda a, t: [
            "cache-teacher",
            *cache_args({**a, "data": write(t / "latin1.txt", "café\n".encode("latin-1"))}, t / "s"),
        ],
        2,
        "UTF-8",
    ),
    "cache-teacher non-string text": (
        lambda a, t: [
            "cache-teacher",
            *cache_args({**a, "data": write(t / "num.jsonl", '{"text": 1}\n{"text": 2}\n')}, t / "s"),
        ],
        2,
        "not text",
    ),
    # --- train
    "train --set a flag's key twice": (
        lambda a, t: ["train", *train_args(a, t / "r", batch_size=2), "--set", "batch_size=4"],
        2,
        "batch_size is given twice",
    ),
    "train --set lr=abc": (
        lambda a, t: ["train", *train_args(a, t / "r", lr="abc")],
        2,
        "lr = 'abc': expected a number",
    ),
    "train --set grad_accum=2.5": (
        lambda a, t: ["train", *train_args(a, t / "r", grad_accum=2.5)],
        2,
        "grad_accum = 2.5: expected an integer",
    ),
    "train --set curriculum.kd=1.0": (
        lambda a, t: ["train", *train_args(a, t / "r", **{"curriculum.kd": 1.0})],
        2,
        "curriculum.kd must be < 1",
    ),
    "train --set curriculum.disabled=foo": (
        lambda a, t: ["train", *train_args(a, t / "r", **{"curriculum.disabled": "foo"})],
        2,
        "curriculum.disabled has unknown terms ['foo']",
    ),
    "train --set curriculum=3": (
        lambda a, t: ["train", *train_args(a, t / "r", curriculum=3)],
        2,
        "curriculum = 3: expected a group of settings",
    ),
    "train --set curriculum.nope=1": (
        lambda a, t: ["train", *train_args(a, t / "r", **{"curriculum.nope": 1})],
        2,
        "curriculum.nope",
    ),
    "train --set no equals": (lambda a, t: ["train", *train_args(a, t / "r"), "--set", "lr"], 2, "expected key=value"),
    "train config not YAML": (
        lambda a, t: ["train", *train_args(a, t / "r"), "--config", write(t / "c.yaml", "lr: [\n")],
        2,
        "not valid YAML",
    ),
    "train student missing": (
        lambda a, t: ["train", *train_args({**a, "student": t / "nope"}, t / "r")],
        2,
        "no such folder",
    ),
    "train student without tokenizer": (
        lambda a, t: ["train", *train_args({**a, "student": student_without_tokenizer(a, t)}, t / "r")],
        2,
        "cannot load its tokenizer",
    ),
    "train --out is a file": (lambda a, t: ["train", *train_args(a, write(t / "f", "x"))], 2, "a file"),
    "train --resume missing": (lambda a, t: ["train", *train_args(a, t / "r"), "--resume", t / "nope"], 2, "--resume"),
    "train store missing": (
        lambda a, t: ["train", *train_args({**a, "store": t / "nope"}, t / "r")],
        2,
        "--cache",
    ),
    "train store is a file": (
        lambda a, t: ["train", *train_args({**a, "store": write(t / "f", "x")}, t / "r")],
        2,
        "a file, not a store folder",
    ),
    "train store is not a store": (
        lambda a, t: ["train", *train_args({**a, "store": write(t / "empty" / "x", "x").parent}, t / "r")],
        2,
        "no cache store",
    ),
    "cache-teacher --out is a file": (lambda a, t: ["cache-teacher", *cache_args(a, write(t / "f", "x"))], 2, "a file"),
    # --- cache management
    "cache info missing store": (lambda a, t: ["cache", "info", t / "nope"], 2, "no cache store"),
    "cache verify missing store": (lambda a, t: ["cache", "verify", t / "nope"], 2, "no cache store"),
    "cache merge into an existing store": (
        lambda a, t: ["cache", "merge", a["store"], a["store"]],
        2,
        "exists",
    ),
    "cache export bad format": (
        lambda a, t: ["cache", "export", a["store"], t / "x.zip", "--format", "zip"],
        2,
        "--format zip",
    ),
    "cache import not HDF5": (
        lambda a, t: ["cache", "import", write(t / "x.h5", "plain text"), t / "s"],
        2,
        "not an HDF5 file",
    ),
    "cache import crafted HDF5": (
        lambda a, t: ["cache", "import", crafted_hdf5(t), t / "s"],
        2,
        "not a valid distill cache export",
    ),
    "cache import truncated export": (
        lambda a, t: ["cache", "import", crafted_hdf5_from_store(a, t), t / "s"],
        2,
        "not a valid distill cache export",
    ),
    # --- eval and demo
    "eval missing run": (lambda a, t: ["eval", t / "nope", "--out", t / "rep"], 2, "nope"),
    "demo --out is a file": (lambda a, t: ["demo", "--out", write(t / "f", "x")], 2, "a file"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_without_traceback(train_assets, tmp_path, name):
    build, code, needle = CASES[name]
    args = [str(a) for a in build(train_assets, tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an unhandled exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    if name.startswith("cache import"):
        assert not (tmp_path / "s").exists()  # no half-made store left behind
    if name in EARLY:  # found before anything loads: the error is not buried under the printed config
        assert " config:" not in result.stderr, result.stderr


EARLY = ("train store missing", "train store is a file", "train --out is a file", "cache-teacher --out is a file")


def test_debug_shows_the_traceback(train_assets, tmp_path):
    args = ["train", *train_args(train_assets, tmp_path / "r", lr="abc")]
    result = CliRunner().invoke(app, ["--debug", *[str(a) for a in args]])
    assert result.exit_code != 0 and type(result.exception).__name__ == "ConfigError"


def test_set_works_for_keys_that_also_have_a_flag(train_assets, tmp_path):
    # the config is printed before the store is opened: a folder that holds no store stops the run right after
    (tmp_path / "empty").mkdir()
    assets = {**train_assets, "store": tmp_path / "empty"}
    result = CliRunner().invoke(
        app,
        [
            "train",
            *[str(a) for a in train_args(assets, tmp_path / "r")],
            "--set",
            "batch_size=2",
            "--set",
            "max_steps=7",
            "--set",
            "eval_every=3",
        ],
    )
    assert result.exit_code == 2 and "no cache store" in result.stderr
    assert (
        "  max_steps: 7" in result.stderr and "  eval_every: 3" in result.stderr and "  batch_size: 2" in result.stderr
    )
