"""The whole DAG, for real, through kfp.local, against a real MLflow tracking server.

A tiny synthetic set (4 clips per genre, 2 s) keeps it to minutes: every step runs its real
code (archive over file://, decoding, HDF5, a random Cnn14 embedding every clip, ten head
trainings, the report, the MLflow runs and the registered fold ensemble). The fault-filtered
protocol runs on a set with the real lists' file names (1 s clips).
"""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from genreflow.cli import main
from genreflow.data.genres import GENRES
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.pipelines.local import run_local

# One xdist group for the file: its tests share the demo run (module fixtures) and follow
# each other; the filtered and fine-tune tests add a group of their own to it.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]

OVERRIDES = {"clip_seconds": 2.0}
# The head's recipe (genreflow.recipe.HeadConfig) under the pipeline's head_* names.
HEAD_OVERRIDES = {"head_iterations": 200, "head_eval_every": 100}
EXPERIMENT = "test-pipeline"
MODEL_NAME = "test-genreflow-ensemble"


def run_demo(workspace, source, mlflow_server, cache=True, **overrides):
    """The demo profile on the test's source and MLflow server, OVERRIDES (and, with the
    frozen base, HEAD_OVERRIDES) then `overrides`."""
    uri, sha256 = source
    head = HEAD_OVERRIDES if overrides.get("freeze_base", True) else {}
    return run_local(
        workspace,
        profile="demo",
        source=uri,
        sha256=sha256,
        tracking_uri=mlflow_server,
        cache=cache,
        overrides={**OVERRIDES, **head, **overrides},
    )


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
    return run_demo(
        workspace, source, mlflow_server, experiment=EXPERIMENT, registered_model=MODEL_NAME
    )


def test_report(demo_run):
    assert demo_run["usable_folds"] == list(range(1, 11))
    assert demo_run["partial"] is False
    assert demo_run["n_clips"] == 40  # every clip predicted exactly once
    report_json = json.loads(open(f"{demo_run['results_dir']}/report.json").read())
    assert report_json["accuracy"]["mean"] == demo_run["accuracy"]["mean"]


def _parents(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`genreflow.role` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
    )


def _children(client, parent):
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )


