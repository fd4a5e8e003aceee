"""Experiment trackers through the real CLI: TensorBoard's event files read back with its own reader equal
metrics.jsonl (names, steps, values), a resumed run continues them with no step twice, eval logs its table and
plots; W&B (offline) and Trackio (local) behind the `tracking` marker; no tracker imported unless asked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distill.cli import app
from distill.config import ConfigError, TrainConfig, parse_report_to
from distill.config_loading import load_config
from distill.pipeline.tracking import flatten_metrics
from tests.helpers import REPO, run_train, subprocess_env, train_args


def expected_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as step -> {name: value}: the train and eval records of a step merged, lists flattened,
    the last record of a (split, step) winning (a resumed run recomputes the steps after its checkpoint)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        record.pop("split")
        by_step.setdefault(step, {}).update(flatten_metrics(record))
    return by_step


def read_tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def tensorboard_by_step(acc) -> dict[int, dict[str, float]]:
    by_step: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at a step: {steps}"
        for e in events:
            by_step.setdefault(e.step, {})[tag] = e.value
    return by_step


def assert_same_metrics(got: dict[int, dict[str, float]], expected: dict[int, dict[str, float]]) -> None:
    assert sorted(got) == sorted(expected)
    for step, values in expected.items():
        assert sorted(got[step]) == sorted(values), step
        for name, value in values.items():
            assert got[step][name] == pytest.approx(value, rel=1e-6, abs=1e-30), (step, name)  # float32 in events


# --- configuration --------------------------------------------------------------------------


def test_report_to_accepts_lists_commas_and_none():
    assert parse_report_to(None) == [] and parse_report_to("none") == [] and parse_report_to("") == []
    assert parse_report_to("TensorBoard, wandb") == ["tensorboard", "wandb"]
    assert parse_report_to(["wandb", "trackio,wandb", "none"]) == ["wandb", "trackio"]
    with pytest.raises(ConfigError, match="--report-to mlflow: choose from none, tensorboard, wandb, trackio"):
        parse_report_to("tensorboard,mlflow")


def test_report_to_comes_from_yaml_like_any_setting(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"report_to": ["tensorboard", "trackio"], "lr": "1e-4"}))
    assert load_config(TrainConfig, path, {}).report_to == ["tensorboard", "trackio"]
    path.write_text("report_to: wandb,tensorboard\n")
    assert load_config(TrainConfig, path, {}).report_to == ["wandb", "tensorboard"]
    assert load_config(TrainConfig, path, {"report_to": "none"}).report_to == []  # the flag wins
    assert TrainConfig().report_to == []


def test_flatten_metrics_spreads_lists_and_drops_strings():
    record = {"split": "train", "lr": 1e-4, "loss/kd": 2.5, "expert_usage": [0.25, 0.75], "nested": {"a": 1}}
    assert flatten_metrics(record) == {
        "lr": 1e-4,
        "loss/kd": 2.5,
        "expert_usage/0": 0.25,
        "expert_usage/1": 0.75,
        "nested/a": 1.0,
    }


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "trackio"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(train_assets, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # how Python marks a package that cannot be imported
    args = train_args(train_assets, tmp_path / "run")
    result = CliRunner().invoke(app, ["train", *args, "--max-steps", "1", "--report-to", name])
    assert result.exit_code == 2
    line = f"error: --report-to {name} needs the {name} package — pip install 'distill[{name}]'"
    assert result.output.strip().splitlines()[-1] == line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything ran
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--out", str(tmp_path / "r"), "--report-to", name])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == line


def test_no_tracker_is_imported_unless_asked(train_assets, tmp_path):
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from distill.cli import app\n"
        "result = CliRunner().invoke(app, ['train', *sys.argv[1:]])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('tensorboard', 'wandb', 'trackio') if m in sys.modules))\n"
    )
    args = [*train_args(train_assets, tmp_path / "run"), "--max-steps", "1", "--set", "eval_fraction=0"]
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=subprocess_env(), capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "run" / "trackers.json").exists()


# --- TensorBoard (default tier) -------------------------------------------------------------


def test_tensorboard_equals_metrics_jsonl_and_a_resume_logs_no_step_twice(train_assets, tmp_path, single_thread):
    out = tmp_path / "run"
    args = [*train_args(train_assets, out), "--report-to", "tensorboard"]
    run_train(args, steps=4, log_every=1, eval_every=2)  # checkpoint at step 2, evals at 2 and 4
    acc = read_tensorboard(out / "tensorboard")
    expected = expected_by_step(out)
    assert any(name.startswith("expert_usage/") for name in expected[1])  # every kind of record is there
    assert {"loss/total", "weight/kd", "weighted/kd", "lr", "tokens_per_s", "aligned_share"} <= set(expected[1])
    assert {"eval/loss", "eval/kd"} <= set(expected[2])
    assert_same_metrics(tensorboard_by_step(acc), expected)
    params = acc.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f'"teacher": "{train_assets["teacher"]}"' in params and '"top_k": 16' in params
    assert '"report_to": [\n' in params and '"temperatures": [' in params
    state = json.loads((out / "trackers.json").read_text())
    assert state == {"tensorboard": {"log_dir": "tensorboard", "last_step": 4}}

    # Resume from the checkpoint at step 2 and go on to step 6: steps 3 and 4 are recomputed ([tracker-resume note]).
    run_train(args, steps=6, log_every=1, eval_every=2, extra=("--resume", "auto"))
    acc = read_tensorboard(out / "tensorboard")
    by_step = tensorboard_by_step(acc)
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    assert_same_metrics(by_step, expected_by_step(out))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one log dir, continued
    assert len(acc.Tensors("params/text_summary")) == 1

    # Eval: the report table as text and the plots as images, in --out/tensorboard.
    report = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", str(out), "--out", str(report), "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    acc = read_tensorboard(report / "tensorboard")
    table = acc.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
    saved = json.loads((report / "report.json").read_text())
    assert f"| teacher | {saved['teacher_bpb']:.4g} |" in table
    assert f"| run | {saved['students']['run']['bpb']:.4g} |" in table
    images = {tag: acc.Images(tag)[0] for tag in acc.Tags()["images"]}
    assert sorted(images) == sorted(f"plots/{Path(p).stem}" for p in saved["plots"])
    import matplotlib.image

    height, width = matplotlib.image.imread(report / "eval.png").shape[:2]
    assert (images["plots/eval"].height, images["plots/eval"].width) == (height, width)


# --- W&B and Trackio (marker `tracking`: pip install '.[wandb,trackio]') ----------------------


def inspect_wandb(run_dir: Path) -> list[dict]:
    """The records of every offline .wandb file under RUN_DIR/wandb, in order, read by wandb's own reader."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    records = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        done = subprocess.run(
            [str(wandb_cli), "leet", "inspect", "--json", str(path)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        records += [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return records


def wandb_config(records: list[dict]) -> dict:
    config = {}
    for record in records:
        body = record.get("run", {}).get("config") if record.get("type") == "run" else record.get("config")
        config.update((body or {}).get("update", {}))
    return config


@pytest.fixture
def fresh_wandb():
    """wandb reads its settings (WANDB_MODE...) once per process: start and leave each test with none read."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.mark.tracking
def test_wandb_offline_and_trackio_equal_metrics_jsonl_and_continue_on_resume(
    train_assets, tmp_path, monkeypatch, single_thread, fresh_wandb
):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # wandb's staging, not in $HOME
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    out = tmp_path / "run"
    args = [*train_args(train_assets, out), "--report-to", "wandb", "--report-to", "trackio"]
    run_train(args, steps=4, log_every=1, eval_every=2)
    first = expected_by_step(out)
    run_train(args, steps=6, log_every=1, eval_every=2, extra=("--resume", "auto"))  # from step 2 to 6
    expected = expected_by_step(out)
    state = json.loads((out / "trackers.json").read_text())
    assert state["wandb"]["last_step"] == 6 and state["trackio"]["last_step"] == 6

    # W&B: one run id in both offline sessions, every step once; steps 3 and 4 keep the values sent first.
    records = inspect_wandb(out)
    assert {r["run"]["run_id"] for r in records if r.get("type") == "run"} == {state["wandb"]["id"]}
    assert len([r for r in records if r.get("type") == "run"]) == 2  # two sessions of one run
    config = wandb_config(records)
    assert config["cache"]["top_k"] == 16 and config["train"]["report_to"] == ["wandb", "trackio"]
    rows = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    got = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in rows}
    assert_same_metrics(got, {s: first[s] if s <= 4 else expected[s] for s in expected})

    # Trackio: the same run name resumed, its rows read back from its local database.
    logs = SQLiteStorage.get_logs("distill", state["trackio"]["name"])
    steps = [row["step"] for row in logs]
    got: dict[int, dict[str, float]] = {}
    for row in logs:
        got.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in ("step", "timestamp")})
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6] and len(steps) == 9  # a train row per step, eval at 2, 4, 6
    assert_same_metrics(got, {s: first[s] if s <= 4 else expected[s] for s in expected})
    config = SQLiteStorage.get_run_config("distill", state["trackio"]["name"])
    assert config["cache/teacher"] == str(train_assets["teacher"]) and config["cache/temperatures"] == [1.0, 2.0, 4.0]

    # Eval: the report table and the plots, as a new run of each.
    report = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", str(out), "--out", str(report), "--report-to", "wandb,trackio"])
    assert result.exit_code == 0, result.output
    eval_state = json.loads((report / "trackers.json").read_text())
    assert eval_state["wandb"]["id"] != state["wandb"]["id"]
    history = {}
    for record in inspect_wandb(report):
        history.update(record["history"]["item"] if record.get("type") == "history" else {})
    assert history["report._type"] == "table-file" and history["report.nrows"] == 2
    (files,) = (report / "wandb").glob("offline-run-*/files")
    table = json.loads((files / history["report.path"]).read_text())
    saved = json.loads((report / "report.json").read_text())
    assert table["data"][0][:2] == ["teacher", saved["teacher_bpb"]] and table["data"][1][:2] == [
        "run",
        saved["students"]["run"]["bpb"],
    ]
    for name in ("loss_terms", "curriculum", "eval"):
        assert history[f"plots/{name}._type"] == "image-file" and (files / history[f"plots/{name}.path"]).is_file()
    logs = SQLiteStorage.get_logs("distill", eval_state["trackio"]["name"])
    assert {k for row in logs for k in row} >= {"report", "plots/eval"}


@pytest.mark.tracking
def test_wandb_without_a_login_is_one_line_saying_what_to_do(train_assets, tmp_path, monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("HOME", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "NETRC"):  # no stored key
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    args = train_args(train_assets, tmp_path / "run")
    result = CliRunner().invoke(app, ["train", *args, "--max-steps", "1", "--report-to", "wandb"])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: --report-to wandb: wandb.init failed (") and "WANDB_MODE=offline" in last
