"""MLflow logging against a real tracking server started by the test suite."""

import csv
import hashlib
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from genreflow.data.genres import GENRES
from genreflow.steps.fold import log_fold
from genreflow.tracking.client import TrackingError
from genreflow.tracking.runs import finish_pipeline_run, start_pipeline_run


def _fold_dir(path, fold, accuracy):
    path.mkdir()
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "train_loss", "test_accuracy", "seconds"])
        writer.writerow([10, 2.0, accuracy / 2, 1.0])
        writer.writerow([20, 1.0, accuracy, 2.0])
    summary = {
        "fold": fold,
        "path": "frozen-base",
        "iterations": 20,
        "final_accuracy": accuracy,
        "wall_seconds": 2.0,
        "config": {"lr": 1e-3},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    # The fold's selected head (frozen-base path), as a real (tiny) torch checkpoint.
    torch.save({"weight": torch.full((2, 2), float(fold))}, path / "head.pth")
    with open(path / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["audio_name", "fold", "genre", *GENRES])
        for genre in GENRES:
            probabilities = [0.91 if g == genre else 0.01 for g in GENRES]
            writer.writerow([f"{genre}.{fold:05d}.au", fold, genre, *probabilities])
    return path


def test_parent_with_nested_folds(mlflow_server, tmp_path):
    parent = start_pipeline_run(
        mlflow_server,
        "test-tracking",
        run_name="run-1",
        params={"lr": 1e-3, "folds": [1, 2]},
        tags={"profile": "demo"},
    )
    children = []
    for fold, accuracy in ((1, 0.8), (2, 0.9)):
        fold_dir = _fold_dir(tmp_path / f"fold{fold}", fold, accuracy)
        children.append(log_fold(mlflow_server, parent, fold_dir))
    finish_pipeline_run(mlflow_server, parent, metrics={"accuracy_mean": 0.85})

    client = MlflowClient(mlflow_server)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["accuracy_mean"] == pytest.approx(0.85)
    assert run.data.params["folds"] == "[1, 2]"
    assert run.data.tags["profile"] == "demo"
    assert run.data.tags["genreflow_version"]
    assert "version.torch" in run.data.tags
    found = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.info.run_id for r in found) == sorted(children)
    child = client.get_run(children[1])
    assert child.data.tags["fold"] == "2"
    assert child.data.tags["path"] == "frozen-base"
    assert child.data.params["lr"] == "0.001"
    history = client.get_metric_history(children[1], "test_accuracy")
    assert [(m.step, m.value) for m in history] == [(10, 0.45), (20, 0.9)]
    logged = {a.path for a in client.list_artifacts(children[1])}
    assert logged == {
        "metrics.csv",
        "predictions.csv",
        "summary.json",
        "head.pth",
        "confusion.png",
    }


def test_unreachable_server_fails_clearly_and_keeps_outputs(tmp_path, monkeypatch):
    import genreflow.tracking.client

    monkeypatch.setattr(genreflow.tracking.client, "RETRY_FIRST_DELAY_SECONDS", 0.01)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    fold_dir = _fold_dir(tmp_path / "fold1", 1, 0.5)
    # Nothing listens on port 9 (discard) on loopback: every request is refused.
    with pytest.raises(TrackingError) as err:
        log_fold("http://127.0.0.1:9", "0" * 32, fold_dir)
    message = str(err.value)
    assert "fold 1" in message and str(fold_dir) in message
    assert (fold_dir / "summary.json").exists()


# --- the run tree's lifecycle ------------------------------------------------------------
def _runs_under(client, parent_id):
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def _trainer(tmp_path, fold, accuracy=0.8, failures=()):
    """A fold step's training: raises the given exceptions in turn, then writes the folder."""
    calls = []

    def train(on_evaluation=None):
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        out = tmp_path / f"fold{fold}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        _fold_dir(out, fold, accuracy)
        return json.loads((out / "summary.json").read_text())

    return train, calls


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "embeddings.h5"
    path.write_bytes(b"the fold's input")
    return [path]


def _tracked(mlflow_server, parent, tmp_path, fold, train, inputs, **kwargs):
    from genreflow.steps.fold import tracked_fold

    return tracked_fold(
        train,
        out=tmp_path / f"fold{fold}",
        fold=fold,
        inputs=inputs,
        settings={"lr": 1e-3, "protocol": "cv10"},
        tracking_uri=mlflow_server,
        parent_run_id=parent,
        **kwargs,
    )