def test_mlflow_parent_and_ten_folds(demo_run, source, mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = _parents(client, EXPERIMENT)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == demo_run["mlflow_run_id"]
    assert parent.info.status == "FINISHED"  # closed by the exit handler
    assert parent.data.tags["genreflow.final_state"] == "SUCCEEDED"
    assert parent.data.tags["kfp.pipeline_run_id"]
    assert parent.data.tags["protocol"] == "cv10"
    assert parent.data.tags["selection"] == "validation"
    assert parent.data.tags["split.sha256"]
    assert "ghcr.io/genreflow/genreflow:" in parent.data.tags["images"]
    assert parent.data.tags["profile"] == "demo"
    assert parent.data.tags["freeze_base"] == "true"
    assert parent.data.tags["git_commit"]
    assert parent.data.tags["data.sha256"] == source[1]
    assert parent.data.params["head_iterations"] == "200"
    metrics = parent.data.metrics
    assert metrics["accuracy_mean"] == pytest.approx(demo_run["accuracy"]["mean"])
    assert metrics["accuracy_ci95_low"] <= metrics["accuracy_mean"] <= metrics["accuracy_ci95_high"]
    assert parent.data.params["seed"] == "0"
    for tag in ("git_commit", "genreflow_version", "version.torch", "version.mlflow"):
        assert parent.data.tags[tag]
    assert {f"fold_{k:02d}_accuracy" for k in range(1, 11)} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/report.html", "results/confusion.csv", "results/confusion.png"} <= artifacts

    children = _children(client, parent)
    assert experiment.experiment_id == parent.info.experiment_id
    assert sorted(int(c.data.tags["fold"]) for c in children) == list(range(1, 11))
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["path"] == "frozen-base"
        assert "reused" not in child.data.tags
        fold = int(child.data.tags["fold"])
        assert child.data.metrics["final_accuracy"] == pytest.approx(
            metrics[f"fold_{fold:02d}_accuracy"]
        )
        assert child.info.run_name == f"fold-{fold:02d}"
        history = client.get_metric_history(child.info.run_id, "test_accuracy")
        assert [m.step for m in history] == [100, 200]  # sent live, each point once
        (given,) = client.get_run(child.info.run_id).inputs.dataset_inputs  # its embeddings
        assert json.loads(given.dataset.profile)["sha256"].startswith(given.dataset.digest)


def _wav(waveform, rate, channels=1) -> bytes:
    import io

    import soundfile

    buffer = io.BytesIO()
    frames = np.stack([waveform] * channels, axis=1) if channels > 1 else waveform
    soundfile.write(buffer, frames, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def test_registered_ensemble_is_tagged_and_predicts_audio(
    demo_run, source, mlflow_server, workspace, monkeypatch, capsys
):
    import mlflow.artifacts
    import mlflow.pyfunc
    import pandas as pd
    import soxr

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert client.get_model_version_by_alias(MODEL_NAME, "candidate").version == version.version
    parent = client.get_run(demo_run["mlflow_run_id"])
    assert version.run_id == parent.info.run_id
    tags = version.tags
    assert tags["protocol"] == "cv10" and tags["selection"] == "validation"
    assert tags["partial"] == "false" and tags["folds"] == "1,2,3,4,5,6,7,8,9,10"
    assert tags["accuracy_mean"] == f"{demo_run['accuracy']['mean']:.4f}"
    low, high = (
        demo_run["accuracy"]["corrected_ci"]["low"],
        demo_run["accuracy"]["corrected_ci"]["high"],
    )
    assert tags["accuracy_ci95"] == f"[{low:.4f}, {high:.4f}]"
    assert tags["accuracy_ci95_method"].startswith("corrected resampled t interval")
    assert tags["git_commit"] == parent.data.tags["git_commit"]
    assert tags["data.sha256"] == source[1]
    assert tags["split.sha256"] == parent.data.tags["split.sha256"]
    assert tags["genreflow.parent_run"] == parent.info.run_id
    assert version.description.startswith("Fold ensemble of 10 folds (10-fold cross-validation")
    # A LoggedModel of the parent run (MLflow 3's Models tab), logged from code.
    model_id = version.source.removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == parent.info.run_id

    uri = f"models:/{MODEL_NAME}@candidate"
    model = mlflow.pyfunc.load_model(uri)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["audio"]
    # Base64 text, which genreflow.serving checks row by row (MLflow's binary is lenient).
    assert model.metadata.get_input_schema().inputs[0].type.name == "string"
    assert model.metadata.get_output_schema().input_names() == ["genre", *GENRES]
    local = mlflow.artifacts.download_artifacts(uri)
    requirements = open(f"{local}/requirements.txt").read()
    assert "genreflow" not in requirements and "torch==" in requirements
    assert (Path(local) / "code" / "genreflow" / "serving.py").is_file()
    # Each checkpoint stored once: the heads are read from the fold runs, the frozen base
    # (which no fold run holds) is the one checkpoint in the model.
    stored = sorted(p.name for p in Path(local, "artifacts").iterdir())
    assert stored == ["base.pth"]
    members = model.model_config["members"]
    assert [m["uri"].split("/")[-1] for m in members] == ["head.pth"] * 10

    # A 4 s file at 32 kHz (two of the model's 2 s clips) and a 1 s file at 44.1 kHz stereo.
    rng = np.random.default_rng(0)
    clips = rng.uniform(-0.1, 0.1, (2, 64000)).astype(np.float32)
    short = rng.uniform(-0.1, 0.1, 44100).astype(np.float32)
    table = model.predict(
        pd.DataFrame({"audio": [_wav(clips.reshape(-1), 32000), _wav(short, 44100, 2)]})
    )
    assert list(table.columns) == ["genre", *GENRES]
    np.testing.assert_allclose(table[list(GENRES)].sum(axis=1), 1.0, rtol=1e-5)
    # The long file is the mean of its two clips; the short one is resampled and padded.
    ensemble = model.unwrap_python_model().ensemble
    padded = np.zeros((1, 64000), dtype=np.float32)
    resampled = soxr.resample(short, 44100, 32000, quality="HQ")
    padded[0, : len(resampled)] = resampled
    with torch.inference_mode():
        by_clip = ensemble(torch.from_numpy(np.concatenate([clips, padded]))).numpy()
    np.testing.assert_allclose(table[list(GENRES)].iloc[0], by_clip[:2].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(table[list(GENRES)].iloc[1], by_clip[2], atol=1e-5)
    assert list(table["genre"]) == [
        GENRES[int(i)] for i in table[list(GENRES)].to_numpy().argmax(1)
    ]

    # `genreflow predict --model` reads the same model, the same way.
    song = workspace / "song.wav"
    song.write_bytes(_wav(clips.reshape(-1), 32000))
    assert main(["predict", "--model", uri, str(song), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(
        list(result["probabilities"].values()), table[list(GENRES)].iloc[0], atol=1e-6
    )


def test_mlflow_models_serve_classifies_audio_files(
    demo_run, source, mlflow_server, tmp_path, monkeypatch
):
    """`mlflow models serve` on the registered model: files as base64 in, genres out; a row
    that is no audio is a 400 naming it, and the server goes on serving."""
    import base64
    import os
    import sys
    import tarfile
    import urllib.error
    import urllib.request

    from conftest import free_port, serving

    with tarfile.open(source[0].removeprefix("file://")) as archive:
        blues, metal = (
            archive.extractfile(f"genres/{g}/{g}.00000.au").read() for g in ("blues", "metal")
        )
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "blues.au").write_bytes(blues)
    (clips / "metal.au").write_bytes(metal)

    def post(url, body):
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "models", "serve", "-m", f"models:/{MODEL_NAME}@candidate"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    # The server runs uvicorn from PATH: this environment's, as with an activated venv.
    path = f"{mlflow.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    with serving(command, "/ping", tmp_path / "serve.log", port=port, timeout=180, env=env) as url:
        records = {"dataframe_records": [{"audio": b64(blues)}, {"audio": b64(metal)}]}
        status, answer = post(url, records)
        assert status == 200, answer
        rows = answer["predictions"]
        assert [row["genre"] for row in rows] == ["blues", "metal"]
        for row in rows:
            assert sum(row[g] for g in GENRES) == pytest.approx(1.0, abs=1e-5)

        # Row 1 is no audio, row 2 is empty: both named in one error.
        rows_in = [[b64(blues)], [b64(b"RIFF not a wave")], [""]]
        corrupt = {"dataframe_split": {"columns": ["audio"], "data": rows_in}}
        status, answer = post(url, corrupt)
        assert status == 400
        message = answer["message"]
        assert "row 1: unknown or unreadable format" in message
        assert "not a recognised audio format" in message
        assert "row 2: empty file (0 bytes)" in message
        assert "row 0" not in message

        status, again = post(
            url, {"dataframe_split": {"columns": ["audio"], "data": [[b64(metal)]]}}
        )
        assert status == 200 and again["predictions"] == rows[1:]

    # The same answers from `genreflow predict --model` on the same files.
    from genreflow.inference import predict_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    local = predict_model(
        f"models:/{MODEL_NAME}@candidate", [clips / n for n in ("blues.au", "metal.au")]
    )
    for mine, served in zip(local, rows, strict=True):
        assert mine["genre"] == served["genre"]
        np.testing.assert_allclose(
            [mine["probabilities"][g] for g in GENRES], [served[g] for g in GENRES], atol=1e-6
        )


def test_failing_fold_is_retried_then_fails_the_parent(
    demo_run, source, workspace, mlflow_server, monkeypatch, capfd
):
    from genreflow.pipelines import cv

    monkeypatch.setattr(cv, "FOLD_RETRY_BACKOFF", "1s")
    # Fold 11 holds no clips: the fold step fails for real, every time (bad input is not
    # retried in-step; KFP retries the task); min_folds left at 0, every fold: no partial
    # result.
    # Download, pack and embed come from the KFP cache of the run above; fold 1 from
    # MLflow (the same fold, reused).
    with pytest.raises(RuntimeError, match="FAILURE"):
        run_demo(workspace, source, mlflow_server, folds=[1, 11], experiment="test-fail")
    logs = capfd.readouterr()
    text = re.sub(r"\x1b\[[0-9;]*m", "", logs.out + logs.err)  # kfp.local colours names
    assert text.count("Executing task 'train-head'") == 1 + 1 + cv.FOLD_RETRIES
    assert "fold must be one of 1..10, got 11" in text
    assert "Executing task 'close-run'" in text

    client = MlflowClient(mlflow_server)
    (parent,) = _parents(client, "test-fail")
    assert parent.info.status == "FAILED"  # the exit handler saw the pipeline fail
    assert parent.data.tags["genreflow.final_state"] == "FAILED"
    status = {c.data.tags["fold"]: c.info.status for c in _children(client, parent)}
    assert status == {"1": "FINISHED", "11": "FAILED"}  # one run per fold, retries included


def test_rerun_reuses_the_ten_folds_under_its_new_parent(
    demo_run, source, workspace, mlflow_server
):
    rerun = run_demo(workspace, source, mlflow_server, experiment=EXPERIMENT, registered_model="")
    assert rerun["accuracy"] == demo_run["accuracy"]
    client = MlflowClient(mlflow_server)
    first, second = _parents(client, EXPERIMENT)[:2]
    assert second.info.run_id == rerun["mlflow_run_id"] != first.info.run_id
    originals = {c.data.tags["fold"]: c for c in _children(client, first)}
    reused = {c.data.tags["fold"]: c for c in _children(client, second)}
    assert sorted(reused, key=int) == [str(k) for k in range(1, 11)]
    for fold, child in reused.items():
        assert child.info.status == "FINISHED"
        assert child.data.tags["reused"] == "true"
        assert child.data.tags["genreflow.reused_from"] == originals[fold].info.run_id
        assert (
            child.data.metrics["final_accuracy"] == originals[fold].data.metrics["final_accuracy"]
        )


def test_same_seed_same_metrics_when_everything_is_recomputed(
    demo_run, source, tmp_path, mlflow_server
):
    """Reproducibility on CPU: a fresh workspace, no KFP cache, no fold reuse."""
    again = run_demo(
        tmp_path, source, mlflow_server, cache=False, experiment="test-repeat", reuse_folds=False
    )
    assert again["accuracy"] == demo_run["accuracy"]

    def results(report):  # each fold's figures, without where its folder was
        return [{k: v for k, v in row.items() if k != "dir"} for row in report["folds"]]

    assert results(again) == results(demo_run)
    assert again["confusion"] == demo_run["confusion"]
    client = MlflowClient(mlflow_server)
    (parent,) = _parents(client, "test-repeat")
    assert all("reused" not in c.data.tags for c in _children(client, parent))


def test_caller_mlflow_run_id_is_the_parent(
    demo_run, source, workspace, mlflow_server, monkeypatch
):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    caller = client.create_run(experiment, run_name="ci-job").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", caller)  # kfp.local's tasks inherit it
    report = run_demo(workspace, source, mlflow_server, experiment=EXPERIMENT, registered_model="")
    assert report["mlflow_run_id"] == caller
    parent = client.get_run(caller)
    assert parent.info.status == "RUNNING"  # the caller's run: the caller closes it
    assert parent.data.tags["genreflow.final_state"] == "SUCCEEDED"
    assert parent.data.metrics["accuracy_mean"] == pytest.approx(demo_run["accuracy"]["mean"])
    folds = sorted(int(c.data.tags["fold"]) for c in _children(client, parent))
    assert folds == list(range(1, 11))


@pytest.fixture(scope="module")
def filtered_source(tmp_path_factory):
    from genreflow.splits import filtered_lists

    lists = filtered_lists()
    listed = [f"{name}.au" for part in ("train", "valid", "test") for name in lists[part]]
    # Plus two clips in no list: excluded and counted.
    names = listed + ["blues.00100.au", "rock.00100.au"]
    archive, sha256 = make_synthetic_gtzan(
        tmp_path_factory.mktemp("filtered-source"), names=names, seconds=1.0, seed=5
    )
    return archive.as_uri(), sha256


@pytest.mark.xdist_group("filtered")  # its own source and run: beside the rest
def test_filtered_protocol_end_to_end(filtered_source, tmp_path, mlflow_server):
    report = run_demo(
        tmp_path,
        filtered_source,
        mlflow_server,
        clip_seconds=1.0,  # the source's clips
        folds=[1, 2, 3],
        protocol="filtered",
        experiment="test-filtered",
        registered_model="",
    )
    assert report["protocol"] == "filtered"
    assert report["split"]["test"] == 290
    assert report["split"]["excluded"] == 2
    assert report["usable_folds"] == [1, 2, 3]
    html = open(f"{report['results_dir']}/report.html").read()
    assert "fault-filtered split" in html.split("</h1>")[0]
    client = MlflowClient(mlflow_server)
    (parent,) = _parents(client, "test-filtered")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["protocol"] == "filtered"
    assert parent.data.metrics["accuracy_mean"] == pytest.approx(report["accuracy"]["mean"])
    children = _children(client, parent)
    assert sorted(int(c.data.tags["fold"]) for c in children) == [1, 2, 3]
    assert {c.data.tags["protocol"] for c in children} == {"filtered"}


def test_a_failed_fold_above_min_folds_gives_a_partial_result(
    demo_run, source, workspace, mlflow_server
):
    """kubeflow/pipelines#7330: one failed loop iteration fails the whole DAG before the
    aggregate. With min_folds below the number of folds the fold step records its failure
    instead, and the aggregate reports the usable folds, marked partial."""
    report = run_demo(
        workspace,
        source,
        mlflow_server,
        folds=[1, 2, 11],
        min_folds=2,
        experiment="test-partial",
        registered_model="test-partial-model",  # a partial result: not registered
    )
    assert report["partial"] is True
    assert report["usable_folds"] == [1, 2]
    (failed,) = report["failed_folds"]
    assert failed["fold"] == 11 and "fold must be one of 1..10, got 11" in failed["reason"]
    client = MlflowClient(mlflow_server)
    (parent,) = _parents(client, "test-partial")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["partial"] == "true"
    status = {c.data.tags["fold"]: c.info.status for c in _children(client, parent)}
    assert status == {"1": "FINISHED", "2": "FINISHED", "11": "FAILED"}
    # Logged on its run, but not registered: it was not asked for (register_anyway).
    assert client.search_model_versions("name = 'test-partial-model'") == []
    assert client.search_logged_models([parent.info.experiment_id])[0].source_run_id == (
        parent.info.run_id
    )


@pytest.mark.xdist_group("fine-tune")  # its own runs: beside the rest
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_fine_tune_branch_end_to_end(precision, source, tmp_path, mlflow_server):
    """The seed's own path, the whole Cnn14 fine-tuned, on a tiny recipe: `auto` is bf16
    autocast on a CPU with native bf16 (where it once failed at the end of every fold:
    bf16 probabilities that did not sum to 1), fp32 elsewhere."""
    from genreflow.runtime import resolve_precision

    experiment = f"test-fine-tune-{precision}"
    report = run_demo(
        tmp_path,
        source,
        mlflow_server,
        freeze_base=False,
        iterations=2,
        batch_size=2,
        eval_every=2,
        folds=[1, 2],
        precision=precision,
        experiment=experiment,
        registered_model="",
    )
    assert report["usable_folds"] == [1, 2] and report["partial"] is False
    assert report["n_clips"] == 8  # folds 1 and 2 hold 4 clips each
    expected = resolve_precision(precision, torch.device("cpu"))
    summaries = sorted(tmp_path.glob("kfp/*/for-loop-*/train/model/summary.json"))
    assert len(summaries) == 2
    for path in summaries:
        assert json.loads(path.read_text())["precision"] == expected
        with (path.parent / "predictions.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        sums = np.array([sum(float(row[g]) for g in GENRES) for row in rows])
        np.testing.assert_allclose(sums, 1.0, atol=1e-6)
    client = MlflowClient(mlflow_server)
    (parent,) = _parents(client, experiment)
    assert parent.info.status == "FINISHED"
    children = _children(client, parent)
    assert {c.data.tags["fold"]: c.info.status for c in children} == {
        "1": "FINISHED",
        "2": "FINISHED",
    }
