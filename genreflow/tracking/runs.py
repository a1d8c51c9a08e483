"""The pipeline's parent run: opened by the first step, closed by the exit handler.

The run tree's life follows the pipeline's, whatever happens to the pods:
`start_pipeline_run` opens the parent (or adopts the platform's run when KFP's MLflow
integration set `MLFLOW_RUN_ID`) and tags it with the KFP run's id; `finish_pipeline_run`
logs the aggregate on it; `close_pipeline_run`, the DAG's exit handler, closes it with the
pipeline's true final status and ends any fold run a killed pod left RUNNING. The fold runs
under it are genreflow.tracking.fold_runs'.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from genreflow import __version__, storage
from genreflow.tracking.client import (
    DEFAULT_EXPERIMENT,
    TrackingError,
    client,
    installed_version,
    local_artifact_root,
    stringify,
    tracked,
)
from genreflow.tracking.names import (
    ADOPTED_TAG,
    FINAL_STATE_TAG,
    GIT_COMMIT_TAG,
    OWNER,
    OWNER_TAG,
    PARENT_TAG,
    PIPELINE_ROLE,
    PIPELINE_RUN_ID_TAG,
    ROLE_TAG,
)

# KFP's final task states -> MLflow run statuses.
RUN_STATUS = {
    "SUCCEEDED": "FINISHED",
    "FAILED": "FAILED",
    "CANCELED": "KILLED",
    "CANCELLED": "KILLED",
}


def provenance() -> dict[str, str]:
    """What a run needs to be reproduced: package, commit, interpreter and library versions."""
    info = {
        "genreflow_version": __version__,
        GIT_COMMIT_TAG: git_commit(),
        "python": platform.python_version(),
    }
    for package in ("torch", "torchlibrosa", "librosa", "numpy", "h5py", "kfp", "mlflow"):
        found = installed_version(package)  # mlflow: mlflow-skinny's in the runtime images
        if found:
            info[f"version.{package}"] = found
    return info


def git_commit() -> str:
    """The commit this code came from: baked into images as GENREFLOW_GIT_COMMIT, else git."""
    commit = os.environ.get("GENREFLOW_GIT_COMMIT")
    if commit:
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _experiment_id(store, name: str) -> str:
    experiment = store.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = local_artifact_root(store.tracking_uri)
    try:
        return store.create_experiment(name, artifact_location=root and root.as_uri())
    except Exception:  # created meanwhile by a parallel task
        return store.get_experiment_by_name(name).experiment_id


def inherited_run(store, what: str):
    """The run `MLFLOW_RUN_ID` names, or None; one that does not exist is an error."""
    run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
    if not run_id:
        return None
    try:
        return store.get_run(run_id)
    except Exception as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            raise TrackingError(
                f"MLFLOW_RUN_ID={run_id} names no run at "
                f"{storage.redacted(store.tracking_uri)} ({what})"
            ) from exc
        raise


def start_pipeline_run(
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    run_name: str | None = None,
    pipeline_run_id: str = "",
    params: dict | None = None,
    tags: dict | None = None,
) -> str:
    """Open the parent run of one pipeline run and return its id (it stays RUNNING).

    Where `MLFLOW_RUN_ID` is set (KFP's MLflow integration sets it to a run per task, nested
    under its run for the pipeline; a caller may set it to a run of its own), the pipeline
    logs into that tree instead of opening a second one: the parent is the platform's
    pipeline run (the task run's parent), else the caller's run itself. An adopted run is
    never closed by genreflow; its owner closes it (the final state is left as a tag).
    """

    def start() -> str:
        store = client(tracking_uri)
        all_tags = {ROLE_TAG: PIPELINE_ROLE, **provenance(), **(tags or {})}
        if pipeline_run_id:
            all_tags[PIPELINE_RUN_ID_TAG] = pipeline_run_id
        all_tags = stringify(all_tags)
        inherited = inherited_run(store, "the pipeline's parent run")
        if inherited is None:
            run = store.create_run(
                _experiment_id(store, experiment),
                run_name=run_name,
                tags={**all_tags, OWNER_TAG: OWNER},
            )
        else:
            platform_parent = inherited.data.tags.get(PARENT_TAG)
            run = store.get_run(platform_parent) if platform_parent else inherited
            print(
                f"MLflow: logging into the run MLFLOW_RUN_ID leads to ({run.info.run_id}), "
                "not opening a second run tree",
                file=sys.stderr,
            )
            all_tags[ADOPTED_TAG] = inherited.info.run_id
            for key, value in all_tags.items():
                store.set_tag(run.info.run_id, key, value)
        run_id = run.info.run_id
        existing = store.get_run(run_id).data.params
        for key, value in stringify(params or {}).items():
            if key not in existing:  # a param, once logged, cannot change
                store.log_param(run_id, key, value)
        return run_id

    return tracked(f"opening the parent run at {tracking_uri}", start)


def get_run(tracking_uri: str, run_id: str):
    """The run `run_id` (its info, params, tags and metrics)."""
    return tracked(f"reading run {run_id}", lambda: client(tracking_uri).get_run(run_id))


def latest_pipeline_run(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT):
    """The experiment's most recently started pipeline run (a parent), or None."""

    def find():
        store = client(tracking_uri)
        found = store.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = store.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{PIPELINE_ROLE}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    return tracked(f"looking for the latest pipeline run in {experiment}", find)


def find_pipeline_run(tracking_uri: str, pipeline_run_id: str):
    """The parent run tagged with this KFP run's id, or None (tracking never started)."""
    store = client(tracking_uri)
    runs = store.search_runs(
        [e.experiment_id for e in store.search_experiments()],
        filter_string=f"tags.`{PIPELINE_RUN_ID_TAG}` = '{pipeline_run_id}'"
        f" and tags.`{ROLE_TAG}` = '{PIPELINE_ROLE}'",
    )
    return runs[0] if runs else None


def close_pipeline_run(tracking_uri: str, pipeline_run_id: str, state: str) -> str | None:
    """The exit handler: end this KFP run's parent run with its final `state` (SUCCEEDED,
    FAILED, CANCELED) and end any fold run still RUNNING (a pod killed without a chance to
    say so): KILLED when the pipeline was canceled, else FAILED. Returns the parent's id.

    A run genreflow adopted (MLFLOW_RUN_ID) only gets the final state as a tag.
    """
    status = RUN_STATUS.get(state.upper(), "FAILED")

    def close() -> str | None:
        store = client(tracking_uri)
        parent = find_pipeline_run(tracking_uri, pipeline_run_id)
        if parent is None:
            print(f"MLflow: no parent run for pipeline run {pipeline_run_id}; nothing to close")
            return None
        parent_id = parent.info.run_id
        store.set_tag(parent_id, FINAL_STATE_TAG, state.upper())
        leftover = store.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'",
        )
        for run in leftover:
            if run.data.tags.get(OWNER_TAG) == OWNER:
                fold_status = "KILLED" if status == "KILLED" else "FAILED"
                store.set_terminated(run.info.run_id, fold_status)
                print(f"MLflow: fold run {run.info.run_id} was still RUNNING: {fold_status}")
        if parent.data.tags.get(OWNER_TAG) == OWNER:
            store.set_terminated(parent_id, status)
        print(f"MLflow: pipeline run {pipeline_run_id} ended {state}; parent run {parent_id}")
        return parent_id

    return tracked(f"closing the parent run of {pipeline_run_id}", close)


def finish_pipeline_run(
    tracking_uri: str,
    parent_run_id: str,
    *,
    metrics: dict[str, float],
    artifacts: Iterable[str | Path] = (),
    tags: dict | None = None,
    status: str | None = "FINISHED",
    keep: str = "",
) -> None:
    """Log the aggregate metrics and report on the parent run; close it with `status`
    (None: leave it to the exit handler, which knows the pipeline's final state)."""

    def finish() -> None:
        from mlflow.entities import Metric

        store = client(tracking_uri)
        now = int(time.time() * 1000)
        store.log_batch(
            parent_run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        )
        for key, value in stringify(tags or {}).items():
            store.set_tag(parent_run_id, key, value)
        for path in artifacts:
            store.log_artifact(parent_run_id, str(path))
        if status is not None:
            store.set_terminated(parent_run_id, status)

    tracked(f"finishing the parent run {parent_run_id}", finish, keep=keep)
