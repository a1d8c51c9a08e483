"""The lowest versions pyproject admits: each floor is where something genreflow relies on
arrived (a feature, a security fix, the first release that installs or passes the tests).
`make test-floors` installs those lowest versions and runs the library and component tests
on them (the workflow's `floors` job); this checks that the floors say what they must and
that the job installs them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib


ROOT = Path(__file__).resolve().parents[1]

# package: (the floor, the last release before it, why)
FLOORS = {
    # genreflow loads downloaded checkpoints with torch.load(weights_only=True); before 2.6.0
    # that could still be made to run code (CVE-2025-32434).
    "torch": ("2.6.0", "2.5.1", "CVE-2025-32434, weights_only loading bypass"),
    # genreflow/storage/gcs.py passes checksum="auto" to Blob uploads and downloads; the option
    # arrived in google-cloud-storage 3.0.0 (googleapis/python-storage#1383, its CHANGELOG).
    "google-cloud-storage": ("3.0.0", "2.19.0", 'checksum="auto"'),
    # What make test-floors found, each floor the lowest release that installed and passed:
    # The run TTL pipelines/cv.py sets (dsl.PipelineConfig(ttl_seconds_after_finished=...))
    # arrived in kfp 2.17.0; 2.16.1 refuses the argument, so every compile failed.
    "kfp": ("2.17.0", "2.16.1", "PipelineConfig's ttl_seconds_after_finished"),
    "kfp-kubernetes": ("2.17.0", "2.16.1", "kfp's"),
    "kfp-server-api": ("2.17.0", "2.16.1", "kfp 2.17.0 requires kfp-server-api 2.17.0"),
    # librosa 0.10.0 and 0.10.1 import pkg_resources, which setuptools 81 and later lack.
    "librosa": ("0.10.2", "0.10.1", "no pkg_resources"),
    # mlflow before 3.9 fails to import its database stores with SQLAlchemy 2.1, which its
    # own range admits (FallbackAsyncAdaptedQueuePool is gone); skinny moves with it.
    "mlflow": ("3.9.0", "3.8.1", "SQLAlchemy 2.1"),
    "mlflow-skinny": ("3.9.0", "3.8.1", "mlflow 3.9 requires mlflow-skinny 3.9"),
    # google-api-core before 2.24.2 refuses protobuf 6, which kfp requires.
    "google-api-core": ("2.24.2", "2.24.1", "protobuf 6"),
    # librosa 0.10.2's own floor.
    "soundfile": ("0.12.1", "0.12.0", "librosa's floor"),
    # The first releases with wheels for Python 3.11; before them a build from source needs
    # a C++ toolchain and CMake (soxr) or PostgreSQL's pg_config (psycopg2-binary).
    "soxr": ("0.3.3", "0.3.2", "Python 3.11 wheels"),
    "psycopg2-binary": ("2.9.5", "2.9.4", "Python 3.11 wheels"),
    # cel-python 0.5 (the test extras: test_infra's CEL) requires PyYAML 6.0.2; with 6.0.1
    # the floors' install has no solution (what CI's make test-floors hit).
    "pyyaml": ("6.0.2", "6.0.1", "cel-python 0.5 requires 6.0.2"),
}


def dependencies() -> dict[str, Requirement]:
    """Every requirement with a range: the dependencies and the extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = [project["dependencies"], *project["optional-dependencies"].values()]
    found = {}
    for requirement in map(Requirement, (r for group in lists for r in group)):
        if requirement.specifier:
            found[canonicalize_name(requirement.name)] = requirement
    return found


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_the_floor_leaves_out_releases_without_what_genreflow_needs(name):
    floor, previous, why = FLOORS[name]
    specifier = dependencies()[name].specifier
    assert specifier.contains(floor), f"{name}{specifier} refuses {floor}"
    assert not specifier.contains(previous), f"{name}{specifier} admits {previous}: {why}"


def test_checksum_auto_is_what_storage_passes():
    """The reason for the google-cloud-storage floor is still in the code."""
    assert 'checksum="auto"' in (ROOT / "genreflow" / "storage" / "gcs.py").read_text()


def test_the_floors_job_installs_every_floor_but_torch():
    """requirements/floors.py: a `name==floor` constraint for each requirement with one; torch
    kept out (make test-floors installs the tested release); and the job runs it."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "requirements" / "floors.py"),
            "pyproject.toml",
            "--keep",
            "torch",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    pins = dict(line.split("==") for line in done.stdout.splitlines())
    expected = {
        name: next(c.version for c in r.specifier if c.operator == ">=")
        for name, r in dependencies().items()
        if name != "torch" and any(c.operator == ">=" for c in r.specifier)
    }
    assert pins == expected
    assert "torch" not in pins
    for name, (floor, _, _) in FLOORS.items():
        if name != "torch":
            assert Version(pins[name]) == Version(floor), name
    makefile = (ROOT / "Makefile").read_text()
    assert "requirements/floors.py pyproject.toml --keep torch" in makefile
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yaml").read_text())
    runs = [step.get("run", "") for step in workflow["jobs"]["floors"]["steps"]]
    assert "make test-floors" in runs
