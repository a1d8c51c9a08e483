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
    seed: int,
    iterations: int,
    batch_size: int,
    lr: float,
    mixup: bool,
    eval_every: int,
    precision: str,
    head_iterations: int,
    head_batch_size: int,
    head_lr: float,
    head_weight_decay: float,
    head_mixup: bool,
    head_eval_every: int,
    mlflow_run: dsl.Output[dsl.Markdown],
    representation: str = "waveform",
) -> str:
    """Return the id of a new parent run ("" when tracking is off).

    Args:
        tracking_uri: MLflow tracking URI ("" = the MLFLOW_TRACKING_URI the platform
            injects, else no tracking).
        experiment: MLflow experiment name.
        pipeline_run: the KFP run's name: the parent's name and a tag to filter on.
        pipeline_run_id: the KFP run's id: a tag, by which the exit handler finds the run.
        kfp_ui: the KFP UI's address ("" = unknown): the parent links to the run's page.
        images: the images the steps run in (digests where the build gave them), a tag.
        profile: the recipe profile's name (demo, seed, custom), a tag.
        protocol: cv10 or filtered; selection: validation or heldout (tags and params).
        source, sha256, pretrained, freeze_base, clip_seconds, seed, representation: the
            pipeline's parameters, logged as params.
        iterations, batch_size, lr, mixup, eval_every, precision: the fine-tune recipe;
            head_*: the head's (genreflow.recipe); the one the run takes is logged.
        mlflow_run: where the parent run is (Markdown, shown in the KFP UI).
    """
    arguments = {name: value for name, value in locals().items() if name != "mlflow_run"}
    from genreflow.recipe import PIPELINE_RECIPE
    from genreflow.steps.run import open_run
    from genreflow.tracking.addresses import print_addresses
    from genreflow.tracking.client import platform_tracking_uri

    recipe = {name: arguments.pop(name) for name, _, _ in PIPELINE_RECIPE}
    tracking_uri = platform_tracking_uri(arguments.pop("tracking_uri"))
    parent = open_run(tracking_uri, **arguments, recipe=recipe)
    with open(mlflow_run.path, "w") as markdown:
        markdown.write(parent.markdown)
    if parent.run_id:
        print_addresses(tracking_uri, parent.run_id)
    return parent.run_id
