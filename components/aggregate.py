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
        tracking_uri: MLflow tracking URI ("" = no tracking).
        parent_run_id: the parent run that receives the aggregate (the exit handler closes it).
        registered_model: registry name for the fold ensemble ("" = log, do not register).
        results: report.json, confusion.csv, per_genre.csv, confusion.png, report.html.
        report: the one-page HTML report, for the KFP UI.
        metrics: mean, standard deviation and pooled accuracy, for the KFP UI.
        confusion: the pooled confusion matrix, for the KFP UI.
        embeddings: the frozen-base path's embed folder, whose base.pth the heads share.
    """
    import os
    import shutil

    from genreflow.aggregate import REPORT_HTML, flat_metrics
    from genreflow.aggregate import aggregate as pool
    from genreflow.audio import clip_samples
    from genreflow.data.genres import GENRES
    from genreflow.fold_result import BEST, HEAD
    from genreflow.tracking import finish_pipeline_run, log_ensemble, report_tags

    fold_dirs = [fold.path for fold in folds]
    needed = min_folds or len(expected_folds)
    summary = pool(fold_dirs, results.path, expected_folds=expected_folds, min_folds=needed)
    shutil.copyfile(os.path.join(results.path, REPORT_HTML), report.path)
    headline = flat_metrics(summary)
    for key, value in headline.items():
        metrics.log_metric(key, value)
    confusion.log_confusion_matrix(list(GENRES), summary["confusion"]["matrix"])
    if tracking_uri:
        # A frozen base is stored once beside the folds' heads; else each fold is whole.
        base = os.path.join(embeddings.path, "base.pth") if embeddings else None
        checkpoint = HEAD if embeddings else BEST  # the selected checkpoints
        # The folds the report used: a failed fold may still hold a checkpoint.
        usable = [row["dir"] for row in summary["folds"]]
        model_uri = log_ensemble(
            tracking_uri,
            parent_run_id,
            [os.path.join(d, checkpoint) for d in usable],
            clip_samples=clip_samples(clip_seconds),
            base=base,
            registered_name=registered_model,
            workdir=results.path + ".mlflow",
        )
        print(f"fold ensemble logged as {model_uri}")
        finish_pipeline_run(
            tracking_uri,
            parent_run_id,
            metrics=headline,
            artifacts=[results.path],
            tags=report_tags(summary),
            status=None,  # the exit handler closes it with the pipeline's final state
            keep=results.path,
        )
    return results.uri