def test_caller_mlflow_run_id_becomes_the_parent_and_is_not_closed(
    mlflow_server, tmp_path, monkeypatch, inputs
):
    from genreflow.tracking.runs import close_pipeline_run

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("test-caller-run")
    caller = client.create_run(experiment, run_name="caller").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", caller)
    parent = start_pipeline_run(
        mlflow_server, "test-caller-run", pipeline_run_id="kfp-caller", params={"lr": 1e-3}
    )
    assert parent == caller  # no second run tree
    train, _ = _trainer(tmp_path, 1)
    _tracked(mlflow_server, parent, tmp_path, 1, train, inputs)
    (child,) = _runs_under(client, caller)
    assert child.data.tags["fold"] == "1" and child.info.status == "FINISHED"
    assert close_pipeline_run(mlflow_server, "kfp-caller", "SUCCEEDED") == caller
    run = client.get_run(caller)
    assert run.info.status == "RUNNING"  # the caller's to close, not ours
    assert run.data.tags["genreflow.final_state"] == "SUCCEEDED"
    assert run.data.params["lr"] == "0.001"


def test_platform_task_runs_are_used_not_duplicated(mlflow_server, tmp_path, monkeypatch, inputs):
    """KFP's MLflow integration: a run for the pipeline, a nested run per task, and
    MLFLOW_RUN_ID set to the task's run in each pod."""
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("test-platform-runs")
    platform = client.create_run(experiment, run_name="kfp-run").info.run_id

    def task_run(name):
        tags = {"mlflow.parentRunId": platform}
        return client.create_run(experiment, run_name=name, tags=tags).info.run_id

    monkeypatch.setenv("MLFLOW_RUN_ID", task_run("start-run"))
    parent = start_pipeline_run(mlflow_server, "ignored", pipeline_run_id="kfp-platform")
    assert parent == platform
    fold_task = task_run("train-head")
    monkeypatch.setenv("MLFLOW_RUN_ID", fold_task)
    train, _ = _trainer(tmp_path, 3)
    _tracked(mlflow_server, parent, tmp_path, 3, train, inputs)
    run = client.get_run(fold_task)
    assert run.data.tags["fold"] == "3"
    assert run.data.metrics["final_accuracy"] == pytest.approx(0.8)
    assert run.info.status == "RUNNING"  # the platform closes its task runs
    folds = [r for r in _runs_under(client, platform) if "fold" in r.data.tags]
    assert [r.info.run_id for r in folds] == [fold_task]


