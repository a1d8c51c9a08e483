"""genreflow's fix of kfp.local's DockerRunner (kubeflow/pipelines#13332) applies only on the
kfp releases it was checked against, and says so, in one line, elsewhere.

The fix running containers for real (twenty fast exits, each status read) is
tests/containers/test_dag.py, under `make dag-test`."""

from __future__ import annotations

import importlib.metadata

import pytest
from kfp.local import docker_task_handler

from genreflow.pipelines import local


@pytest.fixture
def kfp_runner():
    """kfp's own run_docker_container, put back after each test."""
    original = docker_task_handler.run_docker_container
    yield original
    docker_task_handler.run_docker_container = original


def test_the_installed_kfp_is_one_the_fix_was_checked_against(kfp_runner, capsys):
    lowest, highest = local.PATCHED_KFP
    installed = local._kfp_version()
    assert lowest <= installed <= highest, (
        f"kfp {importlib.metadata.version('kfp')}: read its docker_task_handler, check the "
        "fix still fits (or is no longer needed), then move PATCHED_KFP"
    )
    assert local._wait_for_every_container() is True
    assert docker_task_handler.run_docker_container is not kfp_runner
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("version", ["2.16.1", "2.18.0", "3.0.0rc1", "dev"])
def test_outside_those_releases_kfp_keeps_its_own_and_says_so(
    version, kfp_runner, monkeypatch, capsys
):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert local._wait_for_every_container() is False
    assert docker_task_handler.run_docker_container is kfp_runner
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "kubeflow/pipelines#13332" in err and "2.17.0 to 2.17.3" in err
    shown = version if version[0].isdigit() else "unknown"
    assert f"kfp {shown.removesuffix('rc1')}" in err


def test_the_range_starts_at_pyprojects_kfp_floor():
    """Below the floor no install can reach; above the floor, no release goes unchecked."""
    from pathlib import Path

    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (kfp,) = [Requirement(r) for r in requirements if Requirement(r).name == "kfp"]
    floor = next(c.version for c in kfp.specifier if c.operator == ">=")
    lowest, _ = local.PATCHED_KFP
    assert tuple(int(x) for x in (floor.split(".") + ["0", "0"])[:3]) == lowest
