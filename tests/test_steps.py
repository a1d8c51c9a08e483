"""Every step is one function called three ways: here through the command, which now does
what the KFP component does (tests/test_components.py) and the Python API do: a fold
retried in-step, reused from MLflow, recorded in failed.json, the report logged and
registered, the parent run opened and closed; against the real MLflow server of
tests/conftest.py.

The steps chain as a person at a shell would run them: download, pack, open-run, train (a
fine-tuned fold, tiny), aggregate, close-run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import uuid
from contextlib import redirect_stderr, redirect_stdout

import pytest
from mlflow.tracking import MlflowClient

from genreflow.cli import main
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.recipe import TrainConfig
from genreflow.steps.fold import fold_settings

# One cheap fine-tune fold: a random Cnn14 on 1 s clips, two iterations of two clips, an
# evaluation (and so a checkpoint) after each.
RECIPE = ["--iterations", "2", "--batch-size", "2", "--eval-every", "1", "--no-mixup"]
RECIPE += ["--precision", "fp32", "--device", "cpu"]


def _command(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main(argv)
    print(err.getvalue(), file=sys.stderr)  # kept for a failure's report
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> str:
    """The synthetic set, downloaded and packed through the commands."""
    root = tmp_path_factory.mktemp("steps")
    archive, sha256 = make_synthetic_gtzan(root / "source", clips_per_genre=2, seconds=1.0)
    dataset, out = root / "dataset", root / "features.h5"
    argv = ["download", "--source", archive.as_uri(), "--sha256", sha256, "--out", str(dataset)]
    assert _command(argv)[0] == 0
    argv = ["pack", "--dataset", str(dataset), "--out", str(out), "--clip-seconds", "1"]
    assert _command([*argv, "--workers", "1", "--no-progress"])[0] == 0
    return str(out)


@pytest.fixture(scope="module")
def experiment() -> str:
    return f"test-steps-{uuid.uuid4().hex[:8]}"


def _open_run(mlflow_server: str, experiment: str) -> tuple[str, str]:
    """`genreflow open-run`: (the parent run's id, the pipeline run id that closes it)."""
    pipeline_run_id = f"shell-{uuid.uuid4().hex[:8]}"
    argv = ["open-run", "--tracking-uri", mlflow_server, "--experiment", experiment]
    argv += ["--pipeline-run-id", pipeline_run_id, "--clip-seconds", "1"]
    status, out, err = _command(argv)
    assert status == 0 and f"--pipeline-run-id {pipeline_run_id}" in err  # how to close it
    (parent,) = out.split()  # the id alone on stdout, for $(genreflow open-run ...)
    return parent, pipeline_run_id


def _train(features: str, out, *extra: str) -> tuple[int, str, str]:
    argv = ["train", "--features", features, "--fold", "1", "--out", str(out), *RECIPE]
    return _command([*argv, *extra])


def _tracked(parent: str, mlflow_server: str) -> list[str]:
    return ["--parent-run-id", parent, "--tracking-uri", mlflow_server]


def _fold_runs(client: MlflowClient, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


@pytest.fixture(scope="module")
def first(features, mlflow_server, experiment, tmp_path_factory) -> dict:
    """A fold trained by `genreflow train --parent-run-id` whose first try meets a transient
    failure after its first checkpoint: a connection reset, as a flaky bucket gives one. It
    is injected into the real training (at its second evaluation, in the first try only);
    what must cope with it, the command's step, is the real one."""
    import genreflow.steps.fold
    import genreflow.train

    real, tries = genreflow.train.train_fold, []

    def flaky(config, *, on_evaluation=None):
        tries.append(1)

        def evaluation(row):
            if on_evaluation is not None:
                on_evaluation(row)
            if len(tries) == 1 and int(row["iteration"]) == 2:
                raise ConnectionResetError(104, "Connection reset by peer")

        return real(config, on_evaluation=evaluation)

    parent, pipeline_run_id = _open_run(mlflow_server, experiment)
    out = tmp_path_factory.mktemp("first") / "fold1"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(genreflow.steps.fold, "FOLD_RETRY_FIRST_DELAY_SECONDS", 0.01)
        patch.setattr(genreflow.train, "train_fold", flaky)
        status, said, logged = _train(features, out, *_tracked(parent, mlflow_server))
    return {
        "status": status,
        "out": out,
        "parent": parent,
        "pipeline_run_id": pipeline_run_id,
        "tries": len(tries),
        "stdout": said,
        "stderr": logged,
    }


def test_train_retries_a_transient_failure_from_its_checkpoint(first, mlflow_server):
    assert first["status"] == 0 and first["tries"] == 2
    assert (
        "fold 1: ConnectionResetError: [Errno 104] Connection reset by peer (transient)"
        in (first["stderr"])
    )
    assert "try 2 of 3" in first["stderr"]
    assert "fold 1: resuming from iteration 1" in first["stderr"]  # not from 0
    summary = json.loads((first["out"] / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["path"] == "fine-tune"
    assert f"test accuracy {summary['final_accuracy']:.3f}" in first["stdout"]
    client = MlflowClient(mlflow_server)
    (run,) = _fold_runs(client, first["parent"])
    assert run.info.status == "FINISHED" and run.info.run_name == "fold-01"
    assert run.data.tags["genreflow.tries"] == "2"
    assert run.data.metrics["final_accuracy"] == summary["final_accuracy"]
    # The curve, each point once: the retried try did not send iteration 1 again.
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert sorted(m.step for m in history) == [1, 2]


def test_train_reuses_an_identical_fold_from_mlflow(
    first, features, mlflow_server, experiment, tmp_path
):
    import genreflow.train

    parent, _ = _open_run(mlflow_server, experiment)
    out = tmp_path / "fold1"

    def trained_again(config, **_):
        raise AssertionError(f"fold {config.fold} trained again instead of reused")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(genreflow.train, "train_fold", trained_again)
        status, said, _ = _train(features, out, *_tracked(parent, mlflow_server))
    assert status == 0
    client = MlflowClient(mlflow_server)
    (original,) = _fold_runs(client, first["parent"])
    assert f"fold 1: reused from MLflow run {original.info.run_id}" in said
    for name in ("summary.json", "predictions.csv", "metrics.csv", "best.pth"):
        assert (out / name).read_bytes() == (first["out"] / name).read_bytes(), name
    (reused,) = _fold_runs(client, parent)
    assert reused.data.tags["reused"] == "true"
    assert reused.data.tags["genreflow.reused_from"] == original.info.run_id

    # --no-reuse trains it again, under a parent of its own, to the same result (a CPU).
    parent, _ = _open_run(mlflow_server, experiment)
    again = tmp_path / "again"
    status, said, _ = _train(features, again, *_tracked(parent, mlflow_server), "--no-reuse")
    assert status == 0 and "reused" not in said
    (trained,) = _fold_runs(client, parent)
    assert "reused" not in trained.data.tags
    predictions = (again / "predictions.csv").read_text()
    assert predictions == (first["out"] / "predictions.csv").read_text()


def test_train_records_a_fold_that_fails_for_good_when_min_folds_allows(
    features, mlflow_server, experiment, tmp_path
):
    """As the pipeline's fold step: with --min-folds below the folds' number a fold that
    fails for good leaves failed.json, its run ends FAILED and the command goes on (exit
    0), and the report names it; without, the command fails in one line."""
    parent, pipeline_run_id = _open_run(mlflow_server, experiment)
    bad = tmp_path / "fold11"
    argv = ["train", "--features", features, "--fold", "11", "--out", str(bad), *RECIPE]
    argv += _tracked(parent, mlflow_server)
    status, _, err = _command(argv)
    assert status == 2
    assert "genreflow train: error: " in err and "fold must be one of 1..10, got 11" in err

    status, said, _ = _command([*argv, "--min-folds", "1", "--folds", "1", "11"])
    assert status == 0
    record = json.loads((bad / "failed.json").read_text())
    assert record["fold"] == 11 and "fold must be one of 1..10, got 11" in record["error"]
    assert "fold 11 failed (GenreflowError: " in said and f"{bad}/failed.json" in said
    client = MlflowClient(mlflow_server)
    (run,) = _fold_runs(client, parent)
    assert run.data.tags["fold"] == "11" and run.info.status == "FAILED"

    good = tmp_path / "fold1"
    assert _train(features, good, *_tracked(parent, mlflow_server))[0] == 0
    argv = ["aggregate", "--fold-dir", str(good), "--fold-dir", str(bad), "--out"]
    argv += [str(tmp_path / "report"), "--min-folds", "1", "--folds", "1", "11"]
    status, said, _ = _command(argv)
    assert status == 0 and "PARTIAL" in said
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (failed,) = report["failed_folds"]
    assert failed["fold"] == 11 and "fold must be one of 1..10, got 11" in failed["reason"]
    _command(["close-run", "--tracking-uri", mlflow_server, "--pipeline-run-id", pipeline_run_id,
              "--state", "failed"])  # fmt: skip
    assert client.get_run(parent).info.status == "FAILED"


def test_aggregate_logs_and_registers_the_ensemble_then_close_run_ends_the_parent(
    first, mlflow_server, tmp_path
):
    name = f"steps-{uuid.uuid4().hex[:8]}"
    results = tmp_path / "results"
    argv = ["aggregate", "--fold-dir", str(first["out"]), "--out", str(results), "--folds", "1"]
    argv += [*_tracked(first["parent"], mlflow_server), "--registered-model", name]
    status, said, _ = _command([*argv, "--clip-seconds", "1"])
    assert status == 0
    assert f"registered as models:/{name}/1 (alias candidate)" in said
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.run_id == first["parent"] and version.tags["protocol"] == "cv10"
    parent = client.get_run(first["parent"])
    report = json.loads((results / "report.json").read_text())
    assert parent.data.metrics["accuracy_mean"] == pytest.approx(report["accuracy"]["mean"])
    assert parent.info.status == "RUNNING"  # the exit handler's (here: close-run's) to end
    artifacts = {a.path for a in client.list_artifacts(first["parent"], "results")}
    assert "results/report.json" in artifacts

    argv = ["close-run", "--tracking-uri", mlflow_server, "--pipeline-run-id"]
    assert _command([*argv, first["pipeline_run_id"], "--state", "succeeded"])[0] == 0
    assert client.get_run(first["parent"]).info.status == "FINISHED"
    assert _command([*argv, "no-such-run", "--state", "succeeded"])[0] == 2


def test_tracking_options_need_a_parent_run(features, tmp_path, capsys):
    argv = ["train", "--features", features, "--fold", "1", "--out", str(tmp_path / "f")]
    assert main([*argv, "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri needs --parent-run-id" in err and err.count("\n") == 1
    assert not (tmp_path / "f").exists()


def test_a_folds_identity_holds_what_it_trains_not_how_it_runs():
    # Device, logging and how often resume state is saved change no weight: a fold trained
    # with other values is the same result, reused; the recipe's own settings are not.
    base = TrainConfig(features="f.h5", out="o", fold=1)
    same = dataclasses.replace(base, device="cpu", log_every=1, resume_every_seconds=0.0)
    assert fold_settings(same) == fold_settings(base)
    assert "fold" not in fold_settings(base)
    for field, value in (("lr", 1e-3), ("iterations", 7), ("eval_every", 3), ("seed", 1)):
        assert fold_settings(dataclasses.replace(base, **{field: value})) != fold_settings(base)
