"""Every third-party module genreflow, components/ and pipelines/ import is a distribution
pyproject.toml declares: the dependencies, or an extra where the import is optional (inside
a `try` that catches ImportError)."""

from __future__ import annotations

import ast
import functools
import sys
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("genreflow", "components", "pipelines")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, optional) for each absolute import; optional: inside a try whose
    handlers catch ImportError (or ModuleNotFoundError)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    optional_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = [h.type for h in node.handlers if h.type is not None]
            names = {n.id for t in caught for n in ast.walk(t) if isinstance(n, ast.Name)}
            if names & {"ImportError", "ModuleNotFoundError"}:
                for inner in node.body:
                    optional_lines.update(range(inner.lineno, inner.end_lineno + 1))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            # `from google.cloud import storage`: the module may be the name imported
            modules = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(m, node.lineno, node.lineno in optional_lines) for m in modules]
    return found


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


@functools.cache
def _modules_of(name: str) -> frozenset[str]:
    """Every dotted module path a distribution's files hold (kfp/dsl/x.py: kfp, kfp.dsl...)."""
    held = set()
    for file in distribution(name).files or ():
        parts = str(file).removesuffix(".py").split("/")
        held.update(".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return frozenset(held)


def providers(module: str) -> set[str]:
    """The installed distributions that hold `module` itself, or the nearest package above
    it: in a namespace shared by several (google.*, kfp.kubernetes), only its own."""
    candidates = _distributions().get(module.split(".")[0], [])
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        prefix = ".".join(parts[:depth])
        holding = {canonicalize_name(n) for n in candidates if prefix in _modules_of(n)}
        if holding:
            return holding
    return set()


def test_every_import_is_a_declared_distribution():
    required = _names(PROJECT["dependencies"])
    optional = {
        name
        for extra, requirements in PROJECT["optional-dependencies"].items()
        if extra != "test"
        for name in _names(requirements)
    }
    problems = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, line, is_optional in imports(path):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("genreflow", "__future__"):
                    continue
                where = f"{path.relative_to(ROOT)}:{line}"
                found = providers(module)
                if not found:
                    # An optional one need not be installed here (the vertex extra: below).
                    if not is_optional:
                        problems.append(f"{where}: {module}: no installed distribution has it")
                    continue
                allowed = required | (optional if is_optional else set())
                if not found & allowed:
                    kind = "an extra" if is_optional else "the dependencies"
                    problems.append(f"{where}: {module} ({', '.join(sorted(found))}) not in {kind}")
    assert not problems, "\n".join(problems)


def test_the_optional_vertex_import_is_an_extra():
    """google-cloud-aiplatform is not installed here, so the rule above cannot see its
    distribution: the import and the extra are checked by name."""
    submit = imports(ROOT / "pipelines" / "submit.py")
    assert ("google.cloud.aiplatform", True) in {(m, o) for m, _, o in submit if "aiplatform" in m}
    assert "google-cloud-aiplatform" in _names(PROJECT["optional-dependencies"]["vertex"])


def test_the_rule_finds_an_undeclared_import(tmp_path):
    """The check itself: a distribution installed here but not declared is caught."""
    module = tmp_path / "uses_pytest.py"
    module.write_text("import pytest\ntry:\n    import yaml\nexcept ImportError:\n    pass\n")
    found = imports(module)
    assert found == [("pytest", 1, False), ("yaml", 3, True)]
    assert providers("pytest.fixture") == {"pytest"}  # a name inside a module: the module
    assert providers("pytest") == {"pytest"}
    assert "pytest" not in _names(PROJECT["dependencies"])
    assert providers("google.cloud.storage") == {"google-cloud-storage"}
    assert providers("kfp.kubernetes") == {"kfp-kubernetes"}
