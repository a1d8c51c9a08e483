"""The cross-validation pipeline: GTZAN -> features -> 10 folds in parallel -> report.

1. start_run  open the MLflow parent run (every fold nests under it)
2. download   fetch, verify and safely extract the dataset (cached)
3. pack       decode, resample to 32 kHz mono, pack clips into HDF5 (cached)
4. per fold   freeze_base: embed every clip once (cached), then train only the head
              otherwise: fine-tune the whole Cnn14 on a GPU
5. aggregate  pool the test predictions, report, log and register the fold ensemble
6. close_run  the exit handler: end the MLflow run with the pipeline's final state

`protocol` picks what a loop item means: cv10, the held-out fold of the seed's 10-fold
cross-validation; filtered, a repetition (seed + item - 1) of the fault-filtered split.
"""

from kfp import dsl

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
TRAIN_CPU, TRAIN_MEMORY = "8", "32G"
FOLD_RETRIES = 2
FOLD_RETRY_BACKOFF = "30s"  # doubles on each retry


def build_pipeline(parallelism: int = 10, accelerator: str = ACCELERATOR, images: str = ""):
    """The pipeline function; `parallelism` (folds at once) is fixed when compiling, and
    `images` (the image references the steps run in) lands as a tag on the MLflow run."""
    images = images or " ".join(
        dict.fromkeys(c.component_spec.implementation.container.image for c in COMPONENTS)
    )

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def cross_validation(
        source: str,
        protocol: str = "cv10",
        selection: str = "validation",
        sha256: str = "",
        md5: str = "",
        pretrained: str = "",
        freeze_base: bool = False,
        clip_seconds: float = 30.0,
        iterations: int = 10000,
        batch_size: int = 32,
        lr: float = 1e-4,
        mixup: bool = True,
        eval_every: int = 200,
        seed: int = 0,
        precision: str = "auto",  # fine-tune: auto (bf16 where native), fp32 or bf16
        folds: list[int] = FOLDS,
        min_folds: int = 0,  # 0: every fold must succeed
        reuse_folds: bool = True,
        tracking_uri: str = "",
        experiment: str = "genreflow-gtzan",
        registered_model: str = "genreflow-gtzan-cnn14",
        profile: str = "custom",
        kfp_ui: str = "",
    ):
        closing_run = close_run(
            tracking_uri=tracking_uri, pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER
        ).set_display_name("close MLflow run")
        closing_run.set_caching_options(False)
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
                iterations=iterations,
                batch_size=batch_size,
                lr=lr,
                mixup=mixup,
                eval_every=eval_every,
                seed=seed,
            ).set_display_name("open MLflow run")
            parent.set_caching_options(False)

            fetched = download(source=source, sha256=sha256, md5=md5).set_display_name("download")
            packed = pack(dataset=fetched.outputs["dataset"], clip_seconds=clip_seconds)
            packed.set_display_name("pack features")
            recipe = dict(
                protocol=protocol,
                selection=selection,
                reuse_folds=reuse_folds,
                expected_folds=folds,
                min_folds=min_folds,
                iterations=iterations,
                batch_size=batch_size,
                lr=lr,
                mixup=mixup,
                eval_every=eval_every,
                seed=seed,
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
            )

            with dsl.If(freeze_base == True, name="frozen-base"):  # noqa: E712 (a KFP condition)
                embedded = embed(
                    features=packed.outputs["features"], pretrained=pretrained, seed=seed
                ).set_display_name("embed every clip once")
                _on_gpu(embedded, accelerator)
                with dsl.ParallelFor(folds, parallelism=parallelism, name="folds") as fold:
                    head = train_head(
                        embeddings=embedded.outputs["embeddings"], fold=fold, **recipe
                    )
                    head.set_display_name("train head").set_caching_options(False)
                    head.set_retry(num_retries=FOLD_RETRIES, backoff_duration=FOLD_RETRY_BACKOFF)
                frozen_report = aggregate(
                    folds=dsl.Collected(head.outputs["model"]),
                    embeddings=embedded.outputs["embeddings"],
                    **closing,
                )
                frozen_report.set_display_name("aggregate").set_caching_options(False)

            with dsl.Else(name="fine-tune"):
                with dsl.ParallelFor(folds, parallelism=parallelism, name="folds") as fold:
                    tuned = train(
                        features=packed.outputs["features"],
                        fold=fold,
                        pretrained=pretrained,
                        precision=precision,
                        **recipe,
                    )
                    tuned.set_display_name("fine-tune fold").set_caching_options(False)
                    tuned.set_retry(num_retries=FOLD_RETRIES, backoff_duration=FOLD_RETRY_BACKOFF)
                    _on_gpu(tuned, accelerator)
                tuned_report = aggregate(folds=dsl.Collected(tuned.outputs["model"]), **closing)
                tuned_report.set_display_name("aggregate").set_caching_options(False)

    return cross_validation


def _on_gpu(task, accelerator: str):
    """One GPU, and the CPU and memory that keep it fed."""
    task.set_accelerator_type(accelerator).set_accelerator_limit(1)
    task.set_cpu_request(TRAIN_CPU).set_memory_request(TRAIN_MEMORY)
    return task
