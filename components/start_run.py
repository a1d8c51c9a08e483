"""Open the pipeline's parent MLflow run, which every fold nests under."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_run(
    tracking_uri: str,
    experiment: str,
    pipeline_run: str,
    pipeline_run_id: str,
    kfp_ui: str,
    images: str,
    profile: str,
    protocol: str,
    selection: str,
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
    mlflow_run: dsl.Output[dsl.Markdown],
) -> str:
    """Return the id of a new parent run ("" when tracking is off).

    Args:
        tracking_uri: MLflow tracking URI ("" = no tracking).
        experiment: MLflow experiment name.
        pipeline_run: the KFP run's name: the parent's name and a tag to filter on.
        pipeline_run_id: the KFP run's id: a tag, by which the exit handler finds the run.
        kfp_ui: the KFP UI's address ("" = unknown): the parent links to the run's page.
        images: the images the steps run in (digests where the build gave them), a tag.
        profile: the recipe profile's name (demo, seed, custom), a tag.
        protocol: cv10 or filtered; selection: validation or heldout (tags and params).
        source, sha256, pretrained, freeze_base, clip_seconds, iterations, batch_size, lr, mixup,
            eval_every, seed: the pipeline's parameters, logged as params.
        mlflow_run: where the parent run is (Markdown, shown in the KFP UI).
    """
    from genreflow.data.download import expected_checksums
    from genreflow.tracking import _client, run_address, start_pipeline_run

    if not tracking_uri:
        print("MLflow tracking is off (no tracking URI)")
        with open(mlflow_run.path, "w") as f:
            f.write("MLflow tracking was off for this run (no tracking URI).\n")
        return ""
    path = "frozen-base" if freeze_base else "fine-tune"
    kfp_ui = kfp_ui.rstrip("/")
    run_id = start_pipeline_run(
        tracking_uri,
        experiment,
        run_name=pipeline_run,
        pipeline_run_id=pipeline_run_id,
        params={
            "protocol": protocol,
            "selection": selection,
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
            **({"kfp.run_url": f"{kfp_ui}/#/runs/details/{pipeline_run_id}"} if kfp_ui else {}),
            "images": images,
            "profile": profile,
            "protocol": protocol,
            "selection": selection,
            # The checksum itself where it is known ("original", an official URL).
            "data.sha256": expected_checksums(source, sha256 or None)[0] or "unpinned",
            "model": "Cnn14",
            "freeze_base": freeze_base,
            "path": path,
        },
    )
    experiment_id = _client(tracking_uri).get_run(run_id).info.experiment_id
    address = run_address(tracking_uri, experiment_id, run_id)
    with open(mlflow_run.path, "w") as f:
        f.write(f"# MLflow\n\nParent run `{run_id}` of experiment `{experiment}`: {address}\n")
    print(f"MLflow parent run: {address}")
    return run_id
