"""Fine-tune Cnn14 on one fold (a GPU step), as a child run of the pipeline's MLflow run."""

from kfp import dsl

from genreflow.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(
    features: dsl.Input[dsl.Dataset],
    fold: int,
    protocol: str,
    selection: str,
    pretrained: str,
    iterations: int,
    batch_size: int,
    lr: float,
    mixup: bool,
    eval_every: int,
    seed: int,
    precision: str,
    tracking_uri: str,
    parent_run_id: str,
    reuse_folds: bool,
    expected_folds: list,
    min_folds: int,
    work_root: str,
    pipeline_root: str,
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
):
    """Train on the fold's training clips, choose the checkpoint on its validation clips,
    report on its test clips (the accuracy lands in `metrics`).

    Args:
        features: the packed HDF5 file.
        fold: cv10: the held-out fold (1..10); filtered: the repetition (seed + fold - 1).
        protocol: cv10 or filtered (the fault-filtered split's lists).
        selection: validation (an inner split chooses the checkpoint) or heldout (the
            seed's way: the test fold does).
        pretrained: PANNs checkpoint (path, https:// or gs://); "" = random init.
        iterations, batch_size, lr, mixup, eval_every, seed: the recipe (seed's defaults).
        precision: auto (bf16 autocast where the hardware has it), fp32 or bf16.
        tracking_uri: MLflow tracking URI ("" = the MLFLOW_TRACKING_URI the platform
            injects, else no tracking).
        parent_run_id: the pipeline's parent run; this fold is a nested child run.
        reuse_folds: take an identical fold (same data, recipe and code) from MLflow.
        expected_folds, min_folds: with min_folds (0 = all) below the number of folds, a
            fold that fails for good leaves failed.json instead of failing the step (and
            so the DAG).
        work_root, pipeline_root: where the fold keeps its working state so that a
            restart resumes it (work_root, else the pipeline root's genreflow-work/).
        model: the fold folder: checkpoints, metrics.csv, predictions.csv, summary.json.
        metrics: the test accuracy, for the KFP UI.
    """
    from genreflow.fold_result import fold_outcome
    from genreflow.recipe import TrainConfig
    from genreflow.steps.fold import fine_tune_fold
    from genreflow.tracking.client import platform_tracking_uri

    config = TrainConfig(
        features=features.path,
        fold=fold,
        out=model.path,
        protocol=protocol,
        selection=selection,
        pretrained=pretrained or None,
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        mixup=mixup,
        eval_every=eval_every,
        seed=seed,
        precision=precision,
    )
    result = fine_tune_fold(
        config,
        tracking_uri=platform_tracking_uri(tracking_uri),
        parent_run_id=parent_run_id,
        reuse=reuse_folds,
        min_folds=min_folds,
        expected_folds=expected_folds,
        work_root=work_root,
        pipeline_root=pipeline_root,
    )
    outcome = fold_outcome(result)
    model.metadata.update(outcome)
    if "test_accuracy" in outcome:
        metrics.log_metric("test_accuracy", outcome["test_accuracy"])
