"""MLflow: one parent run per pipeline run, one nested child run per fold.

The run tree's life follows the pipeline's, whatever happens to the pods:

- `start_pipeline_run` opens the parent (or adopts the platform's run when KFP's MLflow
  integration set `MLFLOW_RUN_ID`) and tags it with the KFP run's id;
- `tracked_fold` opens a fold's child run when the fold starts, retries the training
  in-step (KFP ignores `set_retry` inside a ParallelFor on open-source backends), and ends
  the run FINISHED, FAILED, or KILLED on SIGTERM; a fold already trained on the same inputs
  with the same recipe is reused (copied under the new parent, tagged `reused`);
- `close_pipeline_run`, the DAG's exit handler, closes the parent with the pipeline's
  true final status and ends any fold run a killed pod left RUNNING.

Everything goes through an explicit `MlflowClient(tracking_uri)` rather than MLflow's
global "active run": a step that inherits `MLFLOW_RUN_ID` must not silently log into, or
close, a run it does not own (mlflow/mlflow#15713, #13874).

Losing the tracking server must not lose the training: every call retries with back-off,
then fails with a `TrackingError` that says where the step's local outputs are.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from genreflow import __version__, storage
from genreflow.atomic import move_into_place, write_atomic
from genreflow.errors import GenreflowError
from genreflow.fold_result import (
    BEST,
    FAILED,
    FINE_TUNE,
    FROZEN_BASE,
    HEAD,
    METRICS,
    PREDICTIONS,
    SELECTED_CHECKPOINT,
    SUMMARY,
    folds_required,
    read_failure,
    read_metrics,
    read_summary,
    write_failure,
)
from genreflow.retry import FOLD_TRIES, is_transient, retry_transient

T = TypeVar("T")

DEFAULT_EXPERIMENT = "genreflow-gtzan"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `genreflow ui` (make ui) serves a local store
# MLflow 3 opens an experiment in its GenAI view (traces) and remembers the last view
# chosen; this query opens the classic one ("Model training": the runs table, a run's
# metrics and child runs). Checked with MLflow 3.17's UI in a browser.
CLASSIC_VIEW = "workflowType=machine_learning"
RETRY_ATTEMPTS = 4
RETRY_FIRST_DELAY_SECONDS = 2.0
# A fold's training: a transient failure (genreflow.retry) costs one retry from the last
# checkpoint, not the fold; FOLD_TRIES in all, task restarts included (TRIES_TAG).
FOLD_RETRY_FIRST_DELAY_SECONDS = 30.0
TRIES_TAG = "genreflow.tries"
# Under the pipeline root, beside the runs' folders: fine-tune folds' working state.
WORK_FOLDER = "genreflow-work"
# What a fold's child run keeps: best.pth is the selected fine-tuned fold model (chosen on
# the validation split), head.pth the frozen-base path's head. last.pth stays in the fold
# folder: uploading a second 330 MB checkpoint per fold buys nothing.
FOLD_ARTIFACTS = (METRICS, PREDICTIONS, SUMMARY, BEST, HEAD)
CHECKPOINTS = (BEST, HEAD)
# A fold run's headline metrics: summary.json's key -> the metric's name. summary.json's
# peak_test_accuracy is left out: chosen on the test rows, it would rank runs on an
# optimistic number (the test_accuracy curve holds it). The selected checkpoint's
# validation accuracy has a name of its own: as valid_accuracy at the last step it would
# put a second point on the curve's last step.
SUMMARY_METRICS = {
    "final_accuracy": "final_accuracy",
    "valid_accuracy": "selected_valid_accuracy",
    "selected_iteration": "selected_iteration",
    "clips_per_second": "clips_per_second",
    "wall_seconds": "wall_seconds",
}
SUMMARY_TAGS = ("path", "protocol", "selection", "split_sha256", "data_sha256")
# The curve a fold logs at every evaluation, as it happens (LiveLog), iteration as step.
CURVE = ("train_loss", "valid_accuracy", "test_accuracy")
# Live points retry a blip briefly: they are sent again from metrics.csv at the end anyway.
LIVE_ATTEMPTS = 3
LIVE_FIRST_DELAY_SECONDS = 1.0
# The most a fold's end waits for its queued live points: well inside the grace period a
# stopped pod gets (Kubernetes: 30 s) before its run must be ended KILLED.
LIVE_CLOSE_SECONDS = 10.0
SYSTEM_METRICS_SECONDS = 10.0
DIGEST_CHARS = 16
DATASET_CONTEXT_TAG = "mlflow.data.context"

ROLE_TAG = "genreflow.role"  # "pipeline" on parents, "fold" on children
OWNER_TAG = "genreflow.owner"  # "genreflow" on runs genreflow created, and so may close
PIPELINE_RUN_ID_TAG = "kfp.pipeline_run_id"
FOLD_KEY_TAG = "genreflow.fold_key"
REUSED_FROM_TAG = "genreflow.reused_from"
FINAL_STATE_TAG = "genreflow.final_state"
LOGGED_TAG = "genreflow.logged"  # set last: a fold run whose outputs are all there
# genreflow.sha256.<artifact>: each fold file's SHA-256 as logged, checked when it is fetched
SHA256_TAG_PREFIX = "genreflow.sha256."
ADOPTED_TAG = "genreflow.adopted_from"  # the MLFLOW_RUN_ID the parent was adopted through
PARENT_TAG = "mlflow.parentRunId"
# KFP's final task states -> MLflow run statuses.
RUN_STATUS = {
    "SUCCEEDED": "FINISHED",
    "FAILED": "FAILED",
    "CANCELED": "KILLED",
    "CANCELLED": "KILLED",
}


class TrackingError(GenreflowError):
    """The tracking server could not be reached or refused a request."""


def default_tracking_uri(workspace: str | Path = "workspace") -> str:
    """`MLFLOW_TRACKING_URI` when set, else workspace/mlflow.db (the embedded default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Where a sqlite store with no server keeps its runs' artifacts: beside the database
    (workspace/mlartifacts for the default), not MLflow's ./mlruns of whatever folder a
    step ran in. None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    return database.resolve().parent / "mlartifacts"


def ui_address(tracking_uri: str, ui: str = "") -> str:
    """The MLflow UI that shows `tracking_uri`'s runs: `ui` when given, the tracking server
    itself, else the address `genreflow ui` (make ui) serves a database or folder at."""
    if ui:
        return ui.rstrip("/")
    if tracking_uri.startswith(("http://", "https://")):
        return storage.redacted(tracking_uri).rstrip("/")  # shown: never a password
    return DEFAULT_UI


def ui_hint(tracking_uri: str) -> str:
    """How to start the UI those addresses need ("" where the tracking server serves it)."""
    if tracking_uri.startswith(("http://", "https://")):
        return ""
    shown = storage.redacted(tracking_uri)
    return f"serve them with `make ui` or `genreflow ui --tracking-uri {shown}`"


def run_address(tracking_uri: str, experiment_id: str, run_id: str, ui: str = "") -> str:
    """A run's page in the MLflow UI, in its classic view (metrics, child runs, artifacts)."""
    base = ui_address(tracking_uri, ui)
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{CLASSIC_VIEW}"


def runs_table_address(tracking_uri: str, experiment_id: str, ui: str = "") -> str:
    """The experiment's runs table (each pipeline run a row, its folds nested under it)."""
    return f"{ui_address(tracking_uri, ui)}/#/experiments/{experiment_id}?{CLASSIC_VIEW}"


def pipeline_addresses(tracking_uri: str, parent_run_id: str, ui: str = "") -> dict[str, str]:
    """Where to look at one pipeline run in the MLflow UI: the parent run, the experiment's
    runs table, and, once folds are logged, the folds side by side (params and metrics) and
    their test accuracy curves in one chart. Keys: parent run, runs table, folds compared,
    fold curves."""
    from urllib.parse import quote

    def read() -> tuple[str, list[str]]:
        client = _client(tracking_uri)
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        children = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ROLE_TAG}` = 'fold'",
        )
        folds = sorted(children, key=lambda r: int(r.data.tags.get("fold", "0")))
        return experiment_id, [r.info.run_id for r in folds]

    experiment_id, folds = _tracked(f"reading run {parent_run_id}", read)
    base = ui_address(tracking_uri, ui)
    addresses = {
        "parent run": run_address(tracking_uri, experiment_id, parent_run_id, ui),
        "runs table": runs_table_address(tracking_uri, experiment_id, ui),
    }
    if folds:
        compact = functools.partial(json.dumps, separators=(",", ":"))
        runs, experiments = quote(compact(folds)), quote(compact([experiment_id]))
        addresses["folds compared"] = f"{base}/#/compare-runs?runs={runs}&experiments={experiments}"
        curve = quote(compact(CURVE[-1]))
        addresses["fold curves"] = (
            f"{base}/#/metric?runs={runs}&metric={curve}&experiments={experiments}"
            f"&plot_metric_keys={quote(compact([CURVE[-1]]))}"
        )
    return addresses


def print_addresses(tracking_uri: str, parent_run_id: str, ui: str = "") -> None:
    """Print `pipeline_addresses`, one a line, and how to serve them where that is needed
    (no `ui` given and no tracking server)."""
    for what, address in pipeline_addresses(tracking_uri, parent_run_id, ui).items():
        print(f"MLflow {what}: {address}")
    if not ui and (hint := ui_hint(tracking_uri)):
        print(f"  ({hint})")


def latest_pipeline_run(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT):
    """The experiment's most recently started pipeline run (a parent), or None."""

    def find():
        client = _client(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'pipeline'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    return _tracked(f"looking for the latest pipeline run in {experiment}", find)


def _client(tracking_uri: str):
    # MLflow's own HTTP retries back off for minutes; ours are bounded and say what failed.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow prints each ended run's page with the tracking URI as given, password and all;
    # genreflow says where runs are itself, redacted (run_address).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow.tracking import MlflowClient

    storage.refuse_userinfo(tracking_uri, what="tracking URI", instead=storage.TRACKING_CREDENTIALS)
    return MlflowClient(tracking_uri=tracking_uri)


def retrying(
    what: str,
    fn: Callable[[], T],
    *,
    keep: str = "",
    attempts: int | None = None,
    first_delay: float | None = None,
    error: type[GenreflowError] | None = None,
) -> T:
    """Call fn, retrying a transient failure (genreflow.retry.is_transient: the network,
    the server) with exponential back-off; then raise `error` (TrackingError) naming
    `what`. Anything else (bad input, a refused request, a bug) is raised at once."""
    attempts = attempts or RETRY_ATTEMPTS
    delay = RETRY_FIRST_DELAY_SECONDS if first_delay is None else first_delay
    error = error or TrackingError
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            said = storage.redacted_text(str(exc))  # MLflow's messages quote the server's URL
            if attempt == attempts:
                where = f"; local outputs are intact in {keep}" if keep else ""
                raise error(f"{what} failed after {attempts} attempts: {said}{where}") from exc
            print(
                f"{what} failed ({type(exc).__name__}: {said}); retry {attempt}/{attempts - 1}"
                f" in {delay:.0f} s",
                file=sys.stderr,
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _tracked(what: str, fn: Callable[[], T], keep: str = "") -> T:
    return retrying(f"MLflow: {storage.redacted_text(what)}", fn, keep=keep)


def provenance() -> dict[str, str]:
    """What a run needs to be reproduced: package, commit, interpreter and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    info = {
        "genreflow_version": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
    }
    for package in ("torch", "torchlibrosa", "librosa", "numpy", "h5py", "kfp", "mlflow"):
        try:
            info[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
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


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = local_artifact_root(client.tracking_uri)
    try:
        return client.create_experiment(name, artifact_location=root and root.as_uri())
    except Exception:  # created meanwhile by a parallel task
        return client.get_experiment_by_name(name).experiment_id


def _stringify(params: dict) -> dict[str, str]:
    """Values as MLflow stores them, every URI in them redacted (a signed URL's query,
    user:password@): everything genreflow records on a run goes through here."""
    return {
        k: storage.redacted_text(v if isinstance(v, str) else json.dumps(v))
        for k, v in params.items()
    }


def _inherited_run(client, what: str):
    """The run `MLFLOW_RUN_ID` names, or None; one that does not exist is an error."""
    run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            raise TrackingError(
                f"MLFLOW_RUN_ID={run_id} names no run at "
                f"{storage.redacted(client.tracking_uri)} ({what})"
            ) from exc
        raise


# --- the parent run ------------------------------------------------------------------------
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
        client = _client(tracking_uri)
        all_tags = {ROLE_TAG: "pipeline", **provenance(), **(tags or {})}
        if pipeline_run_id:
            all_tags[PIPELINE_RUN_ID_TAG] = pipeline_run_id
        all_tags = _stringify(all_tags)
        inherited = _inherited_run(client, "the pipeline's parent run")
        if inherited is None:
            run = client.create_run(
                _experiment_id(client, experiment),
                run_name=run_name,
                tags={**all_tags, OWNER_TAG: "genreflow"},
            )
        else:
            platform_parent = inherited.data.tags.get(PARENT_TAG)
            run = client.get_run(platform_parent) if platform_parent else inherited
            print(
                f"MLflow: logging into the run MLFLOW_RUN_ID leads to ({run.info.run_id}), "
                "not opening a second run tree",
                file=sys.stderr,
            )
            all_tags[ADOPTED_TAG] = inherited.info.run_id
            for key, value in all_tags.items():
                client.set_tag(run.info.run_id, key, value)
        run_id = run.info.run_id
        existing = client.get_run(run_id).data.params
        for key, value in _stringify(params or {}).items():
            if key not in existing:  # a param, once logged, cannot change
                client.log_param(run_id, key, value)
        return run_id

    return _tracked(f"opening the parent run at {tracking_uri}", start)


def open_pipeline_run(parameters: dict, markdown: str | Path) -> str:
    """The pipeline's first step: open its parent run, logging the pipeline's `parameters`
    (the recipe of the path it takes, not the other's) and tagging it; write where the run
    is to `markdown` (KFP shows it). Returns the run's id, "" when tracking is off.

    `parameters` are the start step's inputs: tracking_uri, experiment, pipeline_run (the
    KFP run's name), pipeline_run_id, kfp_ui, images, profile, protocol, selection, source,
    sha256, pretrained, freeze_base, clip_seconds, seed and the recipe's parameters.
    """
    from genreflow.data.download import expected_checksums
    from genreflow.recipe import other_path_parameters

    p = dict(parameters)
    tracking_uri, experiment = p.pop("tracking_uri"), p.pop("experiment")
    if not tracking_uri:
        print("MLflow tracking is off (no tracking URI)")
        Path(markdown).write_text("MLflow tracking was off for this run (no tracking URI).\n")
        return ""
    pipeline_run, pipeline_run_id = p.pop("pipeline_run"), p.pop("pipeline_run_id")
    kfp_ui = p.pop("kfp_ui").rstrip("/")
    images, profile, sha256 = p.pop("images"), p.pop("profile"), p.pop("sha256")
    for unused in other_path_parameters(p["freeze_base"]):
        p.pop(unused, None)
    p["pretrained"] = p["pretrained"] or "random-init"
    tags = {
        "kfp.pipeline_run": pipeline_run,
        **({"kfp.run_url": f"{kfp_ui}/#/runs/details/{pipeline_run_id}"} if kfp_ui else {}),
        "images": images,
        "profile": profile,
        "protocol": p["protocol"],
        "selection": p["selection"],
        # The checksum itself where it is known ("original", an official URL).
        "data.sha256": expected_checksums(p["source"], sha256 or None)[0] or "unpinned",
        "model": "Cnn14",
        "freeze_base": p["freeze_base"],
        "path": FROZEN_BASE if p["freeze_base"] else FINE_TUNE,
    }
    run_id = start_pipeline_run(
        tracking_uri,
        experiment,
        run_name=pipeline_run,
        pipeline_run_id=pipeline_run_id,
        params=p,
        tags=tags,
    )
    addresses = pipeline_addresses(tracking_uri, run_id)
    hint = ui_hint(tracking_uri)
    Path(markdown).write_text(
        f"# MLflow\n\nParent run `{run_id}` of experiment `{experiment}`:\n\n"
        + "".join(f"- {what}: {address}\n" for what, address in addresses.items())
        + (f"\n({hint})\n" if hint else "")
    )
    print_addresses(tracking_uri, run_id)
    return run_id


def find_pipeline_run(tracking_uri: str, pipeline_run_id: str):
    """The parent run tagged with this KFP run's id, or None (tracking never started)."""
    client = _client(tracking_uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{PIPELINE_RUN_ID_TAG}` = '{pipeline_run_id}'"
        f" and tags.`{ROLE_TAG}` = 'pipeline'",
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
        client = _client(tracking_uri)
        parent = find_pipeline_run(tracking_uri, pipeline_run_id)
        if parent is None:
            print(f"MLflow: no parent run for pipeline run {pipeline_run_id}; nothing to close")
            return None
        parent_id = parent.info.run_id
        client.set_tag(parent_id, FINAL_STATE_TAG, state.upper())
        leftover = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'",
        )
        for run in leftover:
            if run.data.tags.get(OWNER_TAG) == "genreflow":
                fold_status = "KILLED" if status == "KILLED" else "FAILED"
                client.set_terminated(run.info.run_id, fold_status)
                print(f"MLflow: fold run {run.info.run_id} was still RUNNING: {fold_status}")
        if parent.data.tags.get(OWNER_TAG) == "genreflow":
            client.set_terminated(parent_id, status)
        print(f"MLflow: pipeline run {pipeline_run_id} ended {state}; parent run {parent_id}")
        return parent_id

    return _tracked(f"closing the parent run of {pipeline_run_id}", close)


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

        client = _client(tracking_uri)
        now = int(time.time() * 1000)
        client.log_batch(
            parent_run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        )
        for key, value in _stringify(tags or {}).items():
            client.set_tag(parent_run_id, key, value)
        for path in artifacts:
            client.log_artifact(parent_run_id, str(path))
        if status is not None:
            client.set_terminated(parent_run_id, status)

    _tracked(f"finishing the parent run {parent_run_id}", finish, keep=keep)


