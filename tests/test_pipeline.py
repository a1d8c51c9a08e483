"""The whole DAG, for real, through kfp.local, against a real MLflow tracking server.

A tiny synthetic set (4 clips per genre, 2 s) keeps it to minutes: every step runs its real
code (archive over file://, decoding, HDF5, a random Cnn14 embedding every clip, ten head
trainings, the report, the MLflow runs and the registered fold ensemble).
"""

import json
import re

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from genreflow.cli import main
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.pipelines.local import run_local

pytestmark = pytest.mark.slow

OVERRIDES = {"clip_seconds": 2.0, "iterations": 200, "eval_every": 100}
EXPERIMENT = "test-pipeline"
MODEL_NAME = "test-genreflow-ensemble"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    archive, sha256 = make_synthetic_gtzan(
        tmp_path_factory.mktemp("source"), clips_per_genre=4, seconds=2.0, seed=3
    )
    return archive.as_uri(), sha256


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def demo_run(source, workspace, mlflow_server):
    uri, sha256 = source
    return run_local(
        workspace,
        profile="demo",
        source=uri,
        sha256=sha256,
        tracking_uri=mlflow_server,
        overrides={**OVERRIDES, "experiment": EXPERIMENT, "registered_model": MODEL_NAME},
    )


def test_report(demo_run):
    assert demo_run["usable_folds"] == list(range(1, 11))
    assert demo_run["partial"] is False
    assert demo_run["n_clips"] == 40  # every clip predicted exactly once
    report_json = json.loads(open(f"{demo_run['results_dir']}/report.json").read())
    assert report_json["accuracy"]["mean"] == demo_run["accuracy"]["mean"]


def test_mlflow_parent_and_ten_folds(demo_run, source, mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`genreflow.role` = 'pipeline'"
    )
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["profile"] == "demo"
    assert parent.data.tags["freeze_base"] == "true"
    assert parent.data.tags["git_commit"]
    assert parent.data.tags["data.sha256"] == source[1]
    assert parent.data.params["iterations"] == "200"
    metrics = parent.data.metrics
    assert metrics["accuracy_mean"] == pytest.approx(demo_run["accuracy"]["mean"])
    assert metrics["accuracy_ci95_low"] <= metrics["accuracy_mean"] <= metrics["accuracy_ci95_high"]
    assert {f"fold_{k:02d}_accuracy" for k in range(1, 11)} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/report.html", "results/confusion.csv", "results/confusion.png"} <= artifacts

    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(int(c.data.tags["fold"]) for c in children) == list(range(1, 11))
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["path"] == "frozen-base"
        fold = int(child.data.tags["fold"])
        assert child.data.metrics["final_accuracy"] == pytest.approx(
            metrics[f"fold_{fold:02d}_accuracy"]
        )
        history = client.get_metric_history(child.info.run_id, "heldout_accuracy")
        assert [m.step for m in history] == [100, 200]


def test_registered_ensemble_predicts(demo_run, mlflow_server, workspace, monkeypatch, capsys):
    import mlflow.pyfunc
    import soundfile

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 1
    uri = f"models:/{MODEL_NAME}/{versions[0].version}"
    model = mlflow.pyfunc.load_model(uri)
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 64000)
    waveforms = np.random.default_rng(0).uniform(-0.1, 0.1, (3, 64000)).astype(np.float32)
    probabilities = model.predict(waveforms)
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    # `genreflow predict --model` cuts a file into the model's clips and averages them.
    song = workspace / "song.wav"
    soundfile.write(song, np.concatenate([waveforms[0], waveforms[1]]), 32000)
    assert main(["predict", "--model", uri, str(song), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    expected = probabilities[:2].mean(axis=0)
    np.testing.assert_allclose(list(result["probabilities"].values()), expected, atol=1e-4)


def test_failing_fold_is_retried_then_fails_the_run(
    demo_run, source, workspace, mlflow_server, monkeypatch, capfd
):
    from genreflow.pipelines import cv

    monkeypatch.setattr(cv, "FOLD_RETRY_BACKOFF", "1s")
    uri, sha256 = source
    # Fold 11 holds no clips: the fold step fails for real, every time. Download, pack
    # and embed come from the cache of the run above.
    with pytest.raises(RuntimeError, match="FAILURE"):
        run_local(
            workspace,
            profile="demo",
            source=uri,
            sha256=sha256,
            tracking_uri=mlflow_server,
            overrides={**OVERRIDES, "folds": [11], "min_folds": 1, "experiment": "test-fail"},
        )
    logs = capfd.readouterr()
    text = re.sub(r"\x1b\[[0-9;]*m", "", logs.out + logs.err)  # kfp.local colours names
    assert text.count("Executing task 'train-head'") == 1 + cv.FOLD_RETRIES
    assert "fold must be one of 1..10, got 11" in text
