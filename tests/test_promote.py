"""The registry lifecycle against a real MLflow server: versions registered as candidates,
`genreflow promote` moving `champion` on `genreflow compare`'s statistics."""

from __future__ import annotations

import os
import uuid

import pytest
from mlflow.tracking import MlflowClient
from test_compare import A_SCORES, B_SCORES, pipeline_run

from genreflow.cli import main
from genreflow.registry import CANDIDATE, CHAMPION, register_version, registration_refusal
from genreflow.tracking.names import GIT_COMMIT_TAG, PARENT_RUN_TAG

# B's gains taken away instead: the candidate loses 0.023 a fold, a significant loss.
WORSE_SCORES = {fold: round(2 * A_SCORES[fold] - B_SCORES[fold], 2) for fold in A_SCORES}


@pytest.fixture(scope="module")
def experiment(mlflow_server: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=mlflow_server)
    return client, client.create_experiment(f"promote-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def model_name() -> str:
    return f"promote-{uuid.uuid4().hex[:8]}"


def candidate(experiment, mlflow_server, name, scores, **tags) -> str:
    """A pipeline run with these fold scores, registered as a new version of `name` with
    the tags the pipeline gives it (`tags` overriding); the version's number."""
    client, experiment_id = experiment
    protocol = tags.get("protocol", "cv10")
    parent = pipeline_run(client, experiment_id, f"run-{len(scores)}", scores, protocol=protocol)
    model = client.create_logged_model(experiment_id, name="fold-ensemble", source_run_id=parent)
    mean = sum(scores.values()) / len(scores)
    all_tags = {
        "protocol": protocol,
        "selection": "validation",
        "partial": "false",
        "folds": ",".join(str(f) for f in scores),
        "accuracy_mean": f"{mean:.4f}",
        "accuracy_ci95": "[0.8000, 0.9000]",
        "accuracy_ci95_method": "corrected resampled t interval (Nadeau and Bengio 2003)",
        GIT_COMMIT_TAG: "0" * 40,
        "data.sha256": "d" * 64,
        "split.sha256": "s" * 64,
        PARENT_RUN_TAG: parent,
        **tags,
    }
    return register_version(
        mlflow_server, name, model.model_id, parent_run_id=parent, tags=all_tags
    )


def alias(client, name, which) -> str:
    return client.get_model_version_by_alias(name, which).version


def promote(mlflow_server, name, tmp_path, *extra) -> tuple[int, str, str]:
    markdown = tmp_path / f"{uuid.uuid4().hex[:6]}.md"
    argv = ["promote", name, "--tracking-uri", mlflow_server, "--markdown", str(markdown), *extra]
    status = main(argv)
    return status, markdown.read_text(), str(markdown)


def test_first_candidate_becomes_champion_then_a_better_one_replaces_it(
    experiment, mlflow_server, model_name, tmp_path, capsys
):
    client, _ = experiment
    first = candidate(experiment, mlflow_server, model_name, A_SCORES)
    version = client.get_model_version(model_name, first)
    assert alias(client, model_name, CANDIDATE) == first
    assert version.description.startswith("Fold ensemble of 10 folds (10-fold cross-validation")
    assert "95% interval [0.8000, 0.9000]" in version.description

    status, text, _ = promote(mlflow_server, model_name, tmp_path)
    assert status == 0
    assert alias(client, model_name, CHAMPION) == first
    assert f"**Promoted:** version {first} is now `champion`" in text
    assert "the first candidate: there was no champion" in text
    assert client.get_model_version(model_name, first).tags["genreflow.promotion"] == "champion"

    better = candidate(experiment, mlflow_server, model_name, B_SCORES)
    assert alias(client, model_name, CANDIDATE) == better
    assert alias(client, model_name, CHAMPION) == first  # until promoted
    capsys.readouterr()
    status, text, _ = promote(mlflow_server, model_name, tmp_path)
    printed = capsys.readouterr().out
    assert status == 0
    assert alias(client, model_name, CHAMPION) == better
    assert f"version {better}: promoted: no significant loss against version {first}" in printed
    # The comparison is genreflow compare's, champion as A and candidate as B.
    assert "### genreflow compare: run-10 vs run-10" in text
    assert "corrected 95% interval [+" in text
    assert "**Verdict:** B differs from A" in text

    status, text, _ = promote(mlflow_server, model_name, tmp_path)  # nothing left to do
    assert status == 0 and f"version {better} is already the champion" in text


def test_a_significant_loss_is_held_back(experiment, mlflow_server, model_name, tmp_path):
    client, _ = experiment
    champion = candidate(experiment, mlflow_server, model_name, A_SCORES)
    assert promote(mlflow_server, model_name, tmp_path)[0] == 0
    worse = candidate(experiment, mlflow_server, model_name, WORSE_SCORES)

    status, text, _ = promote(mlflow_server, model_name, tmp_path)
    assert status == 1
    assert alias(client, model_name, CHAMPION) == champion
    assert alias(client, model_name, CANDIDATE) == worse
    assert f"**Not promoted:** `champion` stays version {champion}" in text
    assert f"held back: a significant loss against the champion (version {champion})" in text
    assert "mean B - A = -0.0230" in text
    assert client.get_model_version(model_name, worse).tags["genreflow.promotion"] == "held back"


def test_what_cannot_be_compared_or_trusted_is_held_back(
    experiment, mlflow_server, model_name, tmp_path
):
    client, _ = experiment
    champion = candidate(experiment, mlflow_server, model_name, A_SCORES)
    assert promote(mlflow_server, model_name, tmp_path)[0] == 0

    candidate(experiment, mlflow_server, model_name, B_SCORES, protocol="filtered")
    status, text, _ = promote(mlflow_server, model_name, tmp_path)
    assert status == 1
    assert f"the champion (version {champion}) has protocol cv10, the candidate filtered" in text

    candidate(experiment, mlflow_server, model_name, B_SCORES, **{"split.sha256": "t" * 64})
    status, text, _ = promote(mlflow_server, model_name, tmp_path)
    assert status == 1 and "has split.sha256" in text

    heldout = candidate(experiment, mlflow_server, model_name, B_SCORES, selection="heldout")
    status, text, _ = promote(mlflow_server, model_name, tmp_path)
    assert status == 1
    assert f"version {heldout} was chosen with selection=heldout" in text
    assert alias(client, model_name, CHAMPION) == champion

    # An explicit older version can still be promoted when it compares well.
    status, _, _ = promote(mlflow_server, model_name, tmp_path, "--version", "1")
    assert status == 0 and alias(client, model_name, CHAMPION) == champion


def test_a_model_without_a_candidate_is_a_one_line_error(mlflow_server, model_name, capsys):
    MlflowClient(mlflow_server).create_registered_model(model_name)
    assert main(["promote", model_name, "--tracking-uri", mlflow_server]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"registered model '{model_name}' has no version with the alias 'candidate'" in error


def test_results_chosen_on_test_data_or_partial_are_not_registered_unless_asked():
    trusted = {"selection": "validation", "partial": False}
    assert registration_refusal(trusted) == ""
    assert "selection=heldout" in registration_refusal({**trusted, "selection": "heldout"})
    partial = {**trusted, "partial": True, "usable_folds": [1, 2], "expected_folds": [1, 2, 3]}
    assert registration_refusal(partial) == "it is partial (2 of 3 folds)"


def test_a_version_registers_in_a_sqlite_store_whatever_the_global_uri(tmp_path, monkeypatch):
    """make run's store is a sqlite database: MLflow's database registry looks the logged
    model up through the process-wide tracking URI, which here names another one."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("sqlite-registry")
    parent = client.create_run(experiment_id).info.run_id
    model = client.create_logged_model(experiment_id, name="fold-ensemble", source_run_id=parent)
    tags = {
        "protocol": "cv10", "selection": "validation", "partial": "false", "folds": "1,2",
        "accuracy_mean": "0.9000", GIT_COMMIT_TAG: "0" * 40, PARENT_RUN_TAG: parent,
    }  # fmt: skip
    number = register_version(uri, "sqlite-model", model.model_id, parent_run_id=parent, tags=tags)
    assert str(client.get_model_version_by_alias("sqlite-model", "candidate").version) == number
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'elsewhere.db'}"
