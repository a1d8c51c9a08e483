"""The hash-locked requirements (requirements/*.lock, `make lock`) against pyproject.toml:
every declared requirement pinned inside its range, nothing pinned that nothing asks for,
every file by its hash, and torch's release the Makefile's in both builds."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = "genreflow"
FROM_PYPROJECT = f"{PROJECT} (pyproject.toml)"
# lock: the extras it holds beside the dependencies
LOCKS = {"runtime.lock": (), "cuda.lock": ("gpu",), "retrain.lock": ("test",)}
TORCH_PIN = re.search(r"^TORCH_PIN \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]


@dataclass
class Pin:
    version: Version
    hashes: list[str]
    via: list[str] = field(default_factory=list)


def read_lock(name: str) -> dict[str, Pin]:
    """name -> Pin, from uv's output: `name==version \\`, hash lines, `# via` lines."""
    pins: dict[str, Pin] = {}
    current = None
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", line):
            current = canonicalize_name(match[1])
            assert current not in pins, f"{name}: {current} pinned twice"
            pins[current] = Pin(Version(match[2]), [])
        elif match := re.match(r"^\s+--hash=sha256:([0-9a-f]{64})(?: \\)?$", line):
            pins[current].hashes.append(match[1])
        elif match := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line):
            if current is not None and match[1] != "via":
                pins[current].via.append(match[1])
        else:
            assert not line.strip() or line.startswith("#"), f"{name}: unexpected line {line!r}"
    return pins


def declared(extras: tuple[str, ...]) -> list[Requirement]:
    """The dependencies, the extras named and the extras those name (genreflow[local])."""
    optional = PYPROJECT["project"]["optional-dependencies"]
    found, todo, seen = [], [PYPROJECT["project"]["dependencies"]], set()
    todo += [optional[extra] for extra in extras]
    while todo:
        for requirement in map(Requirement, todo.pop()):
            if canonicalize_name(requirement.name) == PROJECT:
                todo += [optional[e] for e in sorted(requirement.extras - seen)]
                seen |= requirement.extras
            else:
                found.append(requirement)
    return found


def build_requires() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_pin_has_its_hashes(name):
    pins = read_lock(name)
    assert len(pins) > 50
    for package, pin in pins.items():
        assert pin.hashes, f"{name}: {package} has no hash"


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_declared_requirement_is_pinned_inside_its_range(name):
    pins = read_lock(name)
    extras = LOCKS[name]
    for requirement in [*declared(extras), *build_requires()]:
        package = canonicalize_name(requirement.name)
        assert package in pins, f"{name}: {requirement} is not pinned"
        version = pins[package].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}: {package}=={version} is outside pyproject's {requirement}"
        )
        # An extra's own requirements (mlflow[auth] -> Flask-WTF) are pinned too.
        if requirement.extras:
            assert any(
                f"{package}[" in via or via == package for pin in pins.values() for via in pin.via
            ), f"{name}: nothing pinned for {requirement}"


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_nothing_is_pinned_that_nothing_asks_for(name):
    """Top level: what pyproject names (uv writes `via genreflow (pyproject.toml)`) and the
    build backend (stdin, no annotation); everything else is asked for by a pinned package."""
    pins = read_lock(name)
    extras = LOCKS[name]
    wanted = {canonicalize_name(r.name) for r in [*declared(extras), *build_requires()]}
    for package, pin in pins.items():
        parents = [re.sub(r"\[.*\]$", "", via) for via in pin.via]
        if not parents or FROM_PYPROJECT in parents:
            assert package in wanted, f"{name}: {package} is pinned at the top, unasked"
            continue
        for parent in parents:
            assert canonicalize_name(parent) in pins, f"{name}: {package} via {parent}, unpinned"


def test_both_images_take_the_makefiles_torch_and_share_every_other_version():
    """issue 23: the CPU and the CUDA image on one torch release, the one make install and
    the tests use (the Makefile's TORCH_PIN); the CPU one PyTorch's CPU build."""
    runtime, cuda, retrain = (read_lock(n) for n in ("runtime.lock", "cuda.lock", "retrain.lock"))
    assert str(runtime["torch"].version) == f"{TORCH_PIN}+cpu"
    assert str(retrain["torch"].version) == f"{TORCH_PIN}+cpu"
    assert str(cuda["torch"].version) == TORCH_PIN
    # PyPI's torch is its CUDA build: it asks for NVIDIA's CUDA runtime wheels.
    assert any(p.startswith("nvidia-cuda-runtime") for p in cuda)
    assert not any(p.startswith("nvidia-cuda") for p in runtime)
    assert "nvidia-ml-py" in cuda and "nvidia-ml-py" not in runtime
    shared = (runtime.keys() & cuda.keys()) - {"torch"}
    differ = {p: (runtime[p].version, cuda[p].version) for p in shared}
    assert {p: v for p, v in differ.items() if v[0] != v[1]} == {}
    assert runtime.keys() - cuda.keys() == set()


def test_the_runtime_images_carry_mlflow_skinny_not_the_server():
    for name in ("runtime.lock", "cuda.lock"):
        pins = read_lock(name)
        assert "mlflow-skinny" in pins
        for server_side in ("mlflow", "flask", "gunicorn", "sqlalchemy", "alembic", "pyarrow"):
            assert server_side not in pins, f"{name}: {server_side}"
    assert {"mlflow", "flask", "sqlalchemy"} <= read_lock("retrain.lock").keys()


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_the_header_says_how_it_was_made_and_installed(name):
    text = (ROOT / "requirements" / name).read_text()
    assert "`make lock`" in text.split("\n\n")[0]
    assert f"pip install --require-hashes --no-deps -r requirements/{name}" in text
    assert "/tmp/" not in text and "/dev/fd" not in text  # nothing of the machine it ran on
