"""Fold reuse trusts only what the pipeline recorded: an HMAC under GENREFLOW_REUSE_KEY over
the run, the fold's identity and its file digests (genreflow.tracking.fold_runs), checked
before any file is fetched. Against a real MLflow server (tests/conftest.py)."""

from __future__ import annotations

import csv
import json
import secrets

import pytest
import torch
from mlflow.tracking import MlflowClient

from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.steps.fold import fold_key, tracked_fold
from genreflow.tracking.fold_runs import REUSE_KEY_ENV, reuse_record
from genreflow.tracking.names import PIPELINE_ROLE, REUSE_RECORD_TAG, ROLE_TAG
from genreflow.tracking.runs import start_pipeline_run

SETTINGS = {"lr": 1e-3, "protocol": "cv10"}
KEY = secrets.token_hex(32)


@pytest.fixture(autouse=True)
def reuse_key(monkeypatch):
    monkeypatch.setenv(REUSE_KEY_ENV, KEY)


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "embeddings.h5"
    path.write_bytes(b"the fold's input")
    return [path]


def _fold_dir(path, weight: float):
    """A finished fold folder whose head.pth holds `weight` (a real, tiny checkpoint)."""
    path.mkdir(parents=True)
    with open(path / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows([["iteration", "test_accuracy"], [20, 0.7]])
    summary = {"fold": 1, "path": "frozen-base", "iterations": 20, "final_accuracy": 0.7}
    (path / "summary.json").write_text(json.dumps(summary))
    torch.save({"weight": torch.full((2, 2), weight)}, path / "head.pth")
    with open(path / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["audio_name", "fold", "genre", *GENRES])
        writer.writerow(["blues.00000.au", 1, "blues", *([0.1] * len(GENRES))])
    return path


class Trainer:
    """The fold's training: writes the genuine folder (head weight 1.0), counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, root):
        def train(on_evaluation=None):
            self.calls += 1
            _fold_dir(root / "fold1", 1.0)
            return json.loads((root / "fold1" / "summary.json").read_text())

        return train


def _tracked(server, experiment, name, root, train, inputs, settings=SETTINGS):
    parent = start_pipeline_run(server, experiment, pipeline_run_id=name)
    root.mkdir()
    tracked_fold(
        train(root),
        out=root / "fold1",
        fold=1,
        inputs=inputs,
        settings=settings,
        tracking_uri=server,
        parent_run_id=parent,
    )
    client = MlflowClient(server)
    experiment_id = client.get_run(parent).info.experiment_id
    (run,) = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    return run


def _head_weight(root) -> float:
    return float(torch.load(root / "fold1" / "head.pth", weights_only=True)["weight"][0, 0])


def test_a_genuine_run_is_reused(mlflow_server, tmp_path, inputs, capsys):
    train = Trainer()
    original = _tracked(mlflow_server, "reuse-genuine", "g-1", tmp_path / "a", train, inputs)
    tags = original.data.tags
    digests = {k.removeprefix("genreflow.sha256."): v for k, v in tags.items() if "sha256." in k}
    assert set(digests) == {"metrics.csv", "predictions.csv", "summary.json", "head.pth"}
    key = fold_key(inputs, {"fold": 1, **SETTINGS})
    assert tags[REUSE_RECORD_TAG] == reuse_record(KEY.encode(), original.info.run_id, key, digests)

    again = _tracked(mlflow_server, "reuse-genuine", "g-2", tmp_path / "b", train, inputs)
    assert train.calls == 1
    assert again.data.tags["genreflow.reused_from"] == original.info.run_id
    assert f"reused from MLflow run {original.info.run_id}" in capsys.readouterr().out
    assert _head_weight(tmp_path / "b") == 1.0


def _forge(server, experiment_id, inputs, folder, extra_tags=()):
    """What the issue saw adopted: a parent made by hand and tagged as a pipeline's, a child
    with the fold's tags and the sha256 of its own (poisoned) files."""
    client = MlflowClient(server)
    parent = client.create_run(experiment_id, tags={ROLE_TAG: PIPELINE_ROLE}).info.run_id
    from genreflow import storage

    tags = {
        "mlflow.parentRunId": parent,
        ROLE_TAG: "fold",
        "fold": "1",
        "genreflow.fold_key": fold_key(inputs, {"fold": 1, **SETTINGS}),
        "genreflow.logged": "true",
        **{f"genreflow.sha256.{p.name}": storage.sha256_of(p) for p in folder.iterdir()},
        **dict(extra_tags),
    }
    forged = client.create_run(experiment_id, tags=tags).info.run_id
    for path in sorted(folder.iterdir()):
        client.log_artifact(forged, str(path))
    client.set_terminated(forged)
    return forged


def test_a_forged_run_is_retrained(mlflow_server, tmp_path, inputs, capsys):
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("reuse-forged")
    poisoned = _fold_dir(tmp_path / "poisoned", 666.0)
    forged = _forge(mlflow_server, experiment_id, inputs, poisoned)

    train = Trainer()
    run = _tracked(mlflow_server, "reuse-forged", "f-1", tmp_path / "a", train, inputs)
    assert train.calls == 1  # trained, not adopted
    said = capsys.readouterr().out
    assert f"fold 1: not reused: cannot reuse run {forged}" in said
    assert "no valid record" in said
    assert "reused" not in run.data.tags and _head_weight(tmp_path / "a") == 1.0


def test_a_genuine_record_copied_onto_another_run_does_not_check(
    mlflow_server, tmp_path, inputs, capsys
):
    """The record names the run it was made for: copied with the genuine files' digests
    onto a run of the forger's, it is refused."""
    train = Trainer()
    genuine = _tracked(mlflow_server, "reuse-copied", "c-1", tmp_path / "a", train, inputs)
    client = MlflowClient(mlflow_server)
    client.delete_tag(genuine.info.run_id, "genreflow.logged")  # out of the way
    record = {REUSE_RECORD_TAG: genuine.data.tags[REUSE_RECORD_TAG]}
    forged = _forge(
        mlflow_server, genuine.info.experiment_id, inputs, tmp_path / "a" / "fold1", record
    )

    _tracked(mlflow_server, "reuse-copied", "c-2", tmp_path / "b", train, inputs)
    assert train.calls == 2
    assert f"cannot reuse run {forged}" in capsys.readouterr().out


def test_a_tampered_digest_is_refused_before_any_file_is_fetched(
    mlflow_server, tmp_path, inputs, capsys
):
    """A poisoned head.pth swapped into the genuine run's artifacts, its sha256 tag updated
    to match: refused on the record, not on a fetched file's checksum."""
    train = Trainer()
    genuine = _tracked(mlflow_server, "reuse-tampered", "t-1", tmp_path / "a", train, inputs)
    client = MlflowClient(mlflow_server)
    poisoned = _fold_dir(tmp_path / "poisoned", 666.0) / "head.pth"
    client.log_artifact(genuine.info.run_id, str(poisoned))
    from genreflow import storage

    client.set_tag(genuine.info.run_id, "genreflow.sha256.head.pth", storage.sha256_of(poisoned))

    _tracked(mlflow_server, "reuse-tampered", "t-2", tmp_path / "b", train, inputs)
    assert train.calls == 2
    said = capsys.readouterr().out
    assert f"not reused: cannot reuse run {genuine.info.run_id}" in said
    assert "no valid record" in said and "artifact head.pth has sha256" not in said
    assert _head_weight(tmp_path / "b") == 1.0


def test_a_record_is_for_one_fold_identity(mlflow_server, tmp_path, inputs, capsys):
    """A genuine run re-tagged with another fold's key (other settings) is not adopted for
    that fold: the key is inside the record."""
    train = Trainer()
    genuine = _tracked(mlflow_server, "reuse-rekeyed", "k-1", tmp_path / "a", train, inputs)
    other = {**SETTINGS, "lr": 1.0}
    MlflowClient(mlflow_server).set_tag(
        genuine.info.run_id, "genreflow.fold_key", fold_key(inputs, {"fold": 1, **other})
    )
    _tracked(mlflow_server, "reuse-rekeyed", "k-2", tmp_path / "b", train, inputs, other)
    assert train.calls == 2
    assert "no valid record" in capsys.readouterr().out


def test_without_a_key_nothing_is_reused_and_the_log_says_why(
    mlflow_server, tmp_path, inputs, capsys, monkeypatch
):
    monkeypatch.delenv(REUSE_KEY_ENV)
    train = Trainer()
    first = _tracked(mlflow_server, "reuse-keyless", "n-1", tmp_path / "a", train, inputs)
    assert REUSE_RECORD_TAG not in first.data.tags  # nothing to sign with
    _tracked(mlflow_server, "reuse-keyless", "n-2", tmp_path / "b", train, inputs)
    assert train.calls == 2
    assert f"fold 1: not reused: {REUSE_KEY_ENV} is not set" in capsys.readouterr().out

    # Signed from now on: an unsigned run is still not reused once a key is set.
    monkeypatch.setenv(REUSE_KEY_ENV, KEY)
    _tracked(mlflow_server, "reuse-keyless", "n-3", tmp_path / "c", train, inputs)
    assert train.calls == 3
    assert "no valid record" in capsys.readouterr().out


def test_a_short_key_is_refused(mlflow_server, tmp_path, inputs, monkeypatch):
    monkeypatch.setenv(REUSE_KEY_ENV, "hunter2")
    with pytest.raises(GenreflowError, match=f"{REUSE_KEY_ENV} holds 7 characters, fewer than"):
        _tracked(mlflow_server, "reuse-short", "s-1", tmp_path / "a", Trainer(), inputs)
