"""Fixtures shared across test files: servers the tests start themselves on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items) -> None:
    """With `make test`'s two workers (pytest-xdist, --dist loadgroup), a test file runs on
    one worker, in order, with its module fixtures made once, as without workers; a test
    may name a group of its own (xdist_group) to run beside the rest of its file. Not in
    effect with pytest 9.2 and pytest-xdist 3.8: xdist writes the group into item._nodeid,
    which pytest 9.2's nodeid no longer reads (README, "Tests")."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session", autouse=True)
def reuse_key():
    """The key the pipeline signs its fold runs with (a cluster mounts it from a Secret):
    set for the whole session, so the steps and kfp.local's task processes sign and check
    fold runs as deployed (tests/test_reuse_record.py tests it, and its absence)."""
    os.environ.setdefault("GENREFLOW_REUSE_KEY", secrets.token_hex(32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url}: server not up after {timeout:.0f} s")


@contextlib.contextmanager
def serving(command: list[str], health: str, log_path: Path, *, port: int, timeout=60.0, env=None):
    """Run a server on 127.0.0.1:port until `health` answers; yield its base URL; stop it."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}{health}", process, timeout=timeout)
        yield url
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (sqlite backend, local artifact store); its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    # A loaded CI machine (two test workers, each importing torch) can take minutes.
    with serving(command, "/health", root / "server.log", port=port, env=env, timeout=240) as uri:
        yield uri


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> str:
    """A GCS emulator (gcp-storage-emulator, in-memory) on 127.0.0.1; its base URL, for
    STORAGE_EMULATOR_HOST."""
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    if not executable.exists():
        pytest.fail(f"{executable} not found: install the test extras (pip install -e '.[test]')")
    port = free_port()
    command = [str(executable), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    log_path = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with serving(command, "/", log_path, port=port, timeout=30) as url:
        yield url


def start_run_arguments(**changes) -> dict:
    """The start_run component's arguments but tracking_uri and mlflow_run: a frozen-base
    run of the default recipes (genreflow.recipe), with `changes` applied."""
    from genreflow.recipe import HeadConfig, TrainConfig, defaults

    head, tune = defaults(HeadConfig), defaults(TrainConfig)
    arguments = {name: tune[name] for name in ("iterations", "batch_size", "lr", "mixup")}
    arguments.update(eval_every=tune["eval_every"], precision=tune["precision"])
    for name in ("iterations", "batch_size", "lr", "weight_decay", "mixup", "eval_every"):
        arguments[f"head_{name}"] = head[name]
    arguments.update(
        experiment="test",
        pipeline_run="run-1",
        pipeline_run_id="kfp-run-1",
        kfp_ui="",
        images="ghcr.io/genreflow/genreflow:test",
        profile="custom",
        protocol="cv10",
        selection="validation",
        source="file:///genres.tar.gz",
        sha256="",
        pretrained="",
        freeze_base=True,
        clip_seconds=2.0,
        seed=0,
    )
    return {**arguments, **changes}
