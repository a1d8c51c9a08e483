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
    weight_decay: float,
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
        iterations, batch_size, lr, weight_decay, mixup, eval_every, seed: the head's
            recipe (genreflow.recipe.HeadConfig).
        tracking_uri: MLflow tracking URI ("" = the MLFLOW_TRACKING_URI the platform
            injects, else no tracking).
        parent_run_id: the pipeline's parent run; this fold is a nested child run.
        reuse_folds: take an identical fold (same embeddings, recipe and code) from MLflow.
        expected_folds, min_folds: with min_folds (0 = all) below the number of folds, a
            fold that fails for good leaves failed.json instead of failing the step (and
            so the DAG).
        model: the fold folder: head.pth, metrics.csv, predictions.csv, summary.json.
        metrics: the test accuracy, for the KFP UI.
    """
    import os

    from genreflow.embedding import EMBEDDINGS
    from genreflow.fold_result import fold_outcome
    from genreflow.recipe import HeadConfig
    from genreflow.steps.head import head_fold
    from genreflow.tracking.client import platform_tracking_uri

    config = HeadConfig(
        embeddings=os.path.join(embeddings.path, EMBEDDINGS),
        fold=fold,
        out=model.path,
        protocol=protocol,
        selection=selection,
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        mixup=mixup,
        eval_every=eval_every,
        seed=seed,
    )
    result = head_fold(
        config,
        tracking_uri=platform_tracking_uri(tracking_uri),
        parent_run_id=parent_run_id,
        reuse=reuse_folds,
        min_folds=min_folds,
        expected_folds=expected_folds,
    )
    outcome = fold_outcome(result)
    model.metadata.update(outcome)
    if "test_accuracy" in outcome:
        metrics.log_metric("test_accuracy", outcome["test_accuracy"])
