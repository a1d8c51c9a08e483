"""The lowest versions pyproject admits: each floor is where something genreflow relies on
arrived (a feature, a security fix). Installing those lowest versions and running the tests
on them is a CI job of its own, not run here; this checks that the floors say what they must.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

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
}


def dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_the_floor_leaves_out_releases_without_what_genreflow_needs(name):
    floor, previous, why = FLOORS[name]
    specifier = dependencies()[name].specifier
    assert specifier.contains(floor), f"{name}{specifier} refuses {floor}"
    assert not specifier.contains(previous), f"{name}{specifier} admits {previous}: {why}"


def test_checksum_auto_is_what_storage_passes():
    """The reason for the google-cloud-storage floor is still in the code."""
    assert 'checksum="auto"' in (ROOT / "genreflow" / "storage" / "gcs.py").read_text()
