"""MLflow logging against a real tracking server started by the test suite."""

import csv
import json

import pytest
from mlflow.tracking import MlflowClient

from genreflow.data.genres import GENRES
from genreflow.tracking import (
    TrackingError,
    finish_pipeline_run,
    log_fold,
    start_pipeline_run,
)


def _fold_dir(path, fold, accuracy):
    path.mkdir()
    with open(path / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "train_loss", "heldout_accuracy", "seconds"])
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
    history = client.get_metric_history(children[1], "heldout_accuracy")
    assert [(m.step, m.value) for m in history] == [(10, 0.45), (20, 0.9)]
    logged = {a.path for a in client.list_artifacts(children[1])}
    assert logged == {"metrics.csv", "predictions.csv", "summary.json", "confusion.png"}


def test_unreachable_server_fails_clearly_and_keeps_outputs(tmp_path, monkeypatch):
    import genreflow.tracking

    monkeypatch.setattr(genreflow.tracking, "RETRY_FIRST_DELAY_SECONDS", 0.01)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    fold_dir = _fold_dir(tmp_path / "fold1", 1, 0.5)
    # Nothing listens on port 9 (discard) on loopback: every request is refused.
    with pytest.raises(TrackingError) as err:
        log_fold("http://127.0.0.1:9", "0" * 32, fold_dir)
    message = str(err.value)
    assert "logging fold 1" in message and str(fold_dir) in message
    assert (fold_dir / "summary.json").exists()
