"""The MLflow client: where the store is, bounded retries, MLflow's process-wide URI.

Losing the tracking server must not lose the training: every call retries with back-off,
then fails with a `TrackingError` that says where the step's local outputs are.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

from genreflow import storage
from genreflow.errors import GenreflowError
from genreflow.retry import is_transient

T = TypeVar("T")

DEFAULT_EXPERIMENT = "genreflow-gtzan"
RETRY_ATTEMPTS = 4
RETRY_FIRST_DELAY_SECONDS = 2.0


class TrackingError(GenreflowError):
    """The tracking server could not be reached or refused a request."""


def default_tracking_uri(workspace: str | Path = "workspace") -> str:
    """`MLFLOW_TRACKING_URI` when set, else workspace/mlflow.db (the embedded default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def platform_tracking_uri(tracking_uri: str) -> str:
    """A step's tracking URI: `tracking_uri`, else the `MLFLOW_TRACKING_URI` that the
    platform injects (KFP's server-side MLflow integration sets it in every task's pod);
    "" (no tracking) where neither is set."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def installed_version(name: str) -> str | None:
    """The installed version of the distribution `name`, None where it is not installed;
    for mlflow, that of mlflow-skinny where only the client is (the runtime images)."""
    for distribution in (name, "mlflow-skinny") if name == "mlflow" else (name,):
        try:
            return version(distribution)
        except PackageNotFoundError:
            pass
    return None


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Where a sqlite store with no server keeps its runs' artifacts: beside the database
    (workspace/mlartifacts for the default), not MLflow's ./mlruns of whatever folder a
    step ran in. None for any other store."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    return database.resolve().parent / "mlartifacts"


def client(tracking_uri: str):
    """An `MlflowClient` of `tracking_uri`, with MLflow's own HTTP retries bounded."""
    # MLflow's own HTTP retries back off for minutes; ours are bounded and say what failed.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow prints each ended run's page with the tracking URI as given, password and all;
    # genreflow says where runs are itself, redacted (addresses.run_address).
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


def tracked(what: str, fn: Callable[[], T], keep: str = "") -> T:
    """An MLflow call: `retrying` it, saying "MLflow: <what>" (redacted) when it fails for
    good, and where the step's outputs are (`keep`)."""
    return retrying(f"MLflow: {storage.redacted_text(what)}", fn, keep=keep)


@contextlib.contextmanager
def global_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `tracking_uri` for the block, then put
    back as it was (environment included): the few MLflow calls that take no client
    (pyfunc.log_model, the database registry's LoggedModel look-up) use it."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = utils._tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None also unsets the environment variable
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def stringify(values: dict) -> dict[str, str]:
    """Values as MLflow stores them, every URI in them redacted (a signed URL's query,
    user:password@): everything genreflow records on a run goes through here."""
    return {
        k: storage.redacted_text(v if isinstance(v, str) else json.dumps(v))
        for k, v in values.items()
    }
