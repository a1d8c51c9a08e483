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
from dataclasses import dataclass

from kfp import dsl, kubernetes

from genreflow import recipe
from genreflow.cluster import (
    MLFLOW_CLIENT_LABEL,
    MLFLOW_CREDENTIALS_ENV,
    MLFLOW_CREDENTIALS_SECRET,
    PIPELINE_STEP_LABEL,
    REUSE_KEY_SECRET,
    REUSE_KEY_SECRET_ENV,
)
from genreflow.components.aggregate import aggregate
from genreflow.components.close_run import close_run
from genreflow.components.download import download
from genreflow.components.embed import embed
from genreflow.components.images import CPU_IMAGE, GPU_IMAGE, IMAGE_UID
from genreflow.components.pack import pack
from genreflow.components.start_run import start_run
from genreflow.components.train import train
from genreflow.components.train_head import train_head

COMPONENTS = (start_run, download, pack, embed, train_head, train, aggregate, close_run)
PIPELINE_NAME = "genreflow-cv"
FOLDS = list(range(1, 11))
# GPU requests land in the compiled YAML; kfp.local ignores them (with a warning).
ACCELERATOR = "nvidia.com/gpu"


@dataclass(frozen=True)
class StepResources:
    """What one step's pod gets: CPU and memory, requested and limited alike (the pod's
    resources are its own, Guaranteed, and Vertex AI sizes its machines from the limits),
    and how long it may run before Kubernetes stops it (its activeDeadlineSeconds)."""

    cpu: str
    memory: str
    timeout_seconds: int


