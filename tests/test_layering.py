"""The package's layers, checked on the source. Every import counts: module-level, inside a function, or under
``TYPE_CHECKING``.

    cli                          the top layer: nothing imports it
    pipeline/demo                runs the stages end to end
    pipeline/teacher  stage 1    (cache-teacher, rollout); never imports train/ or eval/
    pipeline/train    stage 2    reaches teacher/ only through the live teacher of signals.py
    pipeline/eval     after      reads stores and students, never the training loop
    pipeline/losses              pure tensor functions: nothing of distill outside losses/
    pipeline/text                tokens, rows, packing, alignment: nothing of pipeline outside text/
    curriculum, config, runtime  below both stages: no pipeline/
    cache                        arrays and manifests, not models: nothing of distill outside cache/

And no cycles: not between modules, not between these packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
MAX_MODULES_PER_FOLDER = 13

# (modules, what they must not import (their own package aside), modules of theirs excepted, why)
RULES = [
    ("distill.cache", "distill", (), "cache/ knows arrays and manifests, not models or configs"),
    ("distill.config", "distill.pipeline", (), "the configs are read by both stages and the CLI"),
    ("distill.config_loading", "distill.pipeline", (), "the configs are read by both stages and the CLI"),
    ("distill.curriculum", "distill.pipeline", (), "the schedule of the terms is read by train/ and eval/"),
    ("distill.runtime", "distill.pipeline", (), "rank, device and dtype are answered below both stages"),
    ("distill.pipeline.losses", "distill", (), "losses are pure tensor functions"),
    ("distill.pipeline.text", "distill.pipeline", (), "text handling is the bottom of pipeline/"),
    ("distill.pipeline.teacher", "distill.pipeline.train", (), "stage 1 knows nothing of stage 2"),
    ("distill.pipeline.teacher", "distill.pipeline.eval", (), "stage 1 knows nothing of eval"),
    ("distill.pipeline.eval", "distill.pipeline.train", (), "eval reads stores and students, not the training loop"),
    (
        "distill.pipeline.train",
        "distill.pipeline.teacher",
        ("distill.pipeline.train.signals",),
        "stage 2 reaches stage 1 only through the live teacher (train/signals.py)",
    ),
    ("distill", "distill.cli", ("distill.cli",), "the CLI is the top layer"),
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``distill/cache/store.py`` -> ``distill.cache.store`` (a package's ``__init__`` is the package)."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, as absolute dotted names (relative imports resolved); for
    ``from a import b`` both ``a`` and ``a.b`` (b may be a module)."""
    name = module_name(path, package)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a import b``: a.b when it is a module, else a)."""
    modules = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        found = imported_modules(path, package)
        targets = {m for m in found if m in modules}
        # ``from a import b`` adds both a and a.b: keep a only when b is not a module of a
        graph[name] = {m for m in targets if not any(o != m and within(o, m) for o in targets)} - {name}
    return graph


def unit(module: str) -> str:
    """The package a module belongs to for the package graph: distill.cache, distill.pipeline.<stage>, or itself."""
    parts = module.split(".")
    if parts[:2] == ["distill", "pipeline"] and len(parts) > 3:
        return ".".join(parts[:3])
    if parts[:2] == ["distill", "cache"]:
        return "distill.cache"
    return module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    return packages


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_import_parser_sees_every_form(tmp_path):
    package = tmp_path / "distill" / "cache"
    package.mkdir(parents=True)
    source = package / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import distill.pipeline.losses.kd\n"
        "from distill.pipeline import train\n"
        "if TYPE_CHECKING:\n"
        "    from distill.pipeline.eval.scores import Score\n"
        "def f():\n"
        "    from ..pipeline.align import build_vocab_map\n"
    )
    found = imported_modules(source, tmp_path / "distill")
    expected = {"distill.pipeline.losses.kd", "distill.pipeline.train", "distill.pipeline.align"}
    assert expected | {"distill.pipeline.eval.scores"} <= found


def test_the_cycle_finder_sees_lazy_and_type_only_cycles(tmp_path):
    root = tmp_path / "distill"
    (root / "pipeline").mkdir(parents=True)
    for name in ("__init__", "pipeline/__init__"):
        (root / f"{name}.py").write_text("")
    (root / "pipeline" / "a.py").write_text("def f():\n    from distill.pipeline import b\n")
    (root / "pipeline" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from distill.pipeline.a import f\n"
    )
    (root / "pipeline" / "c.py").write_text("from distill.pipeline import a\n")
    graph = import_graph(root)
    assert graph["distill.pipeline.c"] == {"distill.pipeline.a"}
    assert find_cycle(graph) == ["distill.pipeline.a", "distill.pipeline.b", "distill.pipeline.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


@pytest.mark.parametrize("owner, forbidden, excepted, why", RULES)
def test_layers_import_only_downwards(owner, forbidden, excepted, why):
    owned = {name: path for name, path in MODULES.items() if within(name, owner) and name not in excepted}
    assert owned, f"no module {owner}"
    own = owner if owner != "distill" else None  # a package's modules import each other
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for module, path in owned.items()
        for name in sorted(imported_modules(path))
        if name in MODULES and within(name, forbidden) and not (own and within(name, own)) and name != "distill"
    ]
    assert not offenders, f"{why}: " + "; ".join(offenders)


def test_no_module_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_cycles():
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_no_folder_holds_more_than_a_dozen_modules():
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    crowded = {
        str(f.relative_to(PACKAGE.parent)): n
        for f in folders
        if (n := len([p for p in f.glob("*.py") if p.name != "__init__.py"])) > MAX_MODULES_PER_FOLDER
    }
    assert not crowded, crowded
