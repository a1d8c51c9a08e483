"""The layers of docs/architecture.md, checked against the code's own imports.

Every import counts, the ones inside functions too (genreflow imports its heavy
dependencies lazily, so a rule that read only the top of each file would miss most of
the graph).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
# What the installed distribution calls each top-level folder (pyproject's package-dir).
FOLDERS = {"genreflow": "genreflow", "components": "genreflow.components",
           "pipelines": "genreflow.pipelines"}  # fmt: skip
# Modules that hold the domain's models; the data layer must not need any of them.
MODEL_MODULES = ("genreflow.models", "genreflow.logmel", "genreflow.train", "genreflow.head",
                 "genreflow.embedding", "genreflow.ensemble", "genreflow.inference",
                 "genreflow.serving")  # fmt: skip
# What the MLflow adapter may never know: the steps, the training, the report, the model.
ABOVE_TRACKING = ("genreflow.steps", "genreflow.train", "genreflow.head",
                  "genreflow.embedding", "genreflow.aggregate", "genreflow.serving",
                  "genreflow.registry", "genreflow.compare", "genreflow.inference",
                  "genreflow.ensemble", "genreflow.cli")  # fmt: skip
LONG_MODULE_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports anywhere in its file (a from-import of a
    submodule counts as that submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            target = {"components": "genreflow.components", "pipelines": "genreflow.pipelines"}.get(
                target.split(".")[0], target.split(".")[0]
            ) + target[len(target.split(".")[0]) :]
            if target in MODULES and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(importers, forbidden) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if importers(name)
        for target in targets
        if forbidden(name, target)
    )


def test_the_graph_is_read():
    """The rules below are only as good as the graph: it holds the known arrows."""
    assert "genreflow.steps.fold" in GRAPH["genreflow.cli"]
    assert "genreflow.tracking.client" in GRAPH["genreflow.tracking.runs"]
    assert "genreflow.steps.report" in GRAPH["genreflow.components.aggregate"]
    assert len(GRAPH) > 80


def test_the_library_never_imports_the_kfp_side():
    """components/ and pipelines/ are thin layers over genreflow; nothing below imports them."""
    kfp_side = ("genreflow.components", "genreflow.pipelines")
    assert _violations(lambda n: not _within(n, kfp_side), lambda n, t: _within(t, kfp_side)) == []


def test_only_the_entry_points_import_the_steps():
    """A step is called by its component, its subcommand or the API; no library module below
    the steps calls one (the steps import each other only for the fold mechanism)."""
    callers = ("genreflow.steps", "genreflow.cli", "genreflow.components", "genreflow.pipelines")
    assert (
        _violations(lambda n: not _within(n, callers), lambda n, t: _within(t, "genreflow.steps"))
        == []
    )


def test_the_data_layer_imports_no_model():
    assert (
        _violations(lambda n: _within(n, "genreflow.data"), lambda n, t: _within(t, MODEL_MODULES))
        == []
    )


def test_tracking_is_a_pure_mlflow_adapter():
    assert (
        _violations(
            lambda n: _within(n, "genreflow.tracking"), lambda n, t: _within(t, ABOVE_TRACKING)
        )
        == []
    )


def test_storage_imports_nothing_above_it():
    """storage/ sits on the ground floor's helpers only (atomic, errors, limits, locks,
    progress, retry)."""
    ground = ("genreflow.storage", "genreflow.atomic", "genreflow.errors", "genreflow.limits",
              "genreflow.locks", "genreflow.progress", "genreflow.retry", "genreflow")  # fmt: skip
    assert (
        _violations(lambda n: _within(n, "genreflow.storage"), lambda n, t: not _within(t, ground))
        == []
    )


def test_no_import_circle():
    """Depth-first over every import: a module reached again while still on the path closes
    a circle, which the failure spells out."""
    state: dict[str, str] = {}
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_every_package_is_in_the_distribution():
    """A package folder pyproject does not list is left out of the wheel, so the images
    (which install the wheel) would fail to import it."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages - listed == set()


@pytest.mark.parametrize(
    "name",
    sorted(n for n, p in MODULES.items() if len(p.read_text().splitlines()) > LONG_MODULE_LINES),
)
def test_a_long_module_says_why(name):
    """No module past LONG_MODULE_LINES lines without its reason at its top."""
    docstring = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
    assert f"{LONG_MODULE_LINES} lines" in docstring or "of this size" in docstring, (
        f"{MODULES[name].relative_to(ROOT)}: over {LONG_MODULE_LINES} lines with no reason in "
        "its docstring"
    )
