"""The whole DAG with every step in its own container: `make dag-test` (after image-test).

kfp.local's DockerRunner, driven through podman's Docker-compatible API, runs each task in
the images `make image-test` built, as the images' user (uid 10001), reading its inputs from
and writing its outputs to the paths KFP gives a container. The dataset comes over HTTP and
the tracking server is the host's, both on 127.0.0.1: the containers share the host's
network, the one way here for them to reach a server on its loopback.

Each branch runs twice on the same source, once in containers and once through the
subprocess runner (`make run`'s): on a CPU the per-fold accuracies are equal bit for bit.

Needs root, podman and the images; not part of `make test` (the `containers` mark).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from genreflow.data.synth import make_synthetic_gtzan
from genreflow.pipelines.local import run_local

pytestmark = pytest.mark.containers

STATE = Path(os.environ.get("IMAGE_TEST_DIR", "/var/tmp/genreflow-image-test"))
IMAGE_UID = 10001
BRANCHES = {
    "frozen-base": {"clip_seconds": 2.0, "head_iterations": 200, "head_eval_every": 100},
    "fine-tune": {
        "clip_seconds": 2.0,
        "freeze_base": False,
        "iterations": 2,
        "batch_size": 2,
        "eval_every": 2,
        "folds": [1, 2],
    },
}


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The images image-test built, by their commit tags: what the steps run in."""
    built = json.loads((STATE / "images.json").read_text())
    return {"cpu": built["cpu"]["ref"], "gpu": built["gpu"]["ref"]}


@pytest.fixture(scope="module")
def podman_api(tmp_path_factory):
    """podman's Docker-compatible API on a socket of its own, over image-test's image
    store; DOCKER_HOST points at it while the module runs."""
    import docker

    folder = tmp_path_factory.mktemp("podman")
    socket = folder / "podman.sock"
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(STATE / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(STATE / "storage.conf"),
    }
    with open(folder / "service.log", "wb") as log:
        service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{socket}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    host = f"unix://{socket}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                docker.DockerClient(base_url=host).ping()
                break
            except docker.errors.DockerException as exc:
                if service.poll() is not None or time.monotonic() > deadline:
                    log = folder / "service.log"
                    raise RuntimeError(f"podman's API did not start ({exc}): {log}") from None
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DOCKER_HOST", host)
            yield host
    finally:
        service.terminate()
        service.wait(timeout=30)


@pytest.fixture(scope="module")
def http_source(tmp_path_factory):
    """A tiny synthetic GTZAN archive served over HTTP on 127.0.0.1: (URL, sha256)."""
    folder = tmp_path_factory.mktemp("source")
    archive, sha256 = make_synthetic_gtzan(folder, clips_per_genre=4, seconds=2.0, seed=3)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/{archive.name}", sha256
    finally:
        server.shutdown()
        server.server_close()


def run(workspace, source, tracking_uri, branch, experiment, **runner):
    url, sha256 = source
    return run_local(
        workspace,
        profile="demo",
        source=url,
        sha256=sha256,
        tracking_uri=tracking_uri,
        cache=False,
        overrides={**BRANCHES[branch], "experiment": experiment, "registered_model": ""},
        **runner,
    )


def fold_accuracies(report: dict) -> dict[int, float]:
    return {f["fold"]: f["accuracy"] for f in report["folds"]}


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_every_step_in_its_container_gives_the_subprocess_runners_result(
    branch, images, podman_api, http_source, mlflow_server, tmp_path
):
    started = time.monotonic()
    inside = run(
        tmp_path / "containers",
        http_source,
        mlflow_server,
        branch,
        f"dag-{branch}-containers",
        runner="docker",
        images=images,
    )
    container_seconds = time.monotonic() - started
    started = time.monotonic()
    outside = run(
        tmp_path / "subprocess", http_source, mlflow_server, branch, f"dag-{branch}-subprocess"
    )
    print(
        f"{branch}: containers {container_seconds:.0f} s, "
        f"subprocesses {time.monotonic() - started:.0f} s"
    )

    assert (
        inside["usable_folds"]
        == outside["usable_folds"]
        == BRANCHES[branch].get("folds", list(range(1, 11)))
    )
    assert fold_accuracies(inside) == fold_accuracies(outside)  # bit for bit, on a CPU
    assert inside["accuracy"] == outside["accuracy"]

    # Every task ran in its image as uid 10001: what they wrote under the pipeline root
    # is that user's, the fold folders included.
    root = tmp_path / "containers" / "kfp"
    written = [p for p in root.rglob("*") if p.is_file()]
    assert written and {p.stat().st_uid for p in written} == {IMAGE_UID}
    assert list(root.glob("*/for-loop-*/*/model/summary.json"))

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"dag-{branch}-containers")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`genreflow.role` = 'pipeline'"
    )
    assert parent.info.status == "FINISHED"
    assert set(parent.data.tags["images"].split()) == set(images.values())
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(int(c.data.tags["fold"]) for c in children) == inside["usable_folds"]