def test_an_unrelated_inherited_run_id_is_ignored_out_loud(
    mlflow_server, tmp_path, monkeypatch, inputs, capfd
):
    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-unrelated", pipeline_run_id="kfp-u")
    stranger = client.create_run(client.get_run(parent).info.experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", stranger)
    train, _ = _trainer(tmp_path, 2)
    _tracked(mlflow_server, parent, tmp_path, 2, train, inputs)
    assert f"ignoring MLFLOW_RUN_ID={stranger}" in capfd.readouterr().err
    (child,) = _runs_under(client, parent)
    assert child.data.tags["fold"] == "2"
    assert client.get_run(stranger).data.metrics == {}


def test_a_failing_fold_ends_failed_and_the_exit_handler_fails_the_parent(
    mlflow_server, tmp_path, inputs
):
    from genreflow.errors import GenreflowError
    from genreflow.tracking.runs import close_pipeline_run

    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-fail", pipeline_run_id="kfp-fail")
    good, _ = _trainer(tmp_path, 1)
    _tracked(mlflow_server, parent, tmp_path, 1, good, inputs)
    bad, calls = _trainer(tmp_path, 2, failures=[GenreflowError("features.h5: no fold 2")])
    with pytest.raises(GenreflowError, match="no fold 2"):
        _tracked(mlflow_server, parent, tmp_path, 2, bad, inputs)
    assert len(calls) == 1  # bad input is not retried
    # A fold whose pod was killed outright (SIGKILL, node lost) is left RUNNING...
    experiment = client.get_run(parent).info.experiment_id
    lost = client.create_run(
        experiment,
        tags={"mlflow.parentRunId": parent, "fold": "3", "genreflow.owner": "genreflow"},
    ).info.run_id

    assert close_pipeline_run(mlflow_server, "kfp-fail", "FAILED") == parent
    # ...until the exit handler ends it; the finished fold stays intact.
    status = {r.data.tags["fold"]: r.info.status for r in _runs_under(client, parent)}
    assert status == {"1": "FINISHED", "2": "FAILED", "3": "FAILED"}
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(lost).info.status == "FAILED"


def test_a_canceled_pipeline_ends_killed(mlflow_server):
    from genreflow.tracking.runs import close_pipeline_run

    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-cancel", pipeline_run_id="kfp-cancel")
    close_pipeline_run(mlflow_server, "kfp-cancel", "CANCELED")
    assert client.get_run(parent).info.status == "KILLED"
    assert close_pipeline_run(mlflow_server, "kfp-never-started", "FAILED") is None


def test_a_transient_failure_is_retried_in_step_with_one_run(
    mlflow_server, tmp_path, inputs, monkeypatch, capfd
):
    import genreflow.steps.fold

    monkeypatch.setattr(genreflow.steps.fold, "FOLD_RETRY_FIRST_DELAY_SECONDS", 0.01)
    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-retry", pipeline_run_id="kfp-retry")
    flaky, calls = _trainer(tmp_path, 4, failures=[ConnectionResetError("storage reset")])
    summary = _tracked(mlflow_server, parent, tmp_path, 4, flaky, inputs)
    assert len(calls) == 2 and summary["final_accuracy"] == 0.8
    err = capfd.readouterr().err
    assert "fold 4: ConnectionResetError: storage reset (transient); try 2 of 3" in err
    (child,) = _runs_under(client, parent)
    assert child.info.status == "FINISHED"
    assert child.data.tags["genreflow.tries"] == "2"

    always, calls = _trainer(tmp_path, 5, failures=[TimeoutError("GCS timed out")] * 3)
    with pytest.raises(TimeoutError, match="GCS timed out"):
        _tracked(mlflow_server, parent, tmp_path, 5, always, inputs)
    assert len(calls) == 3
    assert "(transient, but the tries are used up)" in capfd.readouterr().err


@pytest.mark.parametrize(
    "failure, kind",
    [
        (RuntimeError("CUDA error: out of memory"), "out of memory"),
        (MemoryError(), "out of memory"),
        (OSError(28, "No space left on device"), "no space"),
        (TypeError("forward() got an unexpected keyword"), "a programming error"),
        (RuntimeError("CUDA error: an illegal memory access"), "not a network"),
    ],
)
def test_what_cannot_change_fails_at_once(
    failure, kind, mlflow_server, tmp_path, inputs, monkeypatch, capfd
):
    import genreflow.steps.fold

    monkeypatch.setattr(genreflow.steps.fold, "FOLD_RETRY_FIRST_DELAY_SECONDS", 0.01)
    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-no-retry", pipeline_run_id="kfp-nr")
    broken, calls = _trainer(tmp_path, 7, failures=[failure] * 3)
    with pytest.raises(type(failure)):
        _tracked(mlflow_server, parent, tmp_path, 7, broken, inputs)
    assert len(calls) == 1
    err = capfd.readouterr().err
    assert f"({kind}" in err and "not retried)" in err
    (child,) = _runs_under(client, parent)
    assert child.info.status == "FAILED" and child.data.tags["genreflow.tries"] == "1"


def test_a_retried_task_takes_up_its_fold_run_again(mlflow_server, tmp_path, inputs, monkeypatch):
    import genreflow.steps.fold

    monkeypatch.setattr(genreflow.steps.fold, "FOLD_RETRY_FIRST_DELAY_SECONDS", 0.01)
    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-task-retry", pipeline_run_id="kfp-tr")
    # The step's first start uses two tries and dies (a pod lost mid-fold: KFP restarts it).
    killed, _ = _trainer(tmp_path, 6, failures=[ConnectionError("lost"), MemoryError()])
    with pytest.raises(MemoryError):
        _tracked(mlflow_server, parent, tmp_path, 6, killed, inputs)
    train, calls = _trainer(tmp_path, 6)  # KFP's retry of the task: one try left
    _tracked(mlflow_server, parent, tmp_path, 6, train, inputs)
    (child,) = _runs_under(client, parent)
    assert child.info.status == "FINISHED" and len(calls) == 1
    assert child.data.tags["genreflow.attempt"] == "2"
    assert child.data.tags["genreflow.tries"] == "3"


def test_a_fold_gets_three_tries_in_all_task_restarts_included(
    mlflow_server, tmp_path, inputs, monkeypatch
):
    import genreflow.steps.fold

    monkeypatch.setattr(genreflow.steps.fold, "FOLD_RETRY_FIRST_DELAY_SECONDS", 0.01)
    parent = start_pipeline_run(mlflow_server, "test-tries", pipeline_run_id="kfp-tries")
    flaky, calls = _trainer(tmp_path, 8, failures=[ConnectionError("down")] * 3)
    with pytest.raises(ConnectionError):
        _tracked(mlflow_server, parent, tmp_path, 8, flaky, inputs)
    assert len(calls) == 3
    again, calls = _trainer(tmp_path, 8)  # a platform retry of the task (Vertex honours it)
    from genreflow.errors import GenreflowError

    with pytest.raises(GenreflowError, match="fold 8: no tries left"):
        _tracked(mlflow_server, parent, tmp_path, 8, again, inputs)
    assert calls == []


def test_sigterm_ends_the_fold_run_killed(mlflow_server, tmp_path, inputs):
    import os
    import signal
    import subprocess
    import sys

    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-sigterm", pipeline_run_id="kfp-term")
    # The fold trains until the SIGTERM, however late it comes (a busy machine once
    # outlasted a sleep in its place).
    script = f"""
import signal
from genreflow.steps.fold import tracked_fold

def train(on_evaluation=None):
    print("training", flush=True)
    while True:
        signal.pause()

tracked_fold(train, out={str(tmp_path / "fold7")!r}, fold=7, inputs={[str(p) for p in inputs]!r},
             settings={{}}, tracking_uri={mlflow_server!r}, parent_run_id={parent!r})
"""
    step = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert step.stdout.readline().strip() == "training"
    # Training starts once the fold's run is open and SIGTERM's handler is in place.
    (running,) = _runs_under(client, parent)
    assert running.info.status == "RUNNING"
    os.kill(step.pid, signal.SIGTERM)
    _, err = step.communicate(timeout=120)
    assert step.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM; its run ends KILLED" in err
    (child,) = _runs_under(client, parent)
    assert child.info.status == "KILLED"


def _reuse_trainer(root, calls):
    def train(on_evaluation=None):
        calls.append(root)
        _fold_dir(root / "fold1", 1, 0.7)
        return json.loads((root / "fold1" / "summary.json").read_text())

    root.mkdir()
    return train


def test_a_rerun_reuses_identical_folds_under_its_new_parent(mlflow_server, tmp_path, inputs):
    client = MlflowClient(mlflow_server)
    calls = []

    def trainer(root):
        return _reuse_trainer(root, calls)

    first = start_pipeline_run(mlflow_server, "test-reuse", pipeline_run_id="kfp-reuse-1")
    _tracked(mlflow_server, first, tmp_path / "a", 1, trainer(tmp_path / "a"), inputs)
    (original,) = _runs_under(client, first)

    second = start_pipeline_run(mlflow_server, "test-reuse", pipeline_run_id="kfp-reuse-2")
    summary = _tracked(mlflow_server, second, tmp_path / "b", 1, trainer(tmp_path / "b"), inputs)
    assert len(calls) == 1  # not trained again
    assert summary["final_accuracy"] == 0.7
    for name in ("summary.json", "predictions.csv", "metrics.csv", "head.pth"):
        assert (tmp_path / "b" / "fold1" / name).read_bytes() == (
            tmp_path / "a" / "fold1" / name
        ).read_bytes()
    (reused,) = _runs_under(client, second)
    assert reused.data.tags["reused"] == "true"
    assert reused.data.tags["genreflow.reused_from"] == original.info.run_id
    assert reused.data.metrics["final_accuracy"] == pytest.approx(0.7)
    history = client.get_metric_history(reused.info.run_id, "test_accuracy")
    assert [(m.step, m.value) for m in history] == [(10, 0.35), (20, 0.7)]

    # Other inputs, or reuse turned off: trained again.
    third = start_pipeline_run(mlflow_server, "test-reuse", pipeline_run_id="kfp-reuse-3")
    _tracked(mlflow_server, third, tmp_path / "c", 1, trainer(tmp_path / "c"), inputs, reuse=False)
    inputs[0].write_bytes(b"other embeddings")
    fourth = start_pipeline_run(mlflow_server, "test-reuse", pipeline_run_id="kfp-reuse-4")
    _tracked(mlflow_server, fourth, tmp_path / "d", 1, trainer(tmp_path / "d"), inputs)
    assert len(calls) == 3
    assert "reused" not in _runs_under(client, fourth)[0].data.tags


def test_a_tolerated_failure_is_recorded_not_raised(mlflow_server, tmp_path, inputs, monkeypatch):
    import genreflow.steps.fold
    from genreflow.aggregate import aggregate

    monkeypatch.setattr(genreflow.steps.fold, "FOLD_RETRY_FIRST_DELAY_SECONDS", 0.01)
    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-tolerated", pipeline_run_id="kfp-tol")
    good, _ = _trainer(tmp_path, 1)
    _tracked(mlflow_server, parent, tmp_path, 1, good, inputs, tolerate_failure=True)
    broken, calls = _trainer(tmp_path, 2, failures=[ConnectionError("CUDA error")] * 3)
    summary = _tracked(mlflow_server, parent, tmp_path, 2, broken, inputs, tolerate_failure=True)
    assert len(calls) == 3 and "CUDA error" in summary.reason
    record = json.loads((tmp_path / "fold2" / "failed.json").read_text())
    assert record["fold"] == 2 and "CUDA error" in record["error"]
    status = {r.data.tags["fold"]: r.info.status for r in _runs_under(client, parent)}
    assert status == {"1": "FINISHED", "2": "FAILED"}
    # The aggregate names the failed fold and why.
    report = aggregate(
        [tmp_path / "fold1", tmp_path / "fold2"],
        tmp_path / "report",
        expected_folds=[1, 2],
        min_folds=1,
    )
    assert report["partial"] is True
    (failed,) = report["failed_folds"]
    assert failed["fold"] == 2 and "CUDA error" in failed["reason"]


def test_a_caller_nested_run_id_is_not_taken_for_a_fold_task_run(
    mlflow_server, tmp_path, monkeypatch, inputs
):
    """A CI job inside a run of its own: the parent is adopted through that run, and every
    kfp.local task inherits it; the folds must still get runs of their own."""
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("test-nested-caller")
    outer = client.create_run(experiment, run_name="ci").info.run_id
    job = client.create_run(experiment, tags={"mlflow.parentRunId": outer}).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", job)
    parent = start_pipeline_run(mlflow_server, "ignored", pipeline_run_id="kfp-nested")
    assert parent == outer
    for fold in (1, 2):
        train, _ = _trainer(tmp_path, fold, accuracy=0.5 + fold / 10)
        _tracked(mlflow_server, parent, tmp_path, fold, train, inputs)
    folds = {r.data.tags["fold"]: r for r in _runs_under(client, outer) if "fold" in r.data.tags}
    assert sorted(folds) == ["1", "2"] and job not in {r.info.run_id for r in folds.values()}
    assert client.get_run(job).data.metrics == {}


def test_a_retried_task_whose_fold_is_logged_does_not_train_again(mlflow_server, tmp_path, inputs):
    import shutil

    parent = start_pipeline_run(mlflow_server, "test-logged-retry", pipeline_run_id="kfp-lr")
    train, calls = _trainer(tmp_path, 3)
    _tracked(mlflow_server, parent, tmp_path, 3, train, inputs, reuse=False)
    shutil.rmtree(tmp_path / "fold3")  # the task's output was lost, KFP runs the task again
    summary = _tracked(mlflow_server, parent, tmp_path, 3, train, inputs, reuse=False)
    assert len(calls) == 1 and summary["final_accuracy"] == 0.8
    assert (tmp_path / "fold3" / "predictions.csv").is_file()


# --- live folds --------------------------------------------------------------------------
def _embeddings(path):
    """A small embeddings file of ten separable genre clusters, ten folds of ten clips."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    genre_index = np.arange(100) % 10
    x = np.maximum(rng.standard_normal((10, 16))[genre_index] + rng.standard_normal((100, 16)), 0)
    names = sorted(f"{GENRES[g]}.{i:05d}.wav" for i, g in enumerate(genre_index))
    with h5py.File(path, "w") as hf:
        hf["audio_name"] = np.array([n.encode() for n in names])
        hf["embedding"] = x.astype(np.float32)
        hf["target"] = np.eye(10, dtype=np.float32)[[GENRES.index(n.split(".")[0]) for n in names]]
        hf["fold"] = (np.arange(100) % 10 + 1).astype(np.int32)
        hf.attrs.update({"genres": list(GENRES), "base_sha256": "00" * 32, "pretrained": "t"})
    return path


def _fold_runs(client, parent):
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_a_running_fold_shows_its_curve_system_metrics_and_input_before_it_ends(
    mlflow_server, tmp_path
):
    """The real fold step (frozen-base head) in a process of its own, with a recipe too
    long to end while the test watches (10**9 steps): its curve, system metrics and dataset
    input are read back from the server while its run is RUNNING; then SIGTERM ends it."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    embeddings = _embeddings(tmp_path / "embeddings.h5")
    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-live", pipeline_run_id="kfp-live")
    script = f"""
from genreflow.recipe import HeadConfig
from genreflow.steps.head import head_fold

config = HeadConfig(embeddings={str(embeddings)!r}, fold=3, out={str(tmp_path / "fold3")!r},
                    iterations=10**9, eval_every=200, batch_size=16)
head_fold(config, tracking_uri={mlflow_server!r}, parent_run_id={parent!r}, reuse=False,
          min_folds=0, expected_folds=[3])
"""
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}
    step = subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 300  # the step's imports alone take 10-45 s here
        history, run = [], None
        while time.monotonic() < deadline and step.poll() is None:
            runs = _fold_runs(client, parent)
            if runs:
                run = client.get_run(runs[0].info.run_id)
                history = client.get_metric_history(run.info.run_id, "test_accuracy")
                if len(history) >= 3 and "system/cpu_utilization_percentage" in run.data.metrics:
                    break
            time.sleep(0.3)
        assert step.poll() is None, step.stderr.read()
        assert run is not None and len(history) >= 3, "no live curve within 300 s"
        assert run.info.status == "RUNNING" and run.info.run_name == "fold-03"
        assert not (tmp_path / "fold3" / "summary.json").exists()
        steps = [m.step for m in history]
        assert steps == sorted(steps) and steps[:3] == [200, 400, 600]
        assert len(set(steps)) == len(steps)
        # Each point carries the time it was measured: within the run, in training order.
        times = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
        assert run.info.start_time <= times[0] and times == sorted(times)
        assert times[-1] > times[0] and times[-1] <= time.time() * 1000
        for key in ("train_loss", "valid_accuracy"):
            assert len(client.get_metric_history(run.info.run_id, key)) >= 3
        assert "system/system_memory_usage_megabytes" in run.data.metrics
        (given,) = run.inputs.dataset_inputs
        sha256 = hashlib.sha256(embeddings.read_bytes()).hexdigest()
        assert given.dataset.name == "embeddings.h5" and given.dataset.digest == sha256[:16]
        assert json.loads(given.dataset.profile)["sha256"] == sha256
        assert {t.key: t.value for t in given.tags}["sha256"] == sha256
    finally:
        if step.poll() is None:
            os.kill(step.pid, signal.SIGTERM)
        _, err = step.communicate(timeout=120)
    assert step.returncode == 128 + signal.SIGTERM, err
    (ended,) = _fold_runs(client, parent)
    assert ended.info.status == "KILLED"


