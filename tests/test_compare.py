"""`genreflow compare` against a real MLflow server: runs made here, numbers checked by hand."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scipy import special

from genreflow.cli import main

# Student's t quantiles t_{0.975, dof}, from printed tables
T975 = {9: 2.262157}

# Run A's fold accuracies, and what run B adds to each
A_SCORES = {
    1: 0.86,
    2: 0.84,
    3: 0.88,
    4: 0.90,
    5: 0.83,
    6: 0.87,
    7: 0.85,
    8: 0.89,
    9: 0.86,
    10: 0.82,
}
B_GAIN = {
    1: 0.03,
    2: 0.01,
    3: 0.04,
    4: 0.00,
    5: 0.05,
    6: 0.02,
    7: 0.03,
    8: -0.01,
    9: 0.04,
    10: 0.02,
}
B_SCORES = {fold: round(A_SCORES[fold] + B_GAIN[fold], 2) for fold in A_SCORES}


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pipeline_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    scores: dict[int, float],
    *,
    protocol: str | None = None,
    fold_params: dict[str, str] | None = None,
) -> str:
    """A parent run with its aggregate metrics and one child run per fold, as the pipeline
    leaves them (`fold_params`: the config a fold run logs as params); its id."""
    tags = {"genreflow.role": "pipeline"}
    if protocol is not None:
        tags["protocol"] = protocol
    parent = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    mean, sd = mean_and_sd(list(scores.values()))
    for key, value in {"accuracy_mean": mean, "accuracy_std": sd, "folds_usable": 10}.items():
        client.log_metric(parent, key, value)
    for fold, score in scores.items():
        child = client.create_run(
            experiment_id,
            run_name=f"fold-{fold}",
            tags={"mlflow.parentRunId": parent, "fold": str(fold), "genreflow.role": "fold"},
        ).info.run_id
        client.log_metric(child, "final_accuracy", score)
        for key, value in (fold_params or {}).items():
            client.log_param(child, key, value)
        client.set_terminated(child)
    client.set_terminated(parent)
    return parent


@pytest.fixture(scope="module")
def experiment(mlflow_server: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=mlflow_server)
    return client, client.create_experiment(f"compare-{uuid.uuid4().hex[:8]}")


def test_paired_cv10_comparison(
    experiment: tuple[MlflowClient, str], mlflow_server: str, tmp_path: Path, capsys
) -> None:
    client, experiment_id = experiment
    run_a = pipeline_run(client, experiment_id, "baseline", A_SCORES)  # no protocol: cv10
    run_b = pipeline_run(client, experiment_id, "candidate", B_SCORES, protocol="cv10")
    markdown = tmp_path / "comment.md"

    argv = ["compare", run_a, run_b, "--tracking-uri", mlflow_server, "--markdown", str(markdown)]
    capsys.readouterr()  # MLflow's own "View run" lines from making the runs
    assert main(argv) == 0
    printed = capsys.readouterr().out

    # by hand: the paired differences B - A, their mean and sd, and the Nadeau-Bengio
    # corrected standard error sd * sqrt(1/k + n_test/n_train), 10 folds: n_test/n_train = 1/9
    differences = [B_SCORES[k] - A_SCORES[k] for k in range(1, 11)]
    k = 10
    mean, sd = mean_and_sd(differences)
    se = sd * math.sqrt(1 / k + 1 / 9)
    t = mean / se
    # two-sided p of Student's t with v dof: the regularised incomplete beta I_{v/(v+t^2)}(v/2, 1/2)
    p = special.betainc((k - 1) / 2, 0.5, (k - 1) / ((k - 1) + t * t))
    low, high = mean - T975[9] * se, mean + T975[9] * se
    assert mean == pytest.approx(0.023) and abs(mean) > sd and low > 0  # a clear difference

    assert f"t = {t:+.4f}, dof = 9, p = {p:.3g}" in printed
    assert f"mean B - A = {mean:+.4f}" in printed
    assert f"corrected 95% interval [{low:+.4f}, {high:+.4f}]" in printed
    assert "10 folds, each model trained on the other 9" in printed
    for fold in (1, 5, 8):
        row = [str(fold), f"{A_SCORES[fold]:.4f}", f"{B_SCORES[fold]:.4f}"]
        row.append(f"{differences[fold - 1]:+.4f}")
        assert row in [line.split() for line in printed.splitlines()]
    assert printed.splitlines()[-1] == f"markdown: {markdown}"
    verdict = printed.splitlines()[-2]
    assert verdict.startswith("verdict: B differs from A: mean B - A = +0.0230")
    assert f"the sd of the paired differences ({sd:.4f})" in verdict
    assert "excludes 0" in verdict

    text = markdown.read_text()
    lines = text.splitlines()
    assert lines[0] == "## genreflow compare: baseline vs candidate"
    assert "cv10" in text and "records no protocol: assumed" in text  # run A has no protocol tag
    assert "| metric | A | B | B − A |" in lines
    a_mean, b_mean = (
        mean_and_sd(list(A_SCORES.values()))[0],
        mean_and_sd(list(B_SCORES.values()))[0],
    )
    assert f"| `accuracy_mean` | {a_mean:.4f} | {b_mean:.4f} | {b_mean - a_mean:+.4f} |" in lines
    assert f"| 5 | 0.8300 | 0.8800 | {differences[4]:+.4f} |" in lines
    assert f"| 8 | 0.8900 | 0.8800 | {differences[7]:+.4f} |" in lines
    assert not any("fold_" in line for line in lines if line.startswith("| `"))
    assert lines[-1].startswith("**Verdict:** B differs from A")


def test_filtered_protocol_mixed_protocols_and_errors(
    experiment: tuple[MlflowClient, str], mlflow_server: str, capsys
) -> None:
    client, experiment_id = experiment
    uri = ["--tracking-uri", mlflow_server]
    rep_a = {1: 0.80, 2: 0.82, 3: 0.81}
    rep_b = {1: 0.84, 2: 0.83, 3: 0.85}
    filtered_a = pipeline_run(client, experiment_id, "fa", rep_a, protocol="filtered")
    filtered_b = pipeline_run(client, experiment_id, "fb", rep_b, protocol="filtered")

    # repetitions are not paired: Welch's t over the two sets of repetition scores
    capsys.readouterr()
    assert main(["compare", filtered_a, filtered_b, *uri]) == 0
    printed = capsys.readouterr().out
    mean_a, sd_a = mean_and_sd(list(rep_a.values()))
    mean_b, sd_b = mean_and_sd(list(rep_b.values()))
    var_a, var_b = sd_a**2 / 3, sd_b**2 / 3  # squared standard errors of the two means
    t = (mean_b - mean_a) / math.sqrt(var_a + var_b)
    # Welch-Satterthwaite degrees of freedom
    dof = (var_a + var_b) ** 2 / (var_a**2 / 2 + var_b**2 / 2)
    assert "Welch's unpaired t-test" in printed and "not paired samples" in printed
    assert f"t = {t:+.4f}, dof = {dof:.3g}," in printed
    assert "per repetition (final_accuracy)" in printed

    # different protocols: side by side only
    cv10 = pipeline_run(client, experiment_id, "cv", A_SCORES, protocol="cv10")
    capsys.readouterr()
    assert main(["compare", cv10, filtered_b, *uri]) == 0
    printed = capsys.readouterr().out
    assert "not comparable fold by fold" in printed
    assert "accuracy_mean" in printed and "per fold" not in printed
    assert printed.strip().splitlines()[-1] == (
        "verdict: not comparable fold by fold (different protocols)"
    )

    # an unknown run id, and a run without fold children: errors naming the run
    unknown = uuid.uuid4().hex
    assert main(["compare", unknown, cv10, *uri]) == 2
    assert f"no MLflow run with id {unknown}" in capsys.readouterr().err
    lonely = client.create_run(experiment_id, run_name="lonely").info.run_id
    capsys.readouterr()
    assert main(["compare", cv10, lonely, *uri]) == 2
    assert f"run {lonely} has no fold child runs" in capsys.readouterr().err


def test_fold_runs_logged_under_the_old_name_compare_under_the_new(
    experiment: tuple[MlflowClient, str], mlflow_server: str
) -> None:
    """Runs logged before `heldout_accuracy` became `test_accuracy` compare with new ones."""
    from genreflow.compare import compare_runs

    client, experiment_id = experiment
    old = pipeline_run(client, experiment_id, "old", A_SCORES)
    new = pipeline_run(client, experiment_id, "new", B_SCORES)
    for run, scores, name in (
        (old, A_SCORES, "heldout_accuracy"),
        (new, B_SCORES, "test_accuracy"),
    ):
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run}'"
        )
        for child in children:
            client.log_metric(child.info.run_id, name, scores[int(child.data.tags["fold"])])
    for metric in ("test_accuracy", "heldout_accuracy"):
        result = compare_runs(old, new, tracking_uri=mlflow_server, metric=metric)
        assert result["metric"] == "test_accuracy"
        pairs = {row["fold"]: (row["a"], row["b"]) for row in result["per_fold"]}
        assert pairs == {k: (A_SCORES[k], B_SCORES[k]) for k in range(1, 11)}


def test_runs_of_an_earlier_recipe_compare_labelled(
    experiment: tuple[MlflowClient, str], mlflow_server: str, capsys
) -> None:
    """A run whose fold runs' params hold no recipe_version was trained under recipe 1 (the
    loss summed over genres): it still compares, and the comparison says so."""
    from genreflow.recipe import RECIPE_VERSION

    client, experiment_id = experiment
    old = pipeline_run(client, experiment_id, "recipe-1", A_SCORES, fold_params={"seed": "0"})
    today = {"seed": "0", "recipe_version": str(RECIPE_VERSION)}
    new = pipeline_run(client, experiment_id, "recipe-now", B_SCORES, fold_params=today)
    also_new = pipeline_run(client, experiment_id, "recipe-now-2", A_SCORES, fold_params=today)

    assert main(["compare", old, new, "--tracking-uri", mlflow_server]) == 0
    out = capsys.readouterr().out
    assert "run A: trained under recipe 1 (clip_nll summed over genres" in out
    assert "A and B were trained under different recipes" in out
    assert "difference" in out  # the paired test is still made and shown

    from genreflow.compare import compare_runs

    result = compare_runs(new, also_new, tracking_uri=mlflow_server)
    assert result["runs"]["a"]["recipe_versions"] == [RECIPE_VERSION]
    assert not [note for note in result["notes"] if "recipe" in note]
