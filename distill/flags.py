"""Command-line flags generated from the config dataclasses, so that each setting is declared once.

A field of a stage's config (``CacheConfig``, ``TrainConfig``) is its own flag: the name ``seq_len`` gives
``--seq-len``, the field's type gives the value's form (``INT``, ``FLOAT,...`` for a list), its default is shown,
and the docstring under the field is the help text. The config's ``HELP_GROUPS`` sorts the flags into the panels
of ``--help``. A nested setting (``curriculum.kd``) is a flag too, ``--curriculum.kd``, listed in a panel of its
group; ``--set curriculum.kd=0.5`` reaches it as well, and any other key too.

    @app.command("cache-teacher")
    @config_flags(CacheConfig)
    def cache_teacher(sources: ConfigSources) -> None:
        cfg = sources.load()          # defaults < --config FILE < flags and --set

Values given as flags are converted by the same rules as ``--set`` and the config file
(``config_loading.coerce_field``); a list flag takes comma-separated items, may be repeated, and ``none`` gives
the empty list.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from distill.config import ConfigError
from distill.config_loading import coerce_field, describe_type, load_config, merge_set_overrides

C = TypeVar("C")

SET_HELP = (
    "KEY=VALUE for any setting, typed as in the config file: a flag's name with underscores (batch_size=4) or a "
    "nested key (curriculum.kd=0.5); repeatable. A key given both here and as a flag must agree."
)
OTHER_GROUP = "Other settings"


@functools.cache
def read_field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal right after ``name: type = ...``);
    none where the source is not shipped (the flags then have no help text)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and documented:
            docs[node.target.id] = inspect.cleandoc(str(after.value.value))
    return docs


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def split_optional(hint: Any) -> list[Any]:
    """The arms of ``X | Y | None`` other than None; ``[hint]`` for a plain type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return [hint]


def list_item_type(hint: Any) -> Any | None:
    """The item type when a field takes a list or a tuple (``list[int] | None`` -> int), else None."""
    for arm in split_optional(hint):
        if typing.get_origin(arm) in (list, tuple):
            return typing.get_args(arm)[0]
    return None


def value_form(hint: Any) -> str:
    """The metavar of a flag: INT, FLOAT, TEXT; ``INT,...`` for a list."""
    item = list_item_type(hint)
    if item is not None:
        return value_form(item) + ",..."
    arm = split_optional(hint)[0]
    return {int: "INT", float: "FLOAT"}.get(arm, "TEXT")


def format_default(f: dataclasses.Field) -> str | None:
    """The default as a user would type it; None where there is none to show (required, or computed later)."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_help(doc: str, default: str | None) -> str:
    """One paragraph of help; ``[`` escaped for typer's rich markup, reST literals as plain text."""
    text = " ".join(doc.split()).replace("``", "")
    if default is not None:
        text += f" [default: {default}]"
    return text.replace("[", "\\[")


def flag_groups(cls: type) -> dict[str, str]:
    """field name -> the help panel it is listed in (``HELP_GROUPS`` of the config; the rest: other settings)."""
    declared = getattr(cls, "HELP_GROUPS", {})
    return {name: group for group, names in declared.items() for name in names}


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that get a flag (every one but nested groups of settings), in the order of ``HELP_GROUPS``."""
    hints = typing.get_type_hints(cls)
    declared = [name for names in getattr(cls, "HELP_GROUPS", {}).values() for name in names]
    flat = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
    return sorted(flat, key=lambda f: declared.index(f.name) if f.name in declared else len(declared))


def nested_fields(cls: type) -> list[tuple[str, type, dataclasses.Field]]:
    """(group, its dataclass, field) of every setting of a nested group (``curriculum.kd``)."""
    hints = typing.get_type_hints(cls)
    groups = [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])]
    return [(name, sub, f) for name, sub in groups for f in dataclasses.fields(sub)]


NESTED = "__"  # the parameter name of --curriculum.kd: curriculum__kd


def build_flag(cls: type, f: dataclasses.Field, group: str | None = None) -> inspect.Parameter:
    """The typer parameter of one field (of ``group``, a nested setting, when given). Every flag defaults to None
    (not given), so that the config file's value stands unless the flag is given."""
    hint = typing.get_type_hints(cls)[f.name]
    name = flag_name(f.name) if group is None else f"--{group}.{f.name.replace('_', '-')}"
    panel = flag_groups(cls).get(f.name, OTHER_GROUP) if group is None else f"{group.capitalize()} (--set {group}.KEY)"
    common = dict(
        help=format_help(read_field_docs(cls).get(f.name, ""), format_default(f)),
        rich_help_panel=panel,
        show_default=False,
    )
    if split_optional(hint) == [bool]:
        option = typer.Option(f"{name}/--no-{name[2:]}", **common)
        kind: Any = bool | None
    elif list_item_type(hint) is not None:
        option = typer.Option(name, metavar=value_form(hint), **common)
        kind = list[str] | None
    else:
        option = typer.Option(name, metavar=value_form(hint), **common)
        kind = str | None
    param = f.name if group is None else f"{group}{NESTED}{f.name}"
    return inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind, option])


