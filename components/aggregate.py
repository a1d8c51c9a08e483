"""Pool the folds' test predictions into the report; log it and the fold ensemble to MLflow."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def aggregate(
    folds: dsl.Input[list[dsl.Model]],
    expected_folds: list[int],
    min_folds: int,
    clip_seconds: float,
    tracking_uri: str,
    parent_run_id: str,
    registered_model: str,
    register_anyway: bool,
    results: dsl.Output[dsl.Dataset],
    report: dsl.Output[dsl.HTML],
    metrics: dsl.Output[dsl.Metrics],
    confusion: dsl.Output[dsl.ClassificationMetrics],
    embeddings: dsl.Input[dsl.Dataset] = None,
) -> str:
    """Write the report, log it and the fold ensemble to MLflow; return where `results` is.

    Args:
        folds: the fold folders (predictions.csv, summary.json, checkpoint).
        expected_folds: the folds the pipeline ran; a missing one is named in the report.
        min_folds: fewer usable folds than this (0 = all) is an error; between it and
            all, a partial result.
        clip_seconds: the clip length the models read (the ensemble's input size).
        tracking_uri: MLflow tracking URI ("" = the MLFLOW_TRACKING_URI the platform
            injects, else no tracking).
        parent_run_id: the parent run that receives the aggregate (the exit handler closes it).
        registered_model: registry name for the fold ensemble ("" = log, do not register).
        register_anyway: register it even when its checkpoints were chosen on test data
            (selection=heldout) or the result is partial.
        results: report.json, confusion.csv, per_genre.csv, confusion.png, report.html.
        report: the one-page HTML report, for the KFP UI.
        metrics: mean, standard deviation and pooled accuracy, for the KFP UI.
        confusion: the pooled confusion matrix, for the KFP UI.
        embeddings: the frozen-base path's embed folder, whose base.pth the heads share.
    """
    import os
    import shutil

    from genreflow.aggregate import REPORT_HTML, flat_metrics
    from genreflow.data.genres import GENRES
    from genreflow.embedding import BASE
    from genreflow.steps.report import report as write_report
    from genreflow.tracking.client import platform_tracking_uri

    summary = write_report(
        [fold.path for fold in folds],
        results.path,
        expected_folds=expected_folds,
        min_folds=min_folds,
        clip_seconds=clip_seconds,
        tracking_uri=platform_tracking_uri(tracking_uri),
        parent_run_id=parent_run_id,
        registered_model=registered_model,
        register_anyway=register_anyway,
        base=os.path.join(embeddings.path, BASE) if embeddings else None,
    )
    shutil.copyfile(os.path.join(results.path, REPORT_HTML), report.path)
    for key, value in flat_metrics(summary).items():
        metrics.log_metric(key, value)
    confusion.log_confusion_matrix(list(GENRES), summary["confusion"]["matrix"])
    return results.uri