def report_step(
    fold_dirs: list[str],
    results: str | Path,
    *,
    expected_folds: list[int],
    min_folds: int,
    clip_seconds: float,
    tracking_uri: str,
    parent_run_id: str,
    registered_model: str,
    register_anyway: bool = False,
    base: str | Path | None = None,
) -> dict:
    """The pipeline's last step: the report into `results` (genreflow.aggregate), then, when
    tracking, the fold ensemble logged as the parent run's model (genreflow.serving) and
    registered as `registered_model` (unless ""; a result chosen on test data or partial
    only with `register_anyway`, see genreflow.registry), and the aggregate metrics and
    report logged on the parent run, which stays open for the exit handler. `base`: the
    frozen base the folds' heads share. Returns the report."""
    from genreflow.aggregate import aggregate, flat_metrics
    from genreflow.audio import clip_samples
    from genreflow.registry import register_version, registration_refusal, version_tags
    from genreflow.serving import log_ensemble

    needed = folds_required(min_folds, expected_folds)
    report = aggregate(fold_dirs, results, expected_folds=expected_folds, min_folds=needed)
    if not tracking_uri:
        return report
    # The folds the report used (a failed fold may still hold a checkpoint), each with the
    # checkpoint its path selects: best.pth, or head.pth beside the shared base.
    checkpoints = {
        int(row["fold"]): Path(row["dir"])
        / SELECTED_CHECKPOINT[read_summary(row["dir"]).get("path", FINE_TUNE)]
        for row in report["folds"]
    }
    logged = log_ensemble(
        tracking_uri,
        parent_run_id,
        checkpoints,
        clip_samples=clip_samples(clip_seconds),
        base=base,
        workdir=str(results) + ".mlflow",
    )
    print(
        f"fold ensemble logged as {logged.model_uri}: {len(logged.referenced)} checkpoint(s) "
        f"read from their fold runs, stored in the model: {', '.join(logged.stored) or 'none'}"
    )
    refusal = registration_refusal(report)
    if registered_model and refusal and not register_anyway:
        print(f"not registered as {registered_model}: {refusal} (register_anyway=true does)")
    elif registered_model:
        parent = _tracked(
            "reading the parent run", lambda: _client(tracking_uri).get_run(parent_run_id)
        )
        tags = version_tags(
            report,
            parent_run_id=parent_run_id,
            git_commit=parent.data.tags.get("git_commit") or git_commit(),
        )
        number = register_version(
            tracking_uri, registered_model, logged.model_id, parent_run_id=parent_run_id, tags=tags
        )
        print(f"registered as models:/{registered_model}/{number} (alias candidate)")
    finish_pipeline_run(
        tracking_uri,
        parent_run_id,
        metrics=flat_metrics(report),
        artifacts=[results],
        tags=report_tags(report),
        status=None,  # the exit handler closes it with the pipeline's final state
        keep=str(results),
    )
    return report