def parse_flag(name: str, raw: Any, hint: Any) -> Any:
    """A flag's text as the field's type (None: not given). List flags: comma-separated, repeatable, 'none' = []."""
    if raw is None or isinstance(raw, bool):
        return raw
    value: Any = raw
    if list_item_type(hint) is not None:
        items = [part.strip() for text in raw for part in text.split(",")]
        value = [] if [i.lower() for i in items if i] in ([], ["none"]) else [i for i in items if i]
    try:
        return coerce_field(name, value, hint)
    except ConfigError:
        shown = ",".join(raw) if isinstance(raw, list) else raw
        expected = " or ".join(describe_type(arm) for arm in split_optional(hint))
        raise ConfigError(f"{flag_name(name)} {shown}: expected {expected}") from None


@dataclass
class ConfigSources:
    """Where a stage's settings come from: the dataclass defaults, a ``--config`` file, the flags, ``--set``."""

    cls: type
    file: Path | None
    flags: dict[str, Any]
    sets: list[str]

    def load(self) -> Any:
        """The validated config; ConfigError names the flag, key or file that is wrong."""
        hints = typing.get_type_hints(self.cls)
        given = {k: parse_flag(k, v, hints[k]) for k, v in self.flags.items() if NESTED not in k}
        overrides = merge_set_overrides(given, self.sets)
        for key, raw in self.flags.items():
            group, _, name = key.partition(NESTED)
            if not name or raw is None:
                continue
            value = parse_flag(f"{group}.{name}", raw, typing.get_type_hints(hints[group])[name])
            target = overrides.setdefault(group, {})
            if target.get(name) is not None and target[name] != value:
                raise ConfigError(f"{group}.{name} is given twice, as a flag and as --set, with different values")
            target[name] = value
        return load_config(self.cls, self.file, overrides)


def config_flags(cls: type[C]) -> Callable[[Callable[[ConfigSources], None]], Callable[..., None]]:
    """Decorate a command ``f(sources)``: typer sees one flag per setting of ``cls`` plus --config and --set."""

    def decorate(command: Callable[[ConfigSources], None]) -> Callable[..., None]:
        @functools.wraps(command)
        def run(config: Path | None = None, set_: list[str] | None = None, **flags: Any) -> None:
            command(ConfigSources(cls, config, flags, set_ or []))

        config_option = typer.Option(
            "--config", metavar="FILE", help=f"YAML/JSON file with any {cls.__name__} setting."
        )
        set_option = typer.Option("--set", metavar="KEY=VALUE", help=SET_HELP.replace("[", "\\["))
        params = [
            inspect.Parameter(
                "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, config_option]
            ),
            inspect.Parameter(
                "set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[list[str] | None, set_option]
            ),
            *(build_flag(cls, f) for f in flag_fields(cls)),
            *(build_flag(sub, f, group) for group, sub, f in nested_fields(cls)),
        ]
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # typer reads __signature__, inspect would follow __wrapped__ back to f(sources)
        return run

    return decorate
