"""MLflow: one parent run per pipeline run, one nested child run per fold.

Everything goes through an explicit `MlflowClient(tracking_uri)` rather than MLflow's
global "active run": a step that inherits `MLFLOW_RUN_ID` from its environment must not
log into, or close, a run it does not own (mlflow/mlflow#15713, #13874).

Losing the tracking server must not lose the training: every call retries with back-off,
then fails with a `TrackingError` that says where the step's local outputs are.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import mlflow.pyfunc

from genreflow import __version__
from genreflow.errors import GenreflowError

T = TypeVar("T")

DEFAULT_EXPERIMENT = "genreflow-gtzan"
RETRY_ATTEMPTS = 4
# What a fold's child run keeps: last.pth is the fine-tuned fold model (best.pth is chosen
# on the held-out fold, so it is not promoted), head.pth the frozen-base path's head.
FOLD_ARTIFACTS = ("metrics.csv", "predictions.csv", "summary.json", "last.pth", "head.pth")
RETRY_FIRST_DELAY_SECONDS = 2.0
PARENT_RUN_TAG = "genreflow.role"


class TrackingError(GenreflowError):
    """The tracking server could not be reached or refused a request."""


def default_tracking_uri(workspace: str | Path = "workspace") -> str:
    """`MLFLOW_TRACKING_URI` when set, else workspace/mlflow.db (the embedded default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def _client(tracking_uri: str):
    # MLflow's own HTTP retries back off for minutes; ours are bounded and say what failed.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def retrying(what: str, fn: Callable[[], T], *, keep: str = "") -> T:
    """Call fn, retrying with exponential back-off; then raise a TrackingError naming `what`."""
    attempts, delay = RETRY_ATTEMPTS, RETRY_FIRST_DELAY_SECONDS
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except GenreflowError:
            raise
        except Exception as exc:  # MLflow raises many types for one outage
            if attempt == attempts:
                where = f"; local outputs are intact in {keep}" if keep else ""
                raise TrackingError(
                    f"MLflow: {what} failed after {attempts} attempts: {exc}{where}"
                ) from exc
            print(
                f"MLflow: {what} failed ({type(exc).__name__}); retry {attempt}/{attempts - 1}"
                f" in {delay:.0f} s",
                file=sys.stderr,
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


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
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by a parallel task
        return client.get_experiment_by_name(name).experiment_id


def _stringify(params: dict) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}


def start_pipeline_run(
    tracking_uri: str,
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    run_name: str | None = None,
    params: dict | None = None,
    tags: dict | None = None,
) -> str:
    """Open the parent run of one pipeline run and return its id (it stays RUNNING)."""

    def start() -> str:
        client = _client(tracking_uri)
        all_tags = {PARENT_RUN_TAG: "pipeline", **provenance(), **_stringify(tags or {})}
        run = client.create_run(
            _experiment_id(client, experiment), run_name=run_name, tags=all_tags
        )
        for key, value in _stringify(params or {}).items():
            client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    return retrying(f"opening the parent run at {tracking_uri}", start)


def log_fold(
    tracking_uri: str,
    parent_run_id: str,
    fold_dir: str | Path,
) -> str:
    """Log one finished fold as a child run of the parent; return the child's id.

    Everything comes from the fold folder: summary.json gives the fold, the recipe
    (`config`, logged as params) and the training path (a tag); metrics.csv (iteration,
    train_loss, heldout_accuracy, seconds) gives each metric with its iteration as step;
    the fold's files (FOLD_ARTIFACTS that exist) and its confusion plot are uploaded.
    """
    fold_dir = Path(fold_dir)
    summary = json.loads((fold_dir / "summary.json").read_text())
    fold, params = int(summary["fold"]), summary.get("config", {})
    tags = {"path": summary["path"]} if "path" in summary else {}
    with open(fold_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    artifacts = [fold_dir / name for name in FOLD_ARTIFACTS if (fold_dir / name).exists()]
    if (fold_dir / "predictions.csv").exists():
        artifacts.append(_fold_confusion_png(fold_dir, fold))

    def log() -> str:
        from mlflow.entities import Metric

        client = _client(tracking_uri)
        parent = client.get_run(parent_run_id)
        run = client.create_run(
            parent.info.experiment_id,
            run_name=f"fold-{fold}",
            tags={
                "mlflow.parentRunId": parent_run_id,
                PARENT_RUN_TAG: "fold",
                "fold": str(fold),
                **tags,
            },
        )
        run_id = run.info.run_id
        for key, value in _stringify(params).items():
            client.log_param(run_id, key, value)
        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            step = int(row["iteration"])
            for key in ("train_loss", "heldout_accuracy"):
                if row.get(key) not in (None, ""):
                    metrics.append(Metric(key, float(row[key]), now, step))
        for key in ("final_accuracy", "best_accuracy", "clips_per_second", "wall_seconds"):
            if isinstance(summary.get(key), (int, float)):
                metrics.append(
                    Metric(key, float(summary[key]), now, int(summary.get("iterations", 0)))
                )
        for start in range(0, len(metrics), 500):  # the REST API caps a batch at 1000 items
            client.log_batch(run_id, metrics=metrics[start : start + 500])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, "FINISHED")
        return run_id

    return retrying(f"logging fold {fold} to {tracking_uri}", log, keep=str(fold_dir))


def _fold_confusion_png(fold_dir: Path, fold: int) -> Path:
    """The fold's own confusion matrix plot, drawn by the report code on this one fold."""
    from genreflow.aggregate import CONFUSION_PNG, aggregate

    out = fold_dir.with_name(fold_dir.name + ".confusion")
    aggregate([fold_dir], out, expected_folds=[fold], min_folds=1)
    return out / CONFUSION_PNG


def finish_pipeline_run(
    tracking_uri: str,
    parent_run_id: str,
    *,
    metrics: dict[str, float],
    artifacts: Iterable[str | Path] = (),
    tags: dict | None = None,
    status: str = "FINISHED",
    keep: str = "",
) -> None:
    """Log the aggregate metrics and report on the parent run, then close it with `status`."""

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
        client.set_terminated(parent_run_id, status)

    retrying(f"finishing the parent run {parent_run_id}", finish, keep=keep)


# --- the fold ensemble as one MLflow model -------------------------------------------------
ENSEMBLE_ARTIFACT = "model"


class GenreEnsemble(mlflow.pyfunc.PythonModel):
    """The fold models as one MLflow model: (n, clip_samples) float32 waveforms at 32 kHz
    in, (n, 10) genre probabilities out (GENRES order), the folds' probabilities averaged."""

    def load_context(self, context):
        from genreflow.inference import load_ensemble

        artifacts = context.artifacts
        folds = [artifacts[k] for k in sorted(artifacts) if k.startswith("fold")]
        self.ensemble = load_ensemble(folds, base=artifacts.get("base"))

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        waveforms = torch.from_numpy(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.ensemble(waveforms).numpy()


def log_ensemble(
    tracking_uri: str,
    run_id: str,
    checkpoints: list[str | Path],
    *,
    clip_samples: int,
    base: str | Path | None = None,
    registered_name: str = "",
    workdir: str | Path,
) -> str:
    """Log the fold checkpoints as one pyfunc model on `run_id`; register it under
    `registered_name` when given. Returns the model's URI (models:/NAME/VERSION or runs:/).

    With a frozen base, `checkpoints` are the folds' head.pth files and `base` the base
    they share (stored once); otherwise they are full fine-tuned checkpoints.
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import save_model
    from mlflow.types import Schema, TensorSpec

    from genreflow.data.genres import GENRES

    artifacts = {f"fold{i:02d}": str(path) for i, path in enumerate(checkpoints, start=1)}
    if base is not None:
        artifacts["base"] = str(base)
    signature = ModelSignature(
        # Unnamed tensors: callers pass and get plain arrays, not {name: array} dicts.
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, clip_samples))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(GENRES)))]),
    )
    local = Path(workdir) / ENSEMBLE_ARTIFACT
    save_model(
        str(local),
        python_model=GenreEnsemble(),
        artifacts=artifacts,
        signature=signature,
        input_example=np.zeros((1, clip_samples), dtype=np.float32),
        # The images and this environment install genreflow; inferring requirements
        # would import-trace the model in a subprocess for nothing.
        pip_requirements=[f"genreflow=={__version__}"],
        metadata={"genres": list(GENRES), "clip_samples": clip_samples},
    )

    def log() -> str:
        client = _client(tracking_uri)
        client.log_artifacts(run_id, str(local), ENSEMBLE_ARTIFACT)
        source = f"runs:/{run_id}/{ENSEMBLE_ARTIFACT}"
        if not registered_name:
            return source
        try:
            client.create_registered_model(registered_name)
        except Exception:  # already registered: add a version
            pass
        run = client.get_run(run_id)
        version = client.create_model_version(
            registered_name, f"{run.info.artifact_uri}/{ENSEMBLE_ARTIFACT}", run_id=run_id
        )
        return f"models:/{registered_name}/{version.version}"

    return retrying(f"logging the fold ensemble to {tracking_uri}", log, keep=str(local))
