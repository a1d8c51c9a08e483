"""Open the pipeline's parent MLflow run, which every fold nests under."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_run(
    tracking_uri: str,
    experiment: str,
    pipeline_run: str,
    profile: str,
    source: str,
    sha256: str,
    pretrained: str,
    freeze_base: bool,
    clip_seconds: float,
    iterations: int,
    batch_size: int,
    lr: float,
    mixup: bool,
    eval_every: int,
    seed: int,
) -> str:
    """Return the id of a new parent run ("" when tracking is off).

    Args:
        tracking_uri: MLflow tracking URI ("" = no tracking).
        experiment: MLflow experiment name.
        pipeline_run: the KFP run's name: the parent's name and a tag to filter on.
        profile: the recipe profile's name (demo, seed, custom), a tag.
        source, sha256, pretrained, freeze_base, clip_seconds, iterations, batch_size, lr, mixup,
            eval_every, seed: the pipeline's parameters, logged as params.
    """
    from genreflow.tracking import start_pipeline_run

    if not tracking_uri:
        print("MLflow tracking is off (no tracking URI)")
        return ""
    path = "frozen-base" if freeze_base else "fine-tune"
    return start_pipeline_run(
        tracking_uri,
        experiment,
        run_name=pipeline_run,
        params={
            "source": source,
            "pretrained": pretrained or "random-init",
            "freeze_base": freeze_base,
            "clip_seconds": clip_seconds,
            "iterations": iterations,
            "batch_size": batch_size,
            "lr": lr,
            "mixup": mixup,
            "eval_every": eval_every,
            "seed": seed,
        },
        tags={
            "kfp.pipeline_run": pipeline_run,
            "profile": profile,
            "data.sha256": sha256 or "unpinned",
            "model": "Cnn14",
            "freeze_base": freeze_base,
            "path": path,
        },
    )
