"""The cross-validation pipeline: GTZAN -> features -> 10 folds in parallel -> report.

1. start_run  open the MLflow parent run (every fold nests under it)
2. download   fetch, verify and safely extract the dataset (cached)
3. pack       decode, resample to 32 kHz mono, pack clips into HDF5 as Cnn14's log-mel
              (representation=logmel, the default) or as waveforms (cached)
4. per fold   freeze_base: embed every clip once (cached), then train only the head
              otherwise: fine-tune the whole Cnn14 on a GPU
5. aggregate  pool the test predictions, report, log and register the fold ensemble
6. close_run  the exit handler: end the MLflow run with the pipeline's final state

`protocol` picks what a loop item means: cv10, the held-out fold of the seed's 10-fold
cross-validation; filtered, a repetition (seed + item - 1) of the fault-filtered split.

The recipe's parameters come from genreflow.recipe, beside the ones written out here: the
fine-tune recipe under its own names (iterations, batch_size, lr, mixup, eval_every,
precision), the head's under head_* names (head_iterations, ..., head_weight_decay), so
freeze_base=true trains every head with the head's recipe; `precision` serves both paths
(the frozen base's embed step computes in it too).
"""

import functools
import inspect

from kfp import dsl, kubernetes

from genreflow import recipe
from genreflow.cluster import MLFLOW_CLIENT_LABEL, MLFLOW_CREDENTIALS_ENV, MLFLOW_CREDENTIALS_SECRET
from genreflow.components.aggregate import aggregate
from genreflow.components.close_run import close_run
from genreflow.components.download import download
from genreflow.components.embed import embed
from genreflow.components.pack import pack
from genreflow.components.start_run import start_run
from genreflow.components.train import train
from genreflow.components.train_head import train_head

COMPONENTS = (start_run, download, pack, embed, train_head, train, aggregate, close_run)
PIPELINE_NAME = "genreflow-cv"
FOLDS = list(range(1, 11))
# GPU requests land in the compiled YAML; kfp.local ignores them (with a warning).
ACCELERATOR = "nvidia.com/gpu"
# Requests equal to limits: the pod's CPU and memory are its own (Guaranteed), and Vertex AI
# sizes its machines from the limits.
TRAIN_CPU, TRAIN_MEMORY = "8", "32G"
# A GPU step's local disk, a volume of its own beside the node's boot disk: the features
# file (0.38 GB for GTZAN as log-mel, 1.9 GB as waveforms), the pretrained checkpoint and
# the fold's checkpoints in the cache (genreflow.storage.cache_root: ~/.cache/genreflow of
# the images' user).
SCRATCH_PATH, SCRATCH_SIZE = "/home/genreflow/.cache/genreflow", "50Gi"
# KFP's cache serves download, pack and embed results (the other steps keep it off) only
# within one period of this many days: genreflow submit passes the period's number
# (cache_epoch), so a run in the next period computes them anew. The bucket's lifecycle
# rule must keep the pipeline root's objects longer than that (infra/terraform:
# kfp_root_retention_days, validated against this), or a cache hit would name deleted files.
CACHE_PERIOD_DAYS = 30
# What pack stores the clips as. The log-mel is the frozen front end's output, the same
# numbers as the waveform up to float16 rounding (tests/test_logmel.py), in a fifth of the
# bytes that every fine-tune fold downloads (bench/bench_features.py); "waveform" packs
# the seed's int16 clips, for a checkpoint whose frozen front end is not the standard one.
REPRESENTATION = "logmel"