def report_tags(report: dict) -> dict[str, str]:
    """The parent's tags from the aggregate report: what produced it and on which data."""
    tags = {"partial": json.dumps(bool(report.get("partial")))}
    for key, tag in (
        ("protocol", "protocol"),
        ("selection", "selection"),
        ("data_sha256", "data.sha256"),
        ("split_sha256", "split.sha256"),
    ):
        if report.get(key):
            tags[tag] = str(report[key])
    return tags


# --- fold runs -----------------------------------------------------------------------------
class Terminated(SystemExit):
    """SIGTERM arrived (a pod being stopped): unwinds the step so its run ends KILLED."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame):
    raise Terminated()


def fold_key(inputs: Iterable[str | Path], settings: dict) -> str:
    """What a fold's result depends on: its input files' content, its settings (fold,
    protocol, recipe, ...) and the code's version. Equal keys give equal results."""
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(bytes.fromhex(input_sha256(path)))
    code = {"genreflow_version": __version__, "code_sha256": code_sha256()}
    digest.update(json.dumps({**settings, **code}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache
def code_sha256() -> str:
    """The installed genreflow package's source, hashed: a fold trained by other code
    (a new commit, or an uncommitted edit in a working checkout) is never reused."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def input_sha256(path: str | Path) -> str:
    """The SHA-256 of a fold's input file, hashed once per process while the file stays
    the same: the fold's key and its dataset input both need it (seconds for GBs)."""
    stat = os.stat(path)
    return _sha256_of_version(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return storage.sha256_of(path)


def fold_run_name(fold: int) -> str:
    """fold-01 .. fold-10: run names that sort in the runs table as the folds do."""
    return f"fold-{fold:02d}"


def input_datasets(inputs: Iterable[str | Path]):
    """The fold's input files (packed features, or embeddings) as MLflow dataset inputs:
    named by the file, the first DIGEST_CHARS hex digits of its SHA-256 as the digest (the
    store keeps 36 characters), the whole checksum and the size in its profile and as a
    tag on the input."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = []
    for path in inputs:
        sha256 = input_sha256(path)
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(path))
        profile = {"sha256": sha256, "bytes": os.path.getsize(path)}
        dataset = Dataset(
            name=Path(path).name,
            digest=sha256[:DIGEST_CHARS],
            source_type=source._get_source_type(),
            source=source.to_json(),
            profile=json.dumps(profile),
        )
        tags = [InputTag(DATASET_CONTEXT_TAG, "training"), InputTag("sha256", sha256)]
        datasets.append(DatasetInput(dataset, tags=tags))
    return datasets


class LiveLog:
    """A fold's curve on its run while it trains: at each evaluation, train_loss,
    valid_accuracy and test_accuracy with the iteration as step and the time they were
    measured; first, the fold's dataset inputs.

    A background thread sends them, so a slow or absent tracking server never holds the
    training up; what queued up meanwhile goes in one request. It retries a blip as every
    tracking call does (`retrying`, shorter); a failure that remains is said once, the fold
    trains on, later points are tried once each, quietly, and whatever did not arrive is
    logged from metrics.csv when the fold ends (FoldRun.log_outputs). A step the run holds
    already (a retried try, a restarted step) is not sent twice.
    """

    def __init__(self, tracking_uri: str, run_id: str, fold: int, *, datasets=()):
        self.tracking_uri, self.run_id, self.fold = tracking_uri, run_id, fold
        self.failing = False
        self._closed = False
        self._datasets = list(datasets)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._send, name=f"genreflow-live-fold-{fold}", daemon=True
        )
        self._thread.start()

    def evaluation(self, row: dict) -> None:
        """One evaluation (a metrics.csv row, today's names); returns at once."""
        if self._closed:
            return
        from mlflow.entities import Metric

        step, now = int(row["iteration"]), int(time.time() * 1000)
        metrics = [
            Metric(k, float(row[k]), now, step) for k in CURVE if row.get(k) not in (None, "")
        ]
        self._queue.put((step, metrics))

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued (waiting at most `timeout` seconds), then stop."""
        self._queue.put(None)
        self._thread.join(LIVE_CLOSE_SECONDS if timeout is None else timeout)
        self._closed = True
        if self._thread.is_alive():
            print(
                f"MLflow: fold {self.fold}'s live curve is still being sent; the fold's "
                "final log takes over",
                file=sys.stderr,
            )

    def _send(self) -> None:
        client = _client(self.tracking_uri)
        if self._datasets:
            self._try("dataset inputs", lambda: client.log_inputs(self.run_id, self._datasets))
        sent = self._steps_on_run(client)
        done = False
        while not done:
            batch = [self._queue.get()]
            while not self._queue.empty():  # everything queued meanwhile, in one request
                batch.append(self._queue.get())
            done = batch[-1] is None
            points = {step: metrics for step, metrics in filter(None, batch) if step not in sent}
            if self._closed or not points:
                continue
            steps = sorted(points)
            metrics = [m for step in steps for m in points[step]]
            what = f"metrics of iteration {steps[0]}" + (
                f" to {steps[-1]}" if len(steps) > 1 else ""
            )
            if self._try(what, functools.partial(self._log_batch, client, metrics)):
                sent.update(steps)

    def _log_batch(self, client, metrics: list) -> None:
        for start in range(0, len(metrics), 900):  # the REST API caps a batch at 1000
            client.log_batch(self.run_id, metrics=metrics[start : start + 900])

    def _try(self, what: str, send: Callable[[], object]) -> bool:
        """Send; True when it arrived. Never raises: a live point never fails the fold."""
        what = f"MLflow: fold {self.fold}'s live {what}"
        try:
            if self.failing:  # one quiet try each while the server is away
                send()
            else:
                retrying(what, send, attempts=LIVE_ATTEMPTS, first_delay=LIVE_FIRST_DELAY_SECONDS)
        except Exception as exc:  # noqa: BLE001
            if not self.failing:
                self.failing = True
                print(
                    f"{what} could not be logged ({type(exc).__name__}: {exc}); the fold trains "
                    "on, and what is missing is logged when it ends",
                    file=sys.stderr,
                )
            return False
        if self.failing:
            self.failing = False
            print(f"MLflow: fold {self.fold}'s live curve arrives again", file=sys.stderr)
        return True

    def _steps_on_run(self, client) -> set:
        """The steps whose curve the run holds already (a retried or restarted fold)."""
        try:
            if CURVE[-1] not in client.get_run(self.run_id).data.metrics:
                return set()
            return {m.step for m in client.get_metric_history(self.run_id, CURVE[-1])}
        except Exception:  # noqa: BLE001 - unknown: send them all; the server keeps both
            return set()


def _system_metrics(tracking_uri: str, run_id: str):
    """MLflow's system metrics monitor (CPU, memory, disk, network; the GPU where pynvml
    is installed) sampling into the run every SYSTEM_METRICS_SECONDS (or
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), started; None where it cannot run."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=SYSTEM_METRICS_SECONDS,
            resume_logging=True,  # a restarted step continues the steps, not from 0
            tracking_uri=tracking_uri,
        )
    except Exception as exc:  # noqa: BLE001 - monitoring never fails the fold
        print(f"MLflow: no system metrics for run {run_id} ({exc})", file=sys.stderr)
        return None
    monitor.start()
    return monitor


class FoldRun:
    """One fold's child run while the fold step runs (see `fold_run`)."""

    def __init__(self, tracking_uri: str, run, fold: int, *, owned: bool):
        self.tracking_uri, self.fold, self.owned = tracking_uri, fold, owned
        self.this, self.run_id = run, run.info.run_id
        self.experiment_id = run.info.experiment_id
        # A retried task whose run already holds every output.
        self.logged = run.data.tags.get(LOGGED_TAG) == "true"
        # Tries of this fold so far, in earlier starts of its step (a restarted pod).
        self.tries = int(run.data.tags.get(TRIES_TAG, "0"))
        self.ended = False

    def record_try(self, number: int) -> None:
        """Note, before it starts, this step's try `number` (1-based) on the run."""
        total = str(self.tries + number)
        _tracked(
            f"recording fold {self.fold}'s try",
            lambda: _client(self.tracking_uri).set_tag(self.run_id, TRIES_TAG, total),
        )

    def reusable(self, key: str):
        """A finished fold run with the same key under another parent, or None: only one
        that genreflow's pipeline logged in this experiment (`_logged_by_the_pipeline`)."""
        client = _client(self.tracking_uri)
        runs = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{FOLD_KEY_TAG}` = '{key}' and tags.`{LOGGED_TAG}` = 'true'"
            f" and tags.`{ROLE_TAG}` = 'fold'",
            order_by=["attributes.start_time ASC"],
        )
        return next(
            (
                r
                for r in runs
                if r.info.run_id != self.run_id and self._logged_by_the_pipeline(client, r)
            ),
            None,
        )

    def _logged_by_the_pipeline(self, client, run) -> bool:
        """A fold run (role tag) in this experiment, nested under a pipeline's parent run
        (the tags genreflow's pipeline sets on both; a run that KFP's MLflow integration
        opened for the step has them too)."""
        if run.info.experiment_id != self.experiment_id:
            return False
        if run.data.tags.get(ROLE_TAG) != "fold" or not run.data.tags.get(PARENT_TAG):
            return False
        parent = client.get_run(run.data.tags[PARENT_TAG])
        return (
            parent.info.experiment_id == self.experiment_id
            and parent.data.tags.get(ROLE_TAG) == "pipeline"
        )

    def _origin(self, client, source) -> tuple[str, dict[str, str]]:
        """The run that holds `source`'s files (itself, or the run it was reused from) and
        the SHA-256 recorded for each; a run genreflow's pipeline did not log in this
        experiment is refused."""
        origin = source.data.tags.get(REUSED_FROM_TAG, source.info.run_id)
        run = source if origin == source.info.run_id else client.get_run(origin)
        tags = run.data.tags
        if not self._logged_by_the_pipeline(client, run):
            raise GenreflowError(
                f"run {origin} is not a fold run that genreflow's pipeline logged in "
                f"experiment {self.experiment_id}"
            )
        return origin, {
            name[len(SHA256_TAG_PREFIX) :]: value
            for name, value in tags.items()
            if name.startswith(SHA256_TAG_PREFIX)
        }

    def fetch(self, source, out: Path) -> None:
        """Put the fold folder that `source` (a reusable run) logged into `out`, every file
        checked against the SHA-256 recorded when it was logged."""
        origin, recorded = self._origin(_client(self.tracking_uri), source)

        def fetch() -> None:
            client = _client(self.tracking_uri)
            logged = {a.path for a in client.list_artifacts(origin)}
            wanted = [name for name in FOLD_ARTIFACTS if name in logged]
            if not {SUMMARY, PREDICTIONS, METRICS} <= set(wanted) or not (
                set(CHECKPOINTS) & set(wanted)
            ):
                raise GenreflowError(f"run {origin} lacks the fold's files ({sorted(logged)})")
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.fetch-"))
            try:
                for name in wanted:
                    client.download_artifacts(origin, name, str(staging))
                    _check_artifact(origin, name, staging / name, recorded.get(name))
                out.mkdir(exist_ok=True)
                # summary.json last: it is what marks a fold folder complete.
                for name in sorted(os.listdir(staging), key=lambda n: n == SUMMARY):
                    move_into_place(staging / name, out / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        _tracked(f"fetching fold {self.fold} from run {origin}", fetch, keep=str(out))
        self.reused_from = origin

    @contextlib.contextmanager
    def watching(self, datasets=()) -> Iterator[Callable[[dict], None]]:
        """While the block trains the fold: its live curve (yields the callback the
        training loop gives each evaluation to), its dataset inputs, system metrics."""
        live = LiveLog(self.tracking_uri, self.run_id, self.fold, datasets=datasets)
        monitor = _system_metrics(self.tracking_uri, self.run_id)
        try:
            yield live.evaluation
        finally:
            live.close()
            if monitor is not None:
                monitor.finish()

    def log_outputs(self, fold_dir: str | Path, *, reused_from: str = "", datasets=()) -> None:
        """Log the finished fold folder: summary.json's recipe as params, its results and
        the metrics.csv columns (iteration as step) as metrics, the fold files as artifacts,
        `datasets` as the run's inputs. Curve points the run holds already (sent live) are
        not logged again; the others get the time the fold measured them (the run's start
        plus metrics.csv's seconds)."""
        if self.logged:
            print(f"MLflow: fold {self.fold} is already logged in run {self.run_id}")
            return
        fold_dir = Path(fold_dir)
        summary = read_summary(fold_dir)
        rows = read_metrics(fold_dir)
        tags = {k: summary[k] for k in SUMMARY_TAGS if isinstance(summary.get(k), str)}
        if reused_from:
            tags.update({"reused": "true", REUSED_FROM_TAG: reused_from})
        artifacts = [fold_dir / n for n in FOLD_ARTIFACTS if (fold_dir / n).exists()]
        if reused_from:  # the checkpoints stay where they are, in the original run
            artifacts = [p for p in artifacts if p.name not in CHECKPOINTS]
        # What fetch checks before it trusts a file of this run (reused or retried).
        tags.update({f"{SHA256_TAG_PREFIX}{p.name}": storage.sha256_of(p) for p in artifacts})
        if (fold_dir / PREDICTIONS).exists():
            artifacts.append(_fold_confusion_png(fold_dir))

        def log() -> None:
            from mlflow.entities import Metric, Param, RunTag

            client = _client(self.tracking_uri)
            now = int(time.time() * 1000)
            run = client.get_run(self.run_id)
            existing = run.data.params
            params = [
                Param(k, v)
                for k, v in _stringify(summary.get("config", {})).items()
                if k not in existing
            ]
            held = {
                key: {m.step for m in client.get_metric_history(self.run_id, key)}
                for key in run.data.metrics
                if key in CURVE
            }
            metrics = []
            for row in rows:
                step = int(row["iteration"])
                seconds = row.get("seconds")
                at = run.info.start_time + int(float(seconds) * 1000) if seconds else now
                for key, value in row.items():
                    if key in ("iteration", "seconds") or value in (None, ""):
                        continue
                    if step not in held.get(key, ()):
                        metrics.append(Metric(key, float(value), min(at, now), step))
            final_step = int(summary.get("iterations", 0))
            for key, name in SUMMARY_METRICS.items():
                if isinstance(summary.get(key), (int, float)):
                    metrics.append(Metric(name, float(summary[key]), now, final_step))
            tag_list = [RunTag(k, v) for k, v in _stringify(tags).items()]
            client.log_batch(self.run_id, params=params[:100], tags=tag_list)
            for start in range(100, len(params), 100):
                client.log_batch(self.run_id, params=params[start : start + 100])
            for start in range(0, len(metrics), 500):  # the REST API caps a batch at 1000
                client.log_batch(self.run_id, metrics=metrics[start : start + 500])
            logged_inputs = {d.dataset.digest for d in run.inputs.dataset_inputs}
            missing = [d for d in datasets if d.dataset.digest not in logged_inputs]
            if missing:
                client.log_inputs(self.run_id, missing)
            for path in artifacts:
                client.log_artifact(self.run_id, str(path))
            client.set_tag(self.run_id, LOGGED_TAG, "true")  # last: everything is there

        _tracked(f"logging fold {self.fold} to {self.tracking_uri}", log, keep=str(fold_dir))
        self.logged = True

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.owned:
            _tracked(
                f"ending fold {self.fold}'s run {status}",
                lambda: _client(self.tracking_uri).set_terminated(self.run_id, status),
            )


def _check_artifact(run_id: str, name: str, path: Path, expected: str | None) -> None:
    """A fetched fold file is trusted only if it is byte for byte what was logged."""
    if expected is None:
        raise GenreflowError(
            f"run {run_id} records no sha256 for {name} (logged by a genreflow that did not "
            "record checksums); not trusted"
        )
    actual = storage.sha256_of(path)
    if actual != expected:
        raise GenreflowError(
            f"run {run_id}: artifact {name} has sha256 {actual}, but {expected} was logged "
            "(changed in the artifact store since); not trusted"
        )


@contextlib.contextmanager
def fold_run(
    tracking_uri: str, parent_run_id: str, fold: int, *, key: str = "", keep: str = ""
) -> Iterator[FoldRun]:
    """The fold's child run under `parent_run_id`, RUNNING while the block runs; it ends
    FINISHED, FAILED on an exception, KILLED on SIGTERM (which then ends the process with
    status 143).

    One run per fold and parent, however often the task is retried: an unfinished run of
    this fold is taken up again. A task run that KFP's MLflow integration opened for this
    step (`MLFLOW_RUN_ID`, a child of the parent) is used as the fold's run, and closed by
    the platform, not here; an inherited MLFLOW_RUN_ID outside this tree is ignored, saying
    so.
    """

    def open_run() -> FoldRun:
        client = _client(tracking_uri)
        inherited = _inherited_run(client, f"fold {fold}")
        parent = client.get_run(parent_run_id)
        # The run the pipeline's parent was adopted through (a caller's nested run) is
        # every task's MLFLOW_RUN_ID under kfp.local: not a fold's own task run.
        adopted_through = parent.data.tags.get(ADOPTED_TAG)
        if inherited is not None and inherited.info.run_id not in (parent_run_id, adopted_through):
            if inherited.data.tags.get(PARENT_TAG) == parent_run_id:
                for k, v in {ROLE_TAG: "fold", "fold": str(fold), FOLD_KEY_TAG: key}.items():
                    client.set_tag(inherited.info.run_id, k, v)
                return FoldRun(tracking_uri, inherited, fold, owned=False)
            print(
                f"MLflow: ignoring MLFLOW_RUN_ID={inherited.info.run_id}: not a run of this "
                f"pipeline (parent {parent_run_id}); fold {fold} logs under the parent",
                file=sys.stderr,
            )
        earlier = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.fold = '{fold}'",
        )
        if earlier:  # a retried task: one run per fold
            run = earlier[0]
            if run.info.status != "FINISHED":
                client.update_run(run.info.run_id, status="RUNNING")
                attempt = int(run.data.tags.get("genreflow.attempt", "1")) + 1
                client.set_tag(run.info.run_id, "genreflow.attempt", str(attempt))
            return FoldRun(tracking_uri, client.get_run(run.info.run_id), fold, owned=True)
        run = client.create_run(
            parent.info.experiment_id,
            run_name=fold_run_name(fold),
            tags={
                PARENT_TAG: parent_run_id,
                ROLE_TAG: "fold",
                OWNER_TAG: "genreflow",
                "fold": str(fold),
                FOLD_KEY_TAG: key,
            },
        )
        return FoldRun(tracking_uri, run, fold, owned=True)

    run = _tracked(f"opening fold {fold}'s run under {parent_run_id}", open_run, keep=keep)
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield run
    except Terminated:
        print(f"fold {fold}: SIGTERM; its run ends KILLED", file=sys.stderr)
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    else:
        run.end("FINISHED")
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def tracked_fold(
    train: Callable[[], dict],
    *,
    out: str | Path,
    fold: int,
    inputs: Iterable[str | Path],
    settings: dict,
    tracking_uri: str,
    parent_run_id: str,
    reuse: bool = True,
    tolerate_failure: bool = False,
    key: str = "",
) -> dict:
    """Run one fold step: train (retried in-step, resuming from its last checkpoint) or reuse
    an identical earlier fold, log it as the parent's child run, return its summary.

    Args:
        train: train(on_evaluation=...) trains the fold into `out` and returns
            summary.json's content, calling on_evaluation (None: nothing to call) with each
            evaluation's metrics.csv row as it happens (the live curve); called again after
            a transient failure, it resumes from the checkpoint it left in `out`.
        out: the fold folder.
        fold: the fold number (under the filtered protocol, the repetition).
        inputs: the files the fold reads (their content is part of the reuse key).
        settings: everything else the result depends on (protocol, recipe, seed, ...).
        tracking_uri: MLflow ("" = no tracking: train only).
        parent_run_id: the pipeline's parent run.
        reuse: take a finished fold with the same key (same inputs, settings and code) from
            MLflow instead of training it again.
        key: the fold's identity (fold_key of inputs and settings), when the caller has it.
        tolerate_failure: when the pipeline accepts partial results (min_folds below the
            number of folds), a fold that still fails after its retries does not fail the
            step, which would stop the whole DAG before aggregation (kubeflow/pipelines
            #7330): its run ends FAILED, `out/failed.json` says why, and the aggregate
            names it. A SIGTERM always stops the step.

    Returns:
        summary.json's content, or {"fold": fold, "failed": "..."} for a tolerated failure.
    """
    out = Path(out)
    (out / FAILED).unlink(missing_ok=True)  # an earlier attempt's, in this folder

    def train_or_record_failure(run: FoldRun | None = None, on_evaluation=None) -> dict | None:
        """Train, retrying transient failures within the fold's tries (those of earlier
        starts of the step counted); a failure that remains is raised, or, where partial
        results are allowed, recorded in failed.json (None). Only training failures are
        tolerated: a tracking server that is down fails the step, outputs intact."""
        try:
            return retry_transient(
                f"fold {fold}",
                lambda: train(on_evaluation=on_evaluation),
                tries=FOLD_TRIES - (run.tries if run else 0),
                first_delay=FOLD_RETRY_FIRST_DELAY_SECONDS,
                before_try=run.record_try if run else None,
            )
        except Exception as exc:
            if not tolerate_failure:
                raise
            error = f"{type(exc).__name__}: {exc}"
            write_failure(out, fold, error)
            print(f"fold {fold} failed ({error}); the pipeline goes on to a partial result")
            return None

    if not tracking_uri:
        summary = train_or_record_failure()
        return summary if summary is not None else _failure(out)
    inputs = list(inputs)
    key = key or fold_key(inputs, {"fold": fold, **settings})
    datasets = input_datasets(inputs)
    with fold_run(tracking_uri, parent_run_id, fold, key=key, keep=str(out)) as run:
        if run.logged:  # a retried task: this run already holds the fold; take it back
            run.fetch(run.this, out)
            return read_summary(out)
        source = run.reusable(key) if reuse else None
        if source is not None:
            try:
                run.fetch(source, out)
            except GenreflowError as exc:
                print(f"fold {fold}: cannot reuse run {source.info.run_id} ({exc}); training")
                source = None
        if source is not None:
            print(f"fold {fold}: reused from MLflow run {run.reused_from} (same inputs and recipe)")
            run.log_outputs(out, reused_from=run.reused_from, datasets=datasets)
            return read_summary(out)
        with run.watching(datasets) as on_evaluation:
            summary = train_or_record_failure(run, on_evaluation)
        if summary is None:
            run.end("FAILED")
            return _failure(out)
        run.log_outputs(out, datasets=datasets)
        return read_summary(out)


def fold_step(
    config,
    *,
    tracking_uri: str,
    parent_run_id: str,
    reuse: bool,
    min_folds: int,
    expected_folds: list[int],
    work_root: str = "",
    pipeline_root: str = "",
) -> dict:
    """The pipeline's fold step: train `config` (a TrainConfig: fine-tune the fold; a
    HeadConfig: train its head on the frozen base's embeddings) as `tracked_fold` does,
    failures tolerated when min_folds allows partial results. Returns the fold's summary,
    or {"fold": K, "failed": "..."}.

    With `work_root` (a folder or gs:// prefix that outlives the step's pod; default: the
    pipeline root's genreflow-work/, where that is a folder or gs:// prefix), a fine-tune
    fold trains in `work_root/folds/fold-KK-<key>`, named by the fold's identity (inputs'
    content, recipe, code), checkpointing there at every evaluation, and its outputs are
    copied into config.out when it ends: a step started again (a restarted pod, a rerun or
    resubmission of the pipeline) resumes from the last checkpoint instead of iteration 0.
    """
    import dataclasses

    from genreflow.recipe import HeadConfig

    if isinstance(config, HeadConfig):
        from genreflow.frozen import train_head

        path, inputs = FROZEN_BASE, [config.embeddings]
        train = functools.partial(train_head, **dataclasses.asdict(config))
    else:
        from genreflow.train import train_fold

        path, inputs = FINE_TUNE, [config.features]
        train = functools.partial(train_fold, config)
    # What the fold's result depends on, beside its inputs' content and the code.
    leave_out = ("features", "embeddings", "out", "fold", "device", "log_every")
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in leave_out}
    key = ""
    work_root = _work_root(work_root, pipeline_root)
    if work_root and path == FINE_TUNE:
        key = fold_key(inputs, {"fold": config.fold, "path": path, **settings})
        work = f"{work_root.rstrip('/')}/folds/fold-{config.fold:02d}-{key[:16]}"
        print(f"fold {config.fold}: working in {storage.redacted(work)} (resumes from there)")
        train = functools.partial(_train_in, dataclasses.replace(config, out=work), config.out)
    return tracked_fold(
        train,
        out=config.out,
        fold=config.fold,
        inputs=inputs,
        settings={"path": path, **settings},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        reuse=reuse,
        tolerate_failure=folds_required(min_folds, expected_folds) < len(expected_folds),
        key=key,
    )


def _work_root(work_root: str, pipeline_root: str) -> str:
    """Where fine-tune folds keep their working state: `work_root`, else under the pipeline
    root; "" (no durable state: a restarted fold starts over) where genreflow cannot write
    there (KFP's default minio:// root)."""
    root = work_root or (f"{pipeline_root.rstrip('/')}/{WORK_FOLDER}" if pipeline_root else "")
    if root and storage.local_path(root) is None and not root.startswith("gs://"):
        print(
            f"fold work folder: {storage.redacted(root)} is neither a folder nor gs://; a "
            "restarted fold starts over (set the pipeline's work_root to a gs:// prefix)"
        )
        return ""
    return root


def _train_in(config, out: str | Path, *, on_evaluation=None) -> dict:
    """Fine-tune in the durable folder config.out, then copy its outputs into `out`, the
    step's own output folder (the KFP artifact, uploaded only when the step ends)."""
    from genreflow.train import train_fold

    summary = train_fold(config, on_evaluation=on_evaluation)
    storage.copy_folder(config.out, out)
    return summary


def fold_step_outputs(summary: dict) -> tuple[dict, float | None]:
    """What a fold step shows in KFP: its output's metadata, and its test accuracy (None
    for a tolerated failure)."""
    if "failed" in summary:  # tolerated (min_folds): failed.json says why
        return {"fold": summary["fold"], "failed": summary["failed"]}, None
    accuracy = float(summary["final_accuracy"])
    metadata = {"fold": summary["fold"], "test_accuracy": accuracy, "path": summary["path"]}
    return {**metadata, "protocol": summary["protocol"]}, accuracy


def _failure(out: Path) -> dict:
    record = read_failure(out)
    return {"fold": record["fold"], "failed": record["error"]}


def log_fold(tracking_uri: str, parent_run_id: str, fold_dir: str | Path) -> str:
    """Log an already finished fold folder as a child run of the parent; return its id."""
    summary = read_summary(fold_dir)
    with fold_run(tracking_uri, parent_run_id, int(summary["fold"]), keep=str(fold_dir)) as run:
        run.log_outputs(fold_dir)
    return run.run_id


def _fold_confusion_png(fold_dir: Path) -> Path:
    """The fold's own confusion matrix plot, beside the fold folder."""
    from genreflow.aggregate import CONFUSION_PNG, fold_confusion_png

    png = fold_confusion_png(fold_dir)
    out = fold_dir.with_name(fold_dir.name + ".confusion")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / CONFUSION_PNG, lambda f: f.write(png))
    return out / CONFUSION_PNG