def test_a_finished_fold_holds_each_point_once_and_no_peak_metric(mlflow_server, tmp_path):
    from genreflow.recipe import HeadConfig
    from genreflow.steps.head import head_fold

    embeddings = _embeddings(tmp_path / "embeddings.h5")
    client = MlflowClient(mlflow_server)
    parent = start_pipeline_run(mlflow_server, "test-live", pipeline_run_id="kfp-once")
    config = HeadConfig(
        embeddings=str(embeddings), fold=1, out=str(tmp_path / "fold1"), iterations=300,
        eval_every=100,
    )  # fmt: skip
    head_fold(
        config, tracking_uri=mlflow_server, parent_run_id=parent, reuse=False, min_folds=0,
        expected_folds=[1],
    )  # fmt: skip
    (run,) = _fold_runs(client, parent)
    assert run.info.status == "FINISHED" and run.info.run_name == "fold-01"
    for key in ("train_loss", "valid_accuracy", "test_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [100, 200, 300], key
        assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in history)
    summary = json.loads((tmp_path / "fold1" / "summary.json").read_text())
    assert "peak_test_accuracy" in summary and "best_accuracy" not in summary
    assert run.data.metrics["final_accuracy"] == summary["final_accuracy"]
    assert run.data.metrics["selected_valid_accuracy"] == summary["valid_accuracy"]
    # Chosen on the test rows, the peak is no headline metric of the run.
    assert not {"peak_test_accuracy", "best_accuracy", "heldout_accuracy"} & set(run.data.metrics)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["embeddings.h5"]


