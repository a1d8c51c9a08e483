"""Logged models (MLflow 3's LoggedModel) and the model registry's calls.

What is logged (the fold ensemble) is genreflow.serving's; when a version is registered or
promoted, genreflow.registry's. Here is only how MLflow is asked.
"""

from __future__ import annotations

from genreflow.tracking.client import client, global_tracking_uri, tracked


def log_pyfunc_model(tracking_uri: str, run_id: str, *, name: str, **log_model) -> str:
    """Log a pyfunc model as a LoggedModel of the run `run_id`, with the run's parameters
    beside it as log_model gives a model of an active run; its model id. `log_model`: the
    keyword arguments of mlflow.pyfunc.log_model (python_model, artifacts, ...). Not
    retried here: the caller retries the whole logging, of which this is a part."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput

    store = client(tracking_uri)
    run = store.get_run(run_id)
    model = store.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, params=dict(run.data.params)
    )
    store.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    with global_tracking_uri(tracking_uri):  # log_model talks to the process-wide URI
        mlflow.pyfunc.log_model(name=name, model_id=model.model_id, **log_model)
    return model.model_id


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