# Every step's resources, in one place; `genreflow compile/submit --step NAME:memory=...`
# changes one for a compiled file. Memory: the peak RSS of each step's processes, measured
# on the demo profile's DAG at 30 s clips (100 clips, frozen base, kfp.local; infra/README.md,
# "Sizing the steps"): start-run 237 MiB, close-run 228, download under 100, pack 1116 (two
# workers; four CPUs run four, hence twice that), embed 2886, train-head 597, aggregate 1282
# (the frozen base and ten heads), with room for GTZAN's 1000 clips (pack streams them; the
# embeddings are 8 KiB a clip) and, for the fine-tune aggregate, the ten fine-tuned Cnn14s it holds
# (3.3 GB). The GPU steps keep the CPU and memory that feed one GPU. Timeouts: a few times
# the longest run seen (README.md's full-scale table; the seed's 30 minutes a fold on a
# V100), and for a fold the step's own three tries.
RESOURCES = {
    "start-run": StepResources(cpu="500m", memory="512Mi", timeout_seconds=600),
    "download": StepResources(cpu="1", memory="1Gi", timeout_seconds=3600),
    "pack": StepResources(cpu="4", memory="4Gi", timeout_seconds=3600),
    "embed": StepResources(cpu="8", memory="32G", timeout_seconds=2 * 3600),
    "train-head": StepResources(cpu="1", memory="2Gi", timeout_seconds=900),
    "train": StepResources(cpu="8", memory="32G", timeout_seconds=8 * 3600),
    "aggregate": StepResources(cpu="2", memory="8Gi", timeout_seconds=3600),
    "close-run": StepResources(cpu="500m", memory="512Mi", timeout_seconds=600),
}
# How long a finished run's workflow and pods stay on the cluster (their logs with them);
# KFP keeps the run's record and outputs either way.
PIPELINE_TTL_SECONDS = 3 * 86400
# A GPU step's local disk, beside the node's boot disk: the features file (0.38 GB for GTZAN
# as log-mel, 1.9 GB as waveforms), the pretrained checkpoint and the fold's checkpoints in
# the cache (genreflow.storage.cache_root: ~/.cache/genreflow of the images' user). An
# emptyDir, which the images' user can write: a fresh volume's root belongs to root, and
# kfp-kubernetes cannot set the fsGroup that would hand it over.
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
    image_cpu: str | None = None,
    image_gpu: str | None = None,
    gpu_node_selector: dict[str, str] | None = None,
    gpu_tolerations: list[dict] | None = None,
    mlflow_secret: str = MLFLOW_CREDENTIALS_SECRET,
    resources: dict[str, StepResources] | None = None,
    ttl_seconds: int = PIPELINE_TTL_SECONDS,
):
    """The pipeline function. Fixed when compiling: `parallelism` (folds at once), the
    images of the CPU and the GPU steps (None: the components' own, for kfp.local), the GPU
    steps' accelerator and node placement (a node selector, tolerations), the Kubernetes
    Secret whose keys sign the steps in to MLflow ("" for none; a Secret that is missing
    leaves the steps unsigned rather than unstartable), each step's resources and timeout
    (RESOURCES, with `resources` replacing entries), how long a finished run stays on the
    cluster. On Kubernetes every step runs as the images' non-root user and carries
    PIPELINE_STEP_LABEL, which its NetworkPolicy and admission policy select
    (infra/runner); a step that talks to MLflow also carries MLFLOW_CLIENT_LABEL, which
    MLflow's NetworkPolicy lets in. kfp.local ignores all of it but the images."""
    images = {CPU_IMAGE: image_cpu or CPU_IMAGE, GPU_IMAGE: image_gpu or GPU_IMAGE}
    step = functools.partial(_step, images=images, resources={**RESOURCES, **(resources or {})})
    on_gpu = functools.partial(
        _on_gpu,
        accelerator=accelerator,
        node_selector=gpu_node_selector or {},
        tolerations=gpu_tolerations or [],
    )
    tracked = functools.partial(_tracked, secret=mlflow_secret)
    images_tag = " ".join(dict.fromkeys(images.values()))

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
        tracked(step(closing_run, close_run))
        # Everything runs inside the exit handler, so that the MLflow run ends with the
        # pipeline's true final state even when a step fails or the run is terminated.
        with dsl.ExitHandler(closing_run, name="tracked"):
            parent = start_run(
                tracking_uri=tracking_uri,
                experiment=experiment,
                pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_ui=kfp_ui,
                images=images_tag,
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
            tracked(step(parent, start_run))

            fetched = download(source=source, sha256=sha256, md5=md5, cache_epoch=cache_epoch)
            step(fetched.set_display_name("download"), download)
            packed = pack(
                dataset=fetched.outputs["dataset"],
                clip_seconds=clip_seconds,
                representation=representation,
                cache_epoch=cache_epoch,
            )
            step(packed.set_display_name("pack features"), pack)
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
                on_gpu(step(embedded, embed))
                with dsl.ParallelFor(folds, parallelism=parallelism, name="folds") as fold:
                    heads = train_head(
                        embeddings=embedded.outputs["embeddings"], fold=fold, **fold_step, **head
                    )
                    heads.set_display_name("train head").set_caching_options(False)
                    heads.set_retry(num_retries=FOLD_RETRIES, backoff_duration=FOLD_RETRY_BACKOFF)
                    _signing(tracked(step(heads, train_head)))
                frozen_report = aggregate(
                    folds=dsl.Collected(heads.outputs["model"]),
                    embeddings=embedded.outputs["embeddings"],
                    **closing,
                )
                frozen_report.set_display_name("aggregate").set_caching_options(False)
                tracked(step(frozen_report, aggregate))

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
                    _signing(tracked(on_gpu(step(tuned, train))))
                tuned_report = aggregate(folds=dsl.Collected(tuned.outputs["model"]), **closing)
                tuned_report.set_display_name("aggregate").set_caching_options(False)
                tracked(step(tuned_report, aggregate))

    description = __doc__.splitlines()[0]
    # Argo's ttlStrategy: the finished run's workflow and pods are deleted after this.
    config = dsl.PipelineConfig(ttl_seconds_after_finished=ttl_seconds or None)
    return dsl.pipeline(name=PIPELINE_NAME, description=description, pipeline_config=config)(
        _with_recipe(cross_validation)
    )


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


def _step(task, component, *, images: dict[str, str], resources: dict[str, StepResources]):
    """What every step gets: its image, its CPU and memory (requests equal to limits), a
    timeout, the images' non-root user and the label that the pipeline's NetworkPolicy and
    admission policy select (infra/runner). KFP applies the rest of a restricted pod itself
    (no privilege escalation, no capabilities, the runtime's seccomp profile;
    kubeflow/pipelines#12782), which kfp-kubernetes cannot set."""
    task.set_container_image(images[component.component_spec.implementation.container.image])
    sized = resources[component.name]
    task.set_cpu_request(sized.cpu).set_cpu_limit(sized.cpu)
    task.set_memory_request(sized.memory).set_memory_limit(sized.memory)
    kubernetes.set_timeout(task, sized.timeout_seconds)
    kubernetes.set_security_context(
        task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True
    )
    for label, value in PIPELINE_STEP_LABEL.items():
        kubernetes.add_pod_label(task, label_key=label, label_value=value)
    return task


def _on_gpu(task, *, accelerator: str, node_selector: dict, tolerations: list[dict]):
    """One GPU, a local disk of its own, on the nodes that have the GPU."""
    task.set_accelerator_type(accelerator).set_accelerator_limit(1)
    kubernetes.empty_dir_mount(
        task, volume_name="scratch", mount_path=SCRATCH_PATH, size_limit=SCRATCH_SIZE
    )
    for label, value in node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in tolerations:
        kubernetes.add_toleration(task, **toleration)
    return task


def _tracked(task, *, secret: str):
    """A step that talks to MLflow: signed in (the Secret's keys as its environment; a
    Secret that is not there leaves them unset instead of keeping the pod from starting)
    and let through MLflow's NetworkPolicy (the client label)."""
    if secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=secret,
            secret_key_to_env=dict(MLFLOW_CREDENTIALS_ENV),
            optional=True,
        )
    for label, value in MLFLOW_CLIENT_LABEL.items():
        kubernetes.add_pod_label(task, label_key=label, label_value=value)
    return task


def _signing(task):
    """A fold step: it signs the fold run it logs and checks a run's record before reusing
    it, with the key of the Secret made at deploy time (infra/runner), which no other step
    gets. A Secret that is not there leaves the key unset: folds train, none is reused."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=REUSE_KEY_SECRET,
        secret_key_to_env=dict(REUSE_KEY_SECRET_ENV),
        optional=True,
    )
    return task
