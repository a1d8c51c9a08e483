"""Each KFP component on its own, called through `.python_func` with real artifacts in a
temporary folder: the thin layer between a pipeline task and the library, without the DAG.

The steps chain as in the pipeline (download -> pack -> embed -> a head, and a fine-tuned
fold -> aggregate) on a tiny synthetic set (2 clips of 1 s per genre), with tracking off;
the MLflow steps (start_run, close_run) run against a sqlite tracking store.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import pytest
import torch
from conftest import start_run_arguments
from kfp import dsl
from killable_child import start_held

from genreflow.components.aggregate import aggregate
from genreflow.components.close_run import close_run
from genreflow.components.download import download
from genreflow.components.embed import embed
from genreflow.components.pack import pack
from genreflow.components.start_run import start_run
from genreflow.components.train import train
from genreflow.components.train_head import train_head
from genreflow.data.genres import GENRES
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.recipe import HeadConfig, TrainConfig, defaults
from genreflow.runtime import resolve_precision

NO_TRACKING = dict(tracking_uri="", parent_run_id="", reuse_folds=True)


def _artifact(kind, folder, name):
    return kind(uri=str(folder / name))


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """download, pack and embed, each through its component; their output artifacts."""
    root = tmp_path_factory.mktemp("components")
    archive, sha256 = make_synthetic_gtzan(root / "source", clips_per_genre=2, seconds=1.0)
    dataset = _artifact(dsl.Dataset, root, "dataset")
    download.python_func(
        source=archive.as_uri(), sha256=sha256, md5="", cache_epoch="", dataset=dataset
    )
    features = _artifact(dsl.Dataset, root, "features.h5")
    pack.python_func(dataset=dataset, clip_seconds=1.0, cache_epoch="", features=features)
    embeddings = _artifact(dsl.Dataset, root, "embeddings")
    embed.python_func(
        features=features,
        pretrained="",
        seed=0,
        precision="auto",
        cache_epoch="",
        embeddings=embeddings,
    )
    return {"root": root, "dataset": dataset, "features": features, "embeddings": embeddings}


def test_download_pack_and_embed(steps):
    assert steps["dataset"].metadata["source"].startswith("file://")
    assert steps["features"].metadata["clips"] == 2 * len(GENRES)
    assert steps["features"].metadata["skipped"] == []
    assert {"embeddings.h5", "base.pth"} <= {
        p.name for p in (steps["root"] / "embeddings").iterdir()
    }
    # The pipeline's precision reaches the embed step: auto, resolved for this machine.
    with h5py.File(steps["root"] / "embeddings" / "embeddings.h5", "r") as hf:
        made_in = hf.attrs["precision"]
    assert made_in == resolve_precision("auto", torch.device("cpu"))


def test_train_head_then_aggregate_the_frozen_base(steps):
    root, head = steps["root"], defaults(HeadConfig)
    model, metrics = _artifact(dsl.Model, root, "head1"), _artifact(dsl.Metrics, root, "m1")
    recipe = {**head, "iterations": 20, "eval_every": 10}
    del recipe["mixup_alpha"]  # not a pipeline parameter
    train_head.python_func(
        embeddings=steps["embeddings"],
        fold=1,
        protocol="cv10",
        selection="validation",
        seed=0,
        expected_folds=[1],
        min_folds=0,
        model=model,
        metrics=metrics,
        **recipe,
        **NO_TRACKING,
    )
    summary = json.loads((root / "head1" / "summary.json").read_text())
    assert summary["path"] == "frozen-base" and summary["config"]["weight_decay"] == 1.0
    assert model.metadata == {
        "fold": 1,
        "test_accuracy": summary["final_accuracy"],
        "path": "frozen-base",
        "protocol": "cv10",
    }
    assert metrics.metadata == {"test_accuracy": summary["final_accuracy"]}

    results = _artifact(dsl.Dataset, root, "results")
    report, scores = _artifact(dsl.HTML, root, "report.html"), _artifact(dsl.Metrics, root, "s")
    confusion = _artifact(dsl.ClassificationMetrics, root, "confusion")
    where = aggregate.python_func(
        folds=[model],
        expected_folds=[1],
        min_folds=0,  # every expected fold
        clip_seconds=1.0,
        tracking_uri="",
        parent_run_id="",
        registered_model="",
        register_anyway=False,
        results=results,
        report=report,
        metrics=scores,
        confusion=confusion,
        embeddings=steps["embeddings"],
    )
    assert where == results.uri
    assert "<html" in (root / "report.html").read_text()
    assert scores.metadata["fold_01_accuracy"] == summary["final_accuracy"]
    assert confusion.metadata["confusionMatrix"]["annotationSpecs"][0]["displayName"] == "blues"


def test_a_fold_that_fails_for_good_is_recorded_when_min_folds_allows(steps, monkeypatch):
    root = steps["root"]
    monkeypatch.setattr("genreflow.steps.fold.FOLD_RETRY_FIRST_DELAY_SECONDS", 0.0)
    model, metrics = _artifact(dsl.Model, root, "bad"), _artifact(dsl.Metrics, root, "mb")
    arguments = dict(
        embeddings=steps["embeddings"],
        fold=1,
        protocol="cv10",
        selection="validation",
        iterations=0,  # refused by the library: a failure of the fold, not of the step
        batch_size=0,
        lr=1e-3,
        weight_decay=1.0,
        mixup=False,
        eval_every=10,
        seed=0,
        model=model,
        metrics=metrics,
        **NO_TRACKING,
    )
    with pytest.raises(Exception, match="iterations must be a positive integer"):
        train_head.python_func(expected_folds=[1, 2], min_folds=0, **arguments)
    train_head.python_func(expected_folds=[1, 2], min_folds=1, **arguments)
    assert model.metadata["fold"] == 1 and "iterations" in model.metadata["failed"]
    assert metrics.metadata == {}
    assert json.loads((root / "bad" / "failed.json").read_text())["fold"] == 1


def test_train_fine_tunes_a_fold(steps):
    root, tune = steps["root"], defaults(TrainConfig)
    model, metrics = _artifact(dsl.Model, root, "fold1"), _artifact(dsl.Metrics, root, "mt")
    train.python_func(
        features=steps["features"],
        fold=1,
        protocol="cv10",
        selection="validation",
        pretrained="",
        iterations=1,
        batch_size=2,
        lr=tune["lr"],
        mixup=tune["mixup"],
        eval_every=1,
        seed=0,
        precision="fp32",
        expected_folds=[1],
        min_folds=0,
        work_root="",
        pipeline_root=str(root / "pipeline-root"),
        model=model,
        metrics=metrics,
        **NO_TRACKING,
    )
    summary = json.loads((root / "fold1" / "summary.json").read_text())
    assert summary["path"] == "fine-tune" and summary["precision"] == "fp32"
    assert (root / "fold1" / "best.pth").is_file()
    assert model.metadata["path"] == "fine-tune"
    assert metrics.metadata == {"test_accuracy": summary["final_accuracy"]}
    # The fold trained in the pipeline root's work folder, named by its identity.
    (work,) = (root / "pipeline-root" / "genreflow-work" / "folds").glob("fold-01-*")
    assert json.loads((work / "summary.json").read_text()) == summary


TRAIN_SCRIPT = """
import json, sys
from kfp import dsl
from genreflow.components.train import train
args = json.loads(sys.argv[1])
model = dsl.Model(name="model", uri=args.pop("model"), metadata={})
metrics = dsl.Metrics(name="metrics", uri=args.pop("metrics"), metadata={})
features = dsl.Dataset(name="features", uri=args.pop("features"), metadata={})
train.python_func(features=features, model=model, metrics=metrics, **args)
"""


def test_both_branches_take_log_mel_features(steps, tmp_path):
    """pack with the pipeline's default representation, then each branch's first step on
    its output: the frozen base's embeddings match the waveform file's, and a fine-tune
    fold trains on it."""
    import numpy as np

    from genreflow.embedding import read_embeddings

    features = _artifact(dsl.Dataset, tmp_path, "features.h5")
    pack.python_func(
        dataset=steps["dataset"],
        clip_seconds=1.0,
        cache_epoch="",
        features=features,
        representation="logmel",
    )
    assert features.metadata["representation"] == "logmel"
    embeddings = _artifact(dsl.Dataset, tmp_path, "embeddings")
    embed.python_func(
        features=features,
        pretrained="",
        seed=0,
        precision="fp32",
        cache_epoch="",
        embeddings=embeddings,
    )
    ours = read_embeddings(tmp_path / "embeddings" / "embeddings.h5").embedding
    # The waveform file's embeddings in fp32 too: what differs is the float16 log-mel.
    reference = _artifact(dsl.Dataset, tmp_path, "waveform-embeddings")
    embed.python_func(
        features=steps["features"], pretrained="", seed=0, precision="fp32", cache_epoch="",
        embeddings=reference,
    )  # fmt: skip
    waveform = read_embeddings(tmp_path / "waveform-embeddings" / "embeddings.h5").embedding
    np.testing.assert_allclose(ours, waveform, rtol=0, atol=1e-4 * np.abs(waveform).max())

    tune = defaults(TrainConfig)
    model, metrics = _artifact(dsl.Model, tmp_path, "fold1"), _artifact(dsl.Metrics, tmp_path, "m")
    train.python_func(
        features=features, fold=1, protocol="cv10", selection="validation", pretrained="",
        iterations=1, batch_size=2, lr=tune["lr"], mixup=tune["mixup"], eval_every=1,
        seed=0, precision="fp32", expected_folds=[1], min_folds=0, work_root="",
        pipeline_root=str(tmp_path / "pipeline-root"), model=model, metrics=metrics,
        **NO_TRACKING,
    )  # fmt: skip
    summary = json.loads((tmp_path / "fold1" / "summary.json").read_text())
    assert summary["path"] == "fine-tune" and summary["features"]["representation"] == "logmel"


@pytest.mark.parametrize("where", ["folder", "gs"])
def test_a_killed_fold_step_resumes_from_its_work_folder(
    where, steps, tmp_path, request, monkeypatch
):
    """A pod lost mid-fold (SIGKILL after its first checkpoint): the step started again
    resumes from the work folder, and ends with the weights and metrics of a run that was
    never interrupted (on a CPU, bit for bit). The work folder is a local folder (kfp.local)
    or a gs:// prefix in the emulator, and then the restarted step runs as on another node:
    a cache of its own, nothing but the bucket in common with the killed one."""
    import os
    import signal
    import subprocess
    import sys
    import uuid

    import torch

    from genreflow import storage

    if where == "gs":  # for the steps and for this process, which lists the bucket
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", request.getfixturevalue("emulator"))
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "genreflow-test")
        bucket = f"genreflow-{uuid.uuid4().hex[:12]}"
        storage.gcs_client().create_bucket(bucket)
        work_root, other_work = f"gs://{bucket}/work", f"gs://{bucket}/other-work"

        def checkpoints() -> list[str]:
            blobs = storage.gcs_client().list_blobs(bucket, prefix="work/folds/")
            return [b.name for b in blobs if b.name.endswith("/resume.pt")]
    else:
        work_root, other_work = str(tmp_path / "work"), str(tmp_path / "other-work")

        def checkpoints() -> list[str]:
            return [str(p) for p in Path(work_root).glob("folds/*/resume.pt")]

    def arguments(name: str, work_root: str) -> dict:
        return dict(
            features=steps["features"].path,
            model=str(tmp_path / name / "model"),
            metrics=str(tmp_path / name / "metrics"),
            fold=1, protocol="cv10", selection="validation", pretrained="", iterations=4,
            batch_size=2, lr=1e-3, mixup=False, eval_every=2, seed=0, precision="fp32",
            expected_folds=[1], min_folds=0, work_root=work_root, pipeline_root="",
            **NO_TRACKING,
        )  # fmt: skip

    def step(name: str, work_root: str) -> str:
        command = [sys.executable, "-c", TRAIN_SCRIPT, json.dumps(arguments(name, work_root))]
        node = {**os.environ, "GENREFLOW_CACHE": str(tmp_path / name / "node-cache")}
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=node)
        _, err = process.communicate(timeout=600)
        return err

    # The killed step holds once its first resume state is in the work folder (written
    # there, or its upload to gs:// done) until the kill: the kill lands mid-fold, never
    # after the fold ended (as a kill after polling the folder could on a busy machine).
    argv = ["-c", TRAIN_SCRIPT, json.dumps(arguments("killed", work_root))]
    node = {**os.environ, "GENREFLOW_CACHE": str(tmp_path / "killed" / "node-cache")}
    committed = {
        "folder": ("genreflow.resume:save", "*"),
        "gs": ("genreflow.storage.outputs:OutputFolder.publish_file", "resume.pt"),
    }
    target, named = committed[where]
    with (tmp_path / "killed.log").open("w") as log:
        killed = start_held(target, argv, named=named, env=node, stderr=log)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert len(checkpoints()) == 1
    assert not (tmp_path / "killed" / "model" / "summary.json").exists()
    err = step("restarted", work_root)
    assert "fold 1: resuming from iteration 2" in err, err
    assert (tmp_path / "restarted" / "model" / "summary.json").is_file(), err
    step("uninterrupted", other_work)

    resumed, whole = tmp_path / "restarted" / "model", tmp_path / "uninterrupted" / "model"
    assert (resumed / "predictions.csv").read_text() == (whole / "predictions.csv").read_text()

    def curve(folder: Path) -> list[dict]:  # all but the wall time
        rows = list(csv.DictReader((folder / "metrics.csv").open(newline="")))
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert curve(resumed) == curve(whole) and len(curve(whole)) == 2
    a = torch.load(resumed / "best.pth", weights_only=True)["model"]
    b = torch.load(whole / "best.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_start_and_close_the_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    head, tune = defaults(HeadConfig), defaults(TrainConfig)
    common = start_run_arguments(experiment="test-components", source="file:///genres.tar.gz")
    off = _artifact(dsl.Markdown, tmp_path, "off.md")
    assert start_run.python_func(tracking_uri="", mlflow_run=off, **common) == ""
    assert "tracking was off" in (tmp_path / "off.md").read_text()

    markdown = _artifact(dsl.Markdown, tmp_path, "run.md")
    run_id = start_run.python_func(tracking_uri=uri, mlflow_run=markdown, **common)
    assert run_id in (tmp_path / "run.md").read_text()
    run = MlflowClient(uri).get_run(run_id)
    # Where to look: the parent and the runs table, in the UI's classic view.
    experiment = run.info.experiment_id
    shown = (tmp_path / "run.md").read_text()
    assert f"/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning" in shown
    assert f"/#/experiments/{experiment}?workflowType=machine_learning" in shown
    # A frozen-base run logs the head's recipe, not the fine-tune's it does not use; the
    # precision serves both (the embed step computes in it).
    assert run.data.params["head_iterations"] == str(head["iterations"])
    assert "iterations" not in run.data.params and "lr" not in run.data.params
    assert run.data.params["precision"] == tune["precision"]
    assert run.data.tags["path"] == "frozen-base" and run.info.status == "RUNNING"

    status = dsl.PipelineTaskFinalStatus(
        state="SUCCEEDED",
        pipeline_job_resource_name="",
        pipeline_task_name="",
        error_code=None,
        error_message=None,
    )
    close_run.python_func(tracking_uri=uri, pipeline_run_id="kfp-run-1", status=status)
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    close_run.python_func(tracking_uri="", pipeline_run_id="kfp-run-1", status=status)