def cache_epoch(now: float | None = None) -> str:
    """The number of the cache period `now` (a Unix time; default: now) falls in."""
    import time

    return str(int((time.time() if now is None else now) // 86400) // CACHE_PERIOD_DAYS)


# A fold task restarted by the platform (a lost pod; Vertex AI honours this, open-source
# KFP ignores it inside a ParallelFor: kubeflow/pipelines#12389) shares the fold's
# genreflow.retry.FOLD_TRIES with the step's own retries: 3 tries in all, whatever the backend.
FOLD_RETRIES = 2
FOLD_RETRY_BACKOFF = "30s"  # doubles on each retry


def build_pipeline(
    parallelism: int = 10,
    accelerator: str = ACCELERATOR,
    images: str = "",
    gpu_node_selector: dict[str, str] | None = None,
    gpu_tolerations: list[dict] | None = None,
    mlflow_secret: str = MLFLOW_CREDENTIALS_SECRET,
):
    """The pipeline function. Fixed when compiling: `parallelism` (folds at once), the GPU
    steps' accelerator and node placement (a node selector, tolerations), the Kubernetes
    Secret whose keys sign the steps in to MLflow ("" for none); `images` (the image
    references the steps run in) lands as a tag on the MLflow run. On Kubernetes every
    step that talks to MLflow carries MLFLOW_CLIENT_LABEL, which its NetworkPolicy lets in
    (infra/base/network-policy.yaml); kfp.local and Vertex AI ignore both."""
    on_gpu = functools.partial(
        _on_gpu,
        accelerator=accelerator,
        node_selector=gpu_node_selector or {},
        tolerations=gpu_tolerations or [],
    )
    tracked = functools.partial(_tracked, secret=mlflow_secret)
    images = images or " ".join(
        dict.fromkeys(c.component_spec.implementation.container.image for c in COMPONENTS)
    )

    def cross_validation(
        source: str,
        protocol: str = "cv10",
        selection: str = "validation",
        sha256: str = "",
        md5: str = "",
        pretrained: str = "",
        freeze_base: bool = False,
        clip_seconds: float = 30.0,
        representation: str = REPRESENTATION,
        seed: int = 0,
        folds: list[int] = FOLDS,
        min_folds: int = 0,  # 0: every fold must succeed
        reuse_folds: bool = True,
        tracking_uri: str = "",
        experiment: str = "genreflow-gtzan",
        registered_model: str = "genreflow-gtzan-cnn14",
        # a result chosen on test data (selection=heldout) or partial: registered only so
        register_anyway: bool = False,
        profile: str = "custom",
        kfp_ui: str = "",
        work_root: str = "",  # fine-tune folds' working state ("": the pipeline root's)
        cache_epoch: str = "",  # the cache period download/pack/embed results serve in
        **recipe_parameters,  # genreflow.recipe.pipeline_parameters(), see _with_recipe
    ):
        fine_tune = recipe.recipe_arguments(recipe.TrainConfig, recipe_parameters)
        head = recipe.recipe_arguments(recipe.HeadConfig, recipe_parameters)
        closing_run = close_run(
            tracking_uri=tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
        ).set_display_name("close MLflow run")
        closing_run.set_caching_options(False)
        tracked(closing_run)
        # Everything runs inside the exit handler, so that the MLflow run ends with the
        # pipeline's true final state even when a step fails or the run is terminated.
        with dsl.ExitHandler(closing_run, name="tracked"):
            parent = start_run(
                tracking_uri=tracking_uri,
                experiment=experiment,
                pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_ui=kfp_ui,
                images=images,
                profile=profile,
                protocol=protocol,
                selection=selection,
                source=source,
                sha256=sha256,
                pretrained=pretrained,
                freeze_base=freeze_base,
                clip_seconds=clip_seconds,
                representation=representation,
                seed=seed,
                **recipe_parameters,
            ).set_display_name("open MLflow run")
            parent.set_caching_options(False)
            tracked(parent)

            fetched = download(source=source, sha256=sha256, md5=md5, cache_epoch=cache_epoch)
            fetched.set_display_name("download")
            packed = pack(
                dataset=fetched.outputs["dataset"],
                clip_seconds=clip_seconds,
                representation=representation,
                cache_epoch=cache_epoch,
            )
            packed.set_display_name("pack features")
            fold_step = dict(
                protocol=protocol,
                selection=selection,
                seed=seed,
                reuse_folds=reuse_folds,
                expected_folds=folds,
                min_folds=min_folds,
                tracking_uri=tracking_uri,
                parent_run_id=parent.outputs["Output"],
            )
            closing = dict(
                expected_folds=folds,
                min_folds=min_folds,
                clip_seconds=clip_seconds,
                tracking_uri=tracking_uri,
                parent_run_id=parent.outputs["Output"],
                registered_model=registered_model,
                register_anyway=register_anyway,
            )

            with dsl.If(freeze_base == True, name="frozen-base"):  # noqa: E712 (a KFP condition)
                embedded = embed(
                    features=packed.outputs["features"],
                    pretrained=pretrained,
                    seed=seed,
                    precision=fine_tune["precision"],
                    cache_epoch=cache_epoch,
                ).set_display_name("embed every clip once")
                on_gpu(embedded)
                with dsl.ParallelFor(folds, parallelism=parallelism, name="folds") as fold:
                    heads = train_head(
                        embeddings=embedded.outputs["embeddings"], fold=fold, **fold_step, **head
                    )
                    heads.set_display_name("train head").set_caching_options(False)
                    heads.set_retry(num_retries=FOLD_RETRIES, backoff_duration=FOLD_RETRY_BACKOFF)
                    tracked(heads)
                frozen_report = aggregate(
                    folds=dsl.Collected(heads.outputs["model"]),
                    embeddings=embedded.outputs["embeddings"],
                    **closing,
                )
                frozen_report.set_display_name("aggregate").set_caching_options(False)
                tracked(frozen_report)

            with dsl.Else(name="fine-tune"):
                with dsl.ParallelFor(folds, parallelism=parallelism, name="folds") as fold:
                    tuned = train(
                        features=packed.outputs["features"],
                        fold=fold,
                        pretrained=pretrained,
                        work_root=work_root,
                        pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER,
                        **fold_step,
                        **fine_tune,
                    )
                    tuned.set_display_name("fine-tune fold").set_caching_options(False)
                    tuned.set_retry(num_retries=FOLD_RETRIES, backoff_duration=FOLD_RETRY_BACKOFF)
                    tracked(on_gpu(tuned))
                tuned_report = aggregate(folds=dsl.Collected(tuned.outputs["model"]), **closing)
                tuned_report.set_display_name("aggregate").set_caching_options(False)
                tracked(tuned_report)

    description = __doc__.splitlines()[0]
    return dsl.pipeline(name=PIPELINE_NAME, description=description)(_with_recipe(cross_validation))


def _with_recipe(pipeline_func):
    """`pipeline_func` with the recipe's parameters (genreflow.recipe.pipeline_parameters())
    in its signature in place of its **recipe_parameters: KFP reads a pipeline's parameters,
    their types and defaults from the signature, and calls it with them by position."""
    signature = inspect.signature(pipeline_func)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    added = [
        inspect.Parameter(name, keyword, default=default, annotation=kind)
        for name, kind, default in recipe.pipeline_parameters()
    ]
    names = [p.name for p in own + added]

    @functools.wraps(pipeline_func)
    def with_recipe(*args, **kwargs):
        return pipeline_func(**dict(zip(names, args, strict=False)), **kwargs)

    with_recipe.__signature__ = signature.replace(parameters=own + added)
    return with_recipe


def _on_gpu(task, *, accelerator: str, node_selector: dict, tolerations: list[dict]):
    """One GPU, the CPU and memory that keep it fed, a local disk of its own, on the nodes
    that have the GPU."""
    task.set_accelerator_type(accelerator).set_accelerator_limit(1)
    task.set_cpu_request(TRAIN_CPU).set_cpu_limit(TRAIN_CPU)
    task.set_memory_request(TRAIN_MEMORY).set_memory_limit(TRAIN_MEMORY)
    kubernetes.add_ephemeral_volume(
        task,
        volume_name="scratch",
        mount_path=SCRATCH_PATH,
        access_modes=["ReadWriteOnce"],
        size=SCRATCH_SIZE,
    )
    for label, value in node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in tolerations:
        kubernetes.add_toleration(task, **toleration)
    return task


def _tracked(task, *, secret: str):
    """A step that talks to MLflow: signed in (the Secret's keys as its environment) and let
    through MLflow's NetworkPolicy (the client label)."""
    if secret:
        kubernetes.use_secret_as_env(
            task, secret_name=secret, secret_key_to_env=dict(MLFLOW_CREDENTIALS_ENV)
        )
    for label, value in MLFLOW_CLIENT_LABEL.items():
        kubernetes.add_pod_label(task, label_key=label, label_value=value)
    return task
