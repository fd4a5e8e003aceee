"""The flags of cache-teacher and train come from the config dataclasses: one flag per field, its docstring
as help, its type for the value, and the same layering as before (defaults < --config < flags and --set)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import typer
from typer.testing import CliRunner

from distill.cli import app
from distill.config import CacheConfig, ConfigError, TrainConfig
from distill.flags import ConfigSources, parse_flag, read_field_docs
from tests.helpers import config_from_args


@pytest.mark.parametrize("cls", [CacheConfig, TrainConfig])
def test_every_setting_is_a_grouped_documented_flag(cls):
    nested = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])}
    names = [f.name for f in dataclasses.fields(cls) if f.name not in nested]
    grouped = [n for group in cls.HELP_GROUPS.values() for n in group]
    assert sorted(grouped) == sorted(names)  # each setting in exactly one panel of --help, no stale name
    docs = read_field_docs(cls)
    assert all(docs.get(n) for n in names), [n for n in names if not docs.get(n)]
    command = typer.main.get_command(app).commands["cache-teacher" if cls is CacheConfig else "train"]
    flags = {opt for param in command.params for opt in param.opts}
    assert {"--" + n.replace("_", "-") for n in names} <= flags
    assert {"--config", "--set"} <= flags


def test_field_docstrings_are_read_from_the_source():
    docs = read_field_docs(CacheConfig)
    assert docs["top_k"] == (
        "The most head tokens kept per position (``topk``, ``hybrid``), or exactly this many (``topk-fp16``)."
    )
    assert docs["vocab_proj"].startswith("Store ``vocab_proj`` = softmax(logits / T*)")  # multi-line, cleaned
    assert "HELP_GROUPS" not in docs


def help_text(command: str) -> str:
    """``distill COMMAND --help`` as one line of words (panel borders and wrapping removed)."""
    result = CliRunner().invoke(app, [command, "--help"], env={"TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_help_shows_groups_defaults_and_docstrings():
    text = help_text("cache-teacher")
    for panel in CacheConfig.HELP_GROUPS:
        assert panel in text
    assert "--seq-len INT Teacher tokens per row." in text and "[default: 512]" in text
    assert "--temperatures FLOAT,..." in text and "[default: 1,2,4]" in text
    assert "--vocab-proj --no-vocab-proj" in text
    train_help = help_text("train")
    assert "--lr FLOAT Peak learning rate of the student. [default: 5e-05]" in train_help
    assert "pip install 'distill[wandb]'" in train_help  # brackets escaped from rich markup


def test_flags_lists_bools_and_set_reach_the_config(tmp_path):
    cfg = config_from_args(
        CacheConfig,
        ["--temperatures", "1,2", "--temperatures", "4", "--hidden-layers", "none", "--seq-len", "64",
         "--vocab-proj", "--set", "top_k=8", "--set", "attention_layers=[1, 2]"],
    )  # fmt: skip
    assert cfg.temperatures == [1.0, 2.0, 4.0] and cfg.hidden_layers == [] and cfg.attention_layers == [1, 2]
    assert (cfg.seq_len, cfg.top_k, cfg.vocab_proj) == (64, 8, True)
    assert config_from_args(CacheConfig, []).hidden_layers is None  # not given: the default stands

    config = tmp_path / "c.yaml"
    config.write_text("seq_len: 128\noverwrite: true\nbatch_size: 3\n")
    cfg = config_from_args(CacheConfig, ["--config", config, "--no-overwrite", "--batch-size", "5"])
    assert (cfg.seq_len, cfg.overwrite, cfg.batch_size) == (128, False, 5)  # file < flags; unset flags keep file

    cfg = config_from_args(TrainConfig, ["--lr", "1e-4", "--report-to", "wandb", "--report-to", "trackio,wandb"])
    assert cfg.lr == 1e-4 and cfg.report_to == ["wandb", "trackio"]
    cfg = config_from_args(TrainConfig, ["--max-steps", "7", "--set", "curriculum.kd=0.25", "--set", "max_steps=7"])
    assert cfg.max_steps == 7 and cfg.curriculum.kd == 0.25


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("seq_len", "abc", "--seq-len abc: expected an integer"),
        ("max_rows", "1.5", "--max-rows 1.5: expected an integer"),
        ("temperatures", ["1,x"], "--temperatures 1,x: expected a list of numbers"),
        ("vocab_proj_temperature", "hot", "--vocab-proj-temperature hot: expected a number"),
    ],
)
def test_a_bad_flag_value_names_the_flag(name, raw, message):
    with pytest.raises(ConfigError) as caught:
        parse_flag(name, raw, typing.get_type_hints(CacheConfig)[name])
    assert str(caught.value) == message


def test_a_temperature_given_twice_is_refused():
    with pytest.raises(ConfigError, match="--temperatures lists a temperature twice"):
        config_from_args(CacheConfig, ["--temperatures", "1,2", "--temperatures", "2"])


def test_a_key_given_as_flag_and_set_must_agree():
    with pytest.raises(ConfigError, match="seq_len is given twice"):
        ConfigSources(CacheConfig, None, {"seq_len": "64"}, ["seq_len=32"]).load()


def test_nested_settings_are_flags_listed_in_train_help():
    from distill.config import CurriculumConfig

    text = help_text("train")
    for f in dataclasses.fields(CurriculumConfig):
        assert f"--curriculum.{f.name.replace('_', '-')} " in text, f.name
    assert "Curriculum (--set curriculum.KEY)" in text
    assert "--curriculum.kd FLOAT Weight of the teacher top-K KD term" in text and "[default: 0.7]" in text
    assert "--curriculum.layerwise-ramp FLOAT,..." in text and "[default: 0.4,0.7]" in text
    cfg = config_from_args(TrainConfig, ["--curriculum.kd", "0.25", "--curriculum.layerwise-ramp", "0.5,0.6"])
    assert cfg.curriculum.kd == 0.25 and cfg.curriculum.layerwise_ramp == (0.5, 0.6)
    with pytest.raises(ConfigError, match="curriculum.kd is given twice"):
        ConfigSources(TrainConfig, None, {"curriculum__kd": "0.25"}, ["curriculum.kd=0.5"]).load()
    with pytest.raises(ConfigError, match="--curriculum.kd abc: expected a number"):
        ConfigSources(TrainConfig, None, {"curriculum__kd": "abc"}, []).load()


@pytest.mark.parametrize(
    "command", ["train", "cache-teacher", "eval", "demo", "cache info", "cache audit", "cache verify", "cache merge",
                "cache export", "cache import"],
)  # fmt: skip
def test_every_help_shows_types_as_words(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    assert "<" not in result.output, result.output  # typer's <list[Path]>, <str>, <bool>


def test_an_unknown_flag_or_a_missing_argument_is_one_line():
    for args, needle in ((["train", "--nope"], "No such option: --nope"), (["cache", "export"], "Missing argument")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
        assert f"{' '.join(args[:-1]) if args[0] == 'train' else 'cache export'} --help" in lines[0]


def test_a_target_setting_the_chosen_kind_ignores_is_warned(tmp_path):
    def warnings(*args: str) -> list[str]:
        command = ["cache-teacher", "--teacher", str(tmp_path / "none"), "--dataset", "x", "--out", str(tmp_path / "o")]
        result = CliRunner().invoke(app, [*command, *args])
        assert result.exit_code == 2 and "--teacher" in result.stderr  # stops at the missing teacher, after the warning
        return [line for line in result.stderr.splitlines() if line.startswith("warning:")]

    assert warnings("--targets", "topk-fp16", "--target-mass", "0.5") == [
        "warning: --target-mass 0.5 is ignored by --targets topk-fp16 (it applies to --targets topk and hybrid)"
    ]
    assert "--target-samples 8 is ignored by --targets topk" in warnings("--target-samples", "8")[0]
    assert warnings("--targets", "hybrid", "--target-mass", "0.5", "--target-samples", "8") == []
    assert warnings("--targets", "topk-fp16") == []  # defaults are not warned about
