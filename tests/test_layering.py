"""The package's layers, checked on the source: ``cache/`` knows arrays and manifests, not models, so it never
imports ``pipeline/``; the configs and the runtime answers are below both stages, so they never import
``pipeline/`` either. Every import counts, module-level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill"

# (modules, a package they must not import, why)
RULES = [
    ("distill.cache", "distill.pipeline", "cache/ knows arrays and manifests, not models"),
    ("distill.config", "distill.pipeline", "the configs are read by both stages and the CLI"),
    ("distill.runtime", "distill.pipeline", "rank, device and dtype are answered below both stages"),
    (
        "distill.pipeline.eval.evaluate",
        "distill.pipeline.train.loop",
        "eval reads stores and students, not the training loop",
    ),
    ("distill.cache", "distill.cli", "the CLI is the top layer"),
    ("distill.pipeline", "distill.cli", "the CLI is the top layer"),
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


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_import_parser_sees_every_form(tmp_path):
    package = tmp_path / "distill" / "cache"
    package.mkdir(parents=True)
    source = package / "x.py"
    source.write_text(
        "import distill.pipeline.losses.kd\n"
        "from distill.pipeline import train\n"
        "def f():\n"
        "    from ..pipeline.align import build_vocab_map\n"
    )
    found = imported_modules(source, tmp_path / "distill")
    assert {"distill.pipeline.losses.kd", "distill.pipeline.train", "distill.pipeline.align"} <= found


@pytest.mark.parametrize("owner, forbidden, why", RULES)
def test_layers_import_only_downwards(owner, forbidden, why):
    owned = {name: path for name, path in MODULES.items() if within(name, owner)}
    assert owned or owner == "distill.runtime", f"no module {owner}"
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for module, path in owned.items()
        for name in sorted(imported_modules(path))
        if within(name, forbidden)
    ]
    assert not offenders, f"{why}: " + "; ".join(offenders)
