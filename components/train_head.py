"""The frozen-base fast path, step two: train only the 10-way head of one fold."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train_head(
    embeddings: dsl.Input[dsl.Dataset],
    fold: int,
    protocol: str,
    selection: str,
    iterations: int,
    batch_size: int,
    lr: float,
    mixup: bool,
    eval_every: int,
    seed: int,
    tracking_uri: str,
    parent_run_id: str,
    reuse_folds: bool,
    expected_folds: list,
    min_folds: int,
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
):
    """Train the head on stored embeddings of the fold's training clips; its test accuracy
    (of the checkpoint chosen as `selection` says) lands in `metrics`.

    Args:
        embeddings: the embed step's folder (embeddings.h5, base.pth).
        fold: cv10: the held-out fold (1..10); filtered: the repetition (seed + fold - 1).
        protocol: cv10 or filtered; selection: validation or heldout (see `train`).
        iterations, batch_size, lr, mixup, eval_every, seed: the head's recipe.
        tracking_uri: MLflow tracking URI ("" = no tracking).
        parent_run_id: the pipeline's parent run; this fold is a nested child run.
        reuse_folds: take an identical fold (same embeddings, recipe and code) from MLflow.
        expected_folds, min_folds: with min_folds (0 = all) below the number of folds, a
            fold that fails for good leaves failed.json instead of failing the step (and
            so the DAG).
        model: the fold folder: head.pth, metrics.csv, predictions.csv, summary.json.
        metrics: the test accuracy, for the KFP UI.
    """
    import os

    from genreflow.frozen import train_head as fit_head
    from genreflow.tracking import tracked_fold

    embeddings_file = os.path.join(embeddings.path, "embeddings.h5")
    recipe = dict(iterations=iterations, batch_size=batch_size, lr=lr, mixup=mixup)
    recipe.update(eval_every=eval_every, seed=seed, protocol=protocol, selection=selection)
    summary = tracked_fold(
        lambda: fit_head(embeddings_file, fold, model.path, **recipe),
        out=model.path,
        fold=fold,
        inputs=[embeddings_file],
        settings=dict(path="frozen-base", **recipe),
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        reuse=reuse_folds,
        tolerate_failure=0 < min_folds < len(expected_folds),
    )
    if "failed" in summary:  # tolerated (min_folds): failed.json says why
        model.metadata.update(fold=fold, failed=summary["failed"])
        return
    accuracy = float(summary["final_accuracy"])
    metrics.log_metric("test_accuracy", accuracy)
    model.metadata.update(fold=fold, test_accuracy=accuracy, path="frozen-base", protocol=protocol)
