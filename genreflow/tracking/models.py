"""Logged models (MLflow 3's LoggedModel) and the model registry's calls.

What is logged (the fold ensemble) is genreflow.serving's; when a version is registered or
promoted, genreflow.registry's. Here is only how MLflow is asked.
"""

from __future__ import annotations

import json
import time

from genreflow.tracking.client import client, global_tracking_uri, tracked
from genreflow.tracking.fold_runs import DIGEST_CHARS, fold_checkpoint_runs
from genreflow.tracking.names import (
    CHECKPOINT_MODEL_TAG,
    CHECKPOINT_PATH_TAG,
    DATASET_CONTEXT_TAG,
    PARENT_TAG,
    SHA256_TAG_PREFIX,
)


def log_pyfunc_model(
    tracking_uri: str, run_id: str, *, name: str, tags: dict[str, str], **log_model
) -> str:
    """Log a pyfunc model as a LoggedModel of the run `run_id`, with the run's parameters
    beside it as log_model gives a model of an active run, and `tags`; its model id.
    `log_model`: the keyword arguments of mlflow.pyfunc.log_model (python_model, artifacts,
    ...). Not retried here: the caller retries the whole logging, of which this is a part."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput

    store = client(tracking_uri)
    run = store.get_run(run_id)
    model = store.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params=dict(run.data.params),
        tags=tags,
    )
    store.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    with global_tracking_uri(tracking_uri):  # log_model talks to the process-wide URI
        mlflow.pyfunc.log_model(name=name, model_id=model.model_id, **log_model)
    return model.model_id


def model_files(tracking_uri: str, model_id: str) -> dict[str, int]:
    """Every file of the LoggedModel `model_id` -> its size in bytes."""

    def walk() -> dict[str, int]:
        store, found, folders = client(tracking_uri), {}, [None]
        while folders:
            for info in store.list_logged_model_artifacts(model_id, folders.pop()):
                if info.is_dir:
                    folders.append(info.path)
                else:
                    found[info.path] = info.file_size
        return found

    return tracked(f"listing the files of model {model_id}", walk)


def move_checkpoints(
    tracking_uri: str, parent_run_id: str, model_id: str, members: dict[int, tuple[str, str]]
) -> list[str]:
    """Keep each fold checkpoint once, in the model: for every fold run under the parent
    that holds its checkpoint itself (a reused fold's is in another pipeline's run, left
    alone) with the SHA-256 the model's copy has, point the run to the model's copy (tags:
    the model's id and the file's path in it; the SHA-256 tag stays), then delete the run's
    copy. `members`: fold -> (path in the model, SHA-256). The runs moved.

    Pointer first, delete second: a run is never left without its checkpoint somewhere."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    def move() -> list[str]:
        store = client(tracking_uri)
        moved = []
        for fold, (holder, sizes) in sorted(fold_checkpoint_runs(store, parent_run_id).items()):
            if fold not in members:
                continue
            path, sha256 = members[fold]
            name = path.rsplit("/", 1)[-1]
            run = store.get_run(holder)
            if run.data.tags.get(PARENT_TAG) != parent_run_id:
                continue  # reused from another pipeline's fold run: not this run's copy
            if name not in sizes or run.data.tags.get(SHA256_TAG_PREFIX + name) != sha256:
                continue
            store.set_tag(holder, CHECKPOINT_MODEL_TAG, model_id)
            store.set_tag(holder, CHECKPOINT_PATH_TAG, path)
            repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=tracking_uri)
            repository.delete_artifacts(name)
            moved.append(holder)
        return moved

    return tracked(f"moving the fold checkpoints into model {model_id}", move)


def log_model_metrics(
    tracking_uri: str,
    run_id: str,
    model_id: str,
    metrics: dict[str, float],
    *,
    dataset: tuple[str, str] | None,
) -> None:
    """Log `metrics` on the run `run_id`, linked to its LoggedModel `model_id` and evaluated
    on `dataset` (name, SHA-256), so that search_logged_models filters and ranks models by
    them; the dataset is also the run's input (context "evaluation")."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric

    name, digest = (dataset[0], dataset[1][:DIGEST_CHARS]) if dataset else (None, None)

    def log() -> None:
        store = client(tracking_uri)
        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, 0, model_id=model_id, dataset_name=name, dataset_digest=digest)
            for k, v in metrics.items()
        ]
        for start in range(0, len(batch), 500):  # the REST API caps a batch at 1000
            store.log_batch(run_id, metrics=batch[start : start + 500])
        if dataset:
            source = {"sha256": dataset[1]}
            entity = Dataset(
                name, digest, "external", json.dumps(source), profile=json.dumps(source)
            )
            tags = [InputTag(DATASET_CONTEXT_TAG, "evaluation"), InputTag("sha256", dataset[1])]
            store.log_inputs(run_id, [DatasetInput(entity, tags=tags)])

    tracked(f"logging the ensemble's metrics on run {run_id}", log)


def register_version(
    tracking_uri: str,
    name: str,
    model_id: str,
    *,
    run_id: str,
    tags: dict[str, str],
    description: str,
    alias: str,
) -> str:
    """Register the LoggedModel `model_id` (of the run `run_id`) as a new version of `name`
    (created if need be), with its tags and description, and give it `alias`; the version's
    number."""

    def register() -> str:
        store = client(tracking_uri)
        if not store.search_registered_models(filter_string=f"name = '{name}'"):
            try:
                store.create_registered_model(name)
            except Exception:  # created meanwhile by a parallel run
                pass
        # MLflow's database registry looks the LoggedModel up through the process-wide
        # tracking URI, not the client's: with a sqlite store (make run's) it would look in
        # another database and fail. Point it at this one while registering.
        with global_tracking_uri(tracking_uri):
            version = store.create_model_version(
                name,
                f"models:/{model_id}",
                run_id=run_id,
                tags=tags,
                description=description,
                model_id=model_id,
            )
        store.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    return tracked(f"registering {model_id} as a version of {name}", register)


def version_by_alias(store, name: str, alias: str):
    """The version of the registered model `name` that `alias` points at, or None.
    `store`: a `client`."""
    from mlflow.exceptions import MlflowException

    try:
        return store.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
