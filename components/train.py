"""Fine-tune Cnn14 on one cross-validation fold (a GPU step) and log it as a child run."""

from kfp import dsl

from genreflow.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    features: dsl.Input[dsl.Dataset],
    fold: int,
    pretrained: str,
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
    """Train on folds != `fold`, evaluate on `fold`; return the held-out accuracy.

    Args:
        features: the packed HDF5 file.
        fold: the held-out fold (1..10).
        pretrained: PANNs checkpoint (path, https:// or gs://); "" = random init.
        iterations, batch_size, lr, mixup, eval_every, seed: the recipe (seed's defaults).
        tracking_uri: MLflow tracking URI ("" = no tracking).
        parent_run_id: the pipeline's parent run; this fold logs a nested child run.
        model: the fold folder: checkpoints, metrics.csv, predictions.csv, summary.json.
        metrics: the held-out accuracy, for the KFP UI.
    """
    from genreflow.tracking import log_fold
    from genreflow.train import TrainConfig, train_fold

    config = TrainConfig(
        features=features.path,
        fold=fold,
        out=model.path,
        pretrained=pretrained or None,
        freeze_base=False,
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        mixup=mixup,
        eval_every=eval_every,
        seed=seed,
    )
    summary = train_fold(config)
    accuracy = float(summary["final_accuracy"])
    metrics.log_metric("heldout_accuracy", accuracy)
    model.metadata.update(fold=fold, heldout_accuracy=accuracy, path="fine-tune")
    if tracking_uri:
        log_fold(tracking_uri, parent_run_id, model.path)
    return accuracy