def test_live_logging_to_a_lost_server_never_fails_the_fold(tmp_path, monkeypatch, capsys):
    """Every live point refused (nothing listens on port 9): the fold trains to its end,
    the failure is said once, and closing does not wait on retries."""
    import time

    import genreflow.tracking.live
    from genreflow.head import train_head
    from genreflow.recipe import HeadConfig
    from genreflow.tracking.live import LiveLog

    monkeypatch.setattr(genreflow.tracking.live, "LIVE_FIRST_DELAY_SECONDS", 0.01)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    live = LiveLog("http://127.0.0.1:9", "0" * 32, 2)
    config = HeadConfig(
        _embeddings(tmp_path / "embeddings.h5"), 2, tmp_path / "fold2", iterations=500,
        eval_every=50,
    )  # fmt: skip
    summary = train_head(config, on_evaluation=live.evaluation)
    started = time.monotonic()
    live.close()
    assert time.monotonic() - started < 30
    assert summary["iterations"] == 500 and (tmp_path / "fold2" / "summary.json").exists()
    err = capsys.readouterr().err
    assert err.count("could not be logged") == 1, err
    assert "the fold trains on" in err


def test_an_old_format_fold_logs_under_todays_names(mlflow_server, tmp_path):
    fold_dir = _fold_dir(tmp_path / "fold1", 1, 0.8)
    (fold_dir / "metrics.csv").write_text(
        "iteration,train_loss,heldout_accuracy,seconds\n10,2.0,0.4,1.0\n20,1.0,0.8,2.0\n"
    )
    summary = json.loads((fold_dir / "summary.json").read_text())
    (fold_dir / "summary.json").write_text(json.dumps({**summary, "best_accuracy": 0.8}))
    parent = start_pipeline_run(mlflow_server, "test-old-names")
    child = log_fold(mlflow_server, parent, fold_dir)
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(child, "test_accuracy")
    assert [(m.step, m.value) for m in history] == [(10, 0.4), (20, 0.8)]
    metrics = client.get_run(child).data.metrics
    assert not {"heldout_accuracy", "best_accuracy", "peak_test_accuracy"} & set(metrics)


