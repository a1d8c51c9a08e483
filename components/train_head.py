"""The frozen-base fast path, step two: train only the 10-way head of one fold."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train_head(
    embeddings: dsl.Input[dsl.Dataset],
    fold: int,
    iterations: int,
    batch_size: int,
    lr: float,
    mixup: bool,
    eval_every: int,
    seed: int,
    tracking_uri: str,
    parent_run_id: str,
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> float:
    """Train the head on stored embeddings of folds != `fold`; return held-out accuracy.

    Args:
        embeddings: the embed step's folder (embeddings.h5, base.pth).
        fold: the held-out fold (1..10).
        iterations, batch_size, lr, mixup, eval_every, seed: the head's recipe.
        tracking_uri: MLflow tracking URI ("" = no tracking).
        parent_run_id: the pipeline's parent run; this fold logs a nested child run.
        model: the fold folder: head.pth, metrics.csv, predictions.csv, summary.json.
        metrics: the held-out accuracy, for the KFP UI.
    """
    import os

    from genreflow.frozen import train_head as fit_head
    from genreflow.tracking import log_fold

    summary = fit_head(
        os.path.join(embeddings.path, "embeddings.h5"),
        fold,
        model.path,
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        mixup=mixup,
        eval_every=eval_every,
        seed=seed,
    )
    accuracy = float(summary["final_accuracy"])
    metrics.log_metric("heldout_accuracy", accuracy)
    model.metadata.update(fold=fold, heldout_accuracy=accuracy, path="frozen-base")
    if tracking_uri:
        log_fold(tracking_uri, parent_run_id, model.path)
    return accuracy