def test_a_container_that_ends_at_once_is_reported_as_it_ended(images, podman_api):
    """kfp's own container runner took a container removed before its status was read for a
    success, and podman's HTTP 500 for it crashed the run (seen once in three DAG runs):
    genreflow's keeps each container until its status is read. Twenty fast exits each way."""
    import docker
    from kfp.local import docker_task_handler

    from genreflow.pipelines.local import _wait_for_every_container

    _wait_for_every_container()
    client = docker.from_env()
    try:
        for status in (3, 0) * 10:
            command = ["python", "-c", f"import sys; print('bye'); sys.exit({status})"]
            ended = docker_task_handler.run_docker_container(
                client, images["cpu"], command, volumes={}, network_mode="none"
            )
            assert ended == status
        assert not client.containers.list(all=True)  # every one removed
    finally:
        client.close()


def test_a_fold_whose_container_is_killed_resumes_from_its_last_checkpoint(
    images, podman_api, http_source, mlflow_server, tmp_path, capfd
):
    """A lost pod, as `podman kill` (SIGKILL) of the fold's container once it has written its
    first checkpoint to the work folder under the pipeline root: the task's retry (kfp.local
    honours set_retry, as Vertex does) starts the fold again, it resumes from that
    checkpoint (its log says from which iteration), and the run ends with the accuracy of a
    run that was never interrupted."""
    import docker

    recipe = {
        "clip_seconds": 2.0,
        "freeze_base": False,
        "iterations": 4,
        "batch_size": 2,
        "eval_every": 2,
        "folds": [1],
    }
    url, sha256 = http_source

    def run(workspace: Path, experiment: str, **runner) -> dict:
        overrides = {**recipe, "experiment": experiment, "registered_model": ""}
        return run_local(
            workspace, profile="demo", source=url, sha256=sha256, tracking_uri=mlflow_server,
            cache=False, overrides=overrides, **runner,
        )  # fmt: skip

    workspace = tmp_path / "containers"
    work = workspace / "kfp" / "genreflow-work" / "folds"
    killed: list[str] = []

    def kill_the_fold_at_its_first_checkpoint() -> None:
        client = docker.from_env()
        deadline = time.monotonic() + 600
        while not list(work.glob("*/resume.pt")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for container in client.containers.list():
            if "train" in container.attrs["Config"]["Cmd"]:  # --function_to_execute train
                container.kill(signal="SIGKILL")  # podman kill, through podman's API
                killed.append(container.id)

    killer = threading.Thread(target=kill_the_fold_at_its_first_checkpoint, daemon=True)
    killer.start()
    resumed = run(workspace, "dag-killed", runner="docker", images=images)
    killer.join(timeout=60)
    log = capfd.readouterr().out
    assert len(killed) == 1, "the fold's container was not found running"
    assert "Task 'train' finished with status FAILURE" in _plain(log)
    assert "fold 1: resuming from iteration 2" in log

    whole = run(tmp_path / "uninterrupted", "dag-uninterrupted")
    assert resumed["usable_folds"] == whole["usable_folds"] == [1]
    assert fold_accuracies(resumed) == fold_accuracies(whole)


def _plain(log: str) -> str:
    """kfp.local's log without its terminal colours."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", log)