# --- where the UI lands ------------------------------------------------------------------
@pytest.fixture
def local_store(tmp_path):
    """A sqlite store holding one pipeline run with folds 2 and 1 (logged in that order)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_pipeline_run(uri, "genreflow-gtzan", run_name="demo-run", pipeline_run_id="p1")
    folds = {
        fold: log_fold(uri, parent, _fold_dir(tmp_path / f"f{fold}", fold, 0.7)) for fold in (2, 1)
    }
    return uri, parent, folds


def test_ui_prints_the_classic_views_of_the_latest_pipeline_run(local_store, capsys):
    from urllib.parse import parse_qs, unquote, urlsplit

    from genreflow.cli import main

    uri, parent, folds = local_store
    experiment = MlflowClient(uri).get_run(parent).info.experiment_id
    assert main(["ui", "--tracking-uri", uri, "--no-serve", "--port", "5123"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"latest pipeline run: demo-run ({parent})"
    addresses = dict(line.removeprefix("MLflow ").split(": ", 1) for line in lines[1:])
    ui = "http://127.0.0.1:5123/#/experiments"
    # MLflow 3 opens an experiment in its GenAI view; workflowType opens the runs table.
    assert addresses["parent run"] == (
        f"{ui}/{experiment}/runs/{parent}?workflowType=machine_learning"
    )
    assert addresses["runs table"] == f"{ui}/{experiment}?workflowType=machine_learning"
    for key in ("folds compared", "fold curves"):
        query = parse_qs(urlsplit(unquote(addresses[key])).fragment.split("?", 1)[1])
        assert json.loads(query["runs"][0]) == [folds[1], folds[2]]  # in fold order
        assert json.loads(query["experiments"][0]) == [experiment]
    assert json.loads(
        parse_qs(unquote(addresses["fold curves"]).split("?", 1)[1])["metric"][0]
    ) == ("test_accuracy")
    names = {MlflowClient(uri).get_run(run).info.run_name for run in folds.values()}
    assert names == {"fold-01", "fold-02"}


def test_ui_serves_the_store_it_names(local_store, tmp_path):
    import sys
    import urllib.request
    from pathlib import Path

    from conftest import free_port, serving

    uri, parent, _ = local_store
    port = free_port()
    genreflow = Path(sys.executable).with_name("genreflow")
    command = [str(genreflow), "ui", "--tracking-uri", uri, "--port", str(port)]
    # mlflow ui took 55 s to answer beside other work here (load 15): the server fixture's 240 s.
    with serving(command, "/health", tmp_path / "ui.log", port=port, timeout=240) as url:
        with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/runs/get?run_id={parent}") as r:
            assert json.load(r)["run"]["info"]["run_name"] == "demo-run"
    log = (tmp_path / "ui.log").read_text()
    assert f"MLflow parent run: {url}/#/experiments/" in log


def test_ui_without_a_database_says_so(tmp_path, capsys):
    from genreflow.cli import main

    uri = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    assert main(["ui", "--tracking-uri", uri, "--no-serve"]) == 2
    assert "no MLflow database there yet (make run writes one)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_a_fold_file_changed_in_the_artifact_store_is_not_reused(
    mlflow_server, tmp_path, inputs, capsys
):
    client = MlflowClient(mlflow_server)
    calls = []
    first = start_pipeline_run(mlflow_server, "test-reuse-sha", pipeline_run_id="kfp-sha-1")
    _tracked(mlflow_server, first, tmp_path / "a", 1, _reuse_trainer(tmp_path / "a", calls), inputs)
    (original,) = _runs_under(client, first)
    assert (
        original.data.tags["genreflow.sha256.head.pth"]
        == hashlib.sha256((tmp_path / "a" / "fold1" / "head.pth").read_bytes()).hexdigest()
    )

    # Someone with write access to the artifact store swaps the checkpoint.
    swapped = tmp_path / "swapped" / "head.pth"
    swapped.parent.mkdir()
    torch.save({"weight": torch.full((2, 2), 666.0)}, swapped)
    client.log_artifact(original.info.run_id, str(swapped))

    second = start_pipeline_run(mlflow_server, "test-reuse-sha", pipeline_run_id="kfp-sha-2")
    _tracked(
        mlflow_server, second, tmp_path / "b", 1, _reuse_trainer(tmp_path / "b", calls), inputs
    )
    assert len(calls) == 2  # trained again rather than trusting the swapped file
    said = capsys.readouterr().out
    assert f"cannot reuse run {original.info.run_id}" in said
    assert "artifact head.pth has sha256" in said and "not trusted" in said
    (fresh,) = _runs_under(client, second)
    assert "reused" not in fresh.data.tags
    assert torch.load(tmp_path / "b" / "fold1" / "head.pth")["weight"][0, 0] == 1.0


def test_only_fold_runs_that_genreflow_logged_are_reused(mlflow_server, tmp_path, inputs):
    client = MlflowClient(mlflow_server)
    calls = []
    first = start_pipeline_run(mlflow_server, "test-reuse-own", pipeline_run_id="kfp-own-1")
    _tracked(mlflow_server, first, tmp_path / "a", 1, _reuse_trainer(tmp_path / "a", calls), inputs)
    (original,) = _runs_under(client, first)
    # Look-alike runs made by another client in the same experiment: the right key, the
    # "logged" and role tags, checksums that match their files, but not under a pipeline's
    # parent run (none, or an ordinary run); the pipeline's run itself taken out of the way.
    tags = {k: v for k, v in original.data.tags.items() if k.startswith("genreflow.")}
    client.delete_tag(original.info.run_id, "genreflow.logged")
    experiment = original.info.experiment_id
    ordinary = client.create_run(experiment).info.run_id
    for parent in ({}, {"mlflow.parentRunId": ordinary}):
        forged = client.create_run(experiment, tags={**tags, **parent}).info.run_id
        for path in sorted((tmp_path / "a" / "fold1").iterdir()):
            client.log_artifact(forged, str(path))

    second = start_pipeline_run(mlflow_server, "test-reuse-own", pipeline_run_id="kfp-own-2")
    _tracked(
        mlflow_server, second, tmp_path / "b", 1, _reuse_trainer(tmp_path / "b", calls), inputs
    )
    assert len(calls) == 2
    assert "reused" not in _runs_under(client, second)[0].data.tags
