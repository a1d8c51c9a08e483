"""The report step, the pipeline's last: the cross-validation report (genreflow.aggregate),
then, when tracking, the fold ensemble logged as the parent run's model (genreflow.serving),
registered (genreflow.registry), and the aggregate metrics on the parent run and its model,
the report on the parent run."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from genreflow.fold_result import FINE_TUNE, SELECTED_CHECKPOINT, folds_required, read_summary
from genreflow.tracking.names import (
    DATA_SHA256_TAG,
    GIT_COMMIT_TAG,
    PARTIAL_TAG,
    PROTOCOL_TAG,
    SELECTION_TAG,
    SOURCE_NAME_TAG,
    SOURCE_TYPE_TAG,
    SPLIT_SHA256_TAG,
)
from genreflow.tracking.runs import finish_pipeline_run, get_run, git_commit


def report(
    fold_dirs: Iterable[str | Path],
    results: str | Path,
    *,
    expected_folds: Sequence[int],
    min_folds: int = 0,
    protocol: str | None = None,
    train_fraction: float | None = None,
    clip_seconds: float = 30.0,
    tracking_uri: str = "",
    parent_run_id: str = "",
    registered_model: str = "",
    register_anyway: bool = False,
    base: str | Path | None = None,
) -> dict:
    """Write the report of the folds in `fold_dirs` into `results` and, when tracking, log
    it and the fold ensemble on the parent run, which stays open for the exit handler.

    Args:
        fold_dirs: one folder per fold, as the fold steps leave them (a failed one too).
        results: report.json, report.html, confusion.csv, confusion.png, per_genre.csv.
        expected_folds: the folds the run was meant to have; a missing one is named.
        min_folds: the fewest usable folds (0 = every expected fold); between it and all,
            a partial result.
        protocol, train_fraction: as genreflow.aggregate.aggregate takes them (None: from
            the folds).
        clip_seconds: the clip length the fold models read (the ensemble's input).
        tracking_uri: MLflow ("" = no tracking: the report only).
        parent_run_id: the pipeline's parent run.
        registered_model: the registry name for the fold ensemble ("" = log, do not
            register); a result chosen on test data (selection=heldout) or partial is
            registered only with `register_anyway` (genreflow.registry).
        base: the frozen base's checkpoint that the folds' heads share (frozen-base path).

    Returns:
        The report, as written to report.json.
    """
    from genreflow.aggregate import aggregate, flat_metrics
    from genreflow.audio import clip_samples
    from genreflow.errors import GenreflowError
    from genreflow.registry import register_version, registration_refusal, version_tags
    from genreflow.serving import log_ensemble
    from genreflow.tracking.models import log_model_metrics

    if tracking_uri and not parent_run_id:  # before the work, not after it
        raise GenreflowError(
            "logging the report needs the pipeline's parent run (parent_run_id; "
            "`genreflow open-run` opens one)"
        )
    fold_dirs = [str(folder) for folder in fold_dirs]
    needed = folds_required(min_folds, expected_folds)
    result = aggregate(
        fold_dirs,
        results,
        expected_folds=list(expected_folds),
        min_folds=needed,
        protocol=protocol,
        train_fraction=train_fraction,
    )
    if not tracking_uri:
        return result
    # The folds the report used (a failed fold may still hold a checkpoint), each with the
    # checkpoint its path selects: best.pth, or head.pth beside the shared base.
    checkpoints = {
        int(row["fold"]): Path(row["dir"])
        / SELECTED_CHECKPOINT[read_summary(row["dir"]).get("path", FINE_TUNE)]
        for row in result["folds"]
    }
    parent = get_run(tracking_uri, parent_run_id)
    commit = parent.data.tags.get(GIT_COMMIT_TAG) or git_commit()
    logged = log_ensemble(
        tracking_uri,
        parent_run_id,
        checkpoints,
        clip_samples=clip_samples(clip_seconds),
        base=base,
        workdir=str(results) + ".mlflow",
        tags={**_report_tags(result), **source_tags(commit)},
    )
    print(
        f"fold ensemble logged as {logged.model_uri}: {len(logged.stored)} file(s), "
        f"{sum(logged.stored.values()) / 1e6:.1f} MB, every checkpoint in the model; "
        f"{len(logged.moved)} fold run(s) now point to it"
    )
    # The aggregate on the run and on its model, so search_logged_models ranks ensembles.
    log_model_metrics(
        tracking_uri,
        parent_run_id,
        logged.model_id,
        flat_metrics(result),
        dataset=evaluation_dataset(result),
    )
    refusal = registration_refusal(result)
    if registered_model and refusal and not register_anyway:
        print(f"not registered as {registered_model}: {refusal} (register_anyway=true does)")
    elif registered_model:
        tags = version_tags(result, parent_run_id=parent_run_id, git_commit=commit)
        number = register_version(
            tracking_uri, registered_model, logged.model_id, parent_run_id=parent_run_id, tags=tags
        )
        print(f"registered as models:/{registered_model}/{number} (alias candidate)")
    finish_pipeline_run(
        tracking_uri,
        parent_run_id,
        metrics={},  # logged above, with the model
        artifacts=[results],
        tags=_report_tags(result),
        status=None,  # the exit handler closes it with the pipeline's final state
        keep=str(results),
    )
    return result


def source_tags(commit: str) -> dict[str, str]:
    """MLflow's own source tags for what the report step logs: the commit, and that a
    pipeline job (genreflow's) made it."""
    return {GIT_COMMIT_TAG: commit, SOURCE_TYPE_TAG: "JOB", SOURCE_NAME_TAG: "genreflow"}


def evaluation_dataset(result: dict) -> tuple[str, str] | None:
    """What the aggregate was measured on, as MLflow's (name, SHA-256) of a dataset: the
    source archive (data_sha256) under the protocol's clips; None where unrecorded."""
    if not result.get("data_sha256"):
        return None
    return f"gtzan-{result['protocol']}", str(result["data_sha256"])


def _report_tags(result: dict) -> dict[str, str]:
    """The parent's tags from the aggregate report: what produced it and on which data."""
    tags = {PARTIAL_TAG: json.dumps(bool(result.get("partial")))}
    for key, tag in (
        ("protocol", PROTOCOL_TAG),
        ("selection", SELECTION_TAG),
        ("data_sha256", DATA_SHA256_TAG),
        ("split_sha256", SPLIT_SHA256_TAG),
    ):
        if result.get(key):
            tags[tag] = str(result[key])
    return tags
