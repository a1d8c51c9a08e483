"""Where a pipeline run is in the MLflow UI: its parent run, the runs table, its folds."""

from __future__ import annotations

import functools
import json

from genreflow import storage
from genreflow.tracking.client import client, tracked
from genreflow.tracking.names import CURVE, FOLD_ROLE, FOLD_TAG, PARENT_TAG, ROLE_TAG

DEFAULT_UI = "http://127.0.0.1:5000"  # where `genreflow ui` (make ui) serves a local store
# MLflow 3 opens an experiment in its GenAI view (traces) and remembers the last view
# chosen; this query opens the classic one ("Model training": the runs table, a run's
# metrics and child runs). Checked with MLflow 3.17's UI in a browser.
CLASSIC_VIEW = "workflowType=machine_learning"


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
        store = client(tracking_uri)
        experiment_id = store.get_run(parent_run_id).info.experiment_id
        children = store.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
            f" and tags.`{ROLE_TAG}` = '{FOLD_ROLE}'",
        )
        folds = sorted(children, key=lambda r: int(r.data.tags.get(FOLD_TAG, "0")))
        return experiment_id, [r.info.run_id for r in folds]

    experiment_id, folds = tracked(f"reading run {parent_run_id}", read)
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


def print_addresses(tracking_uri: str, parent_run_id: str, ui: str = "", file=None) -> None:
    """Print `pipeline_addresses`, one a line (to `file`, default stdout), and how to serve
    them where that is needed (no `ui` given and no tracking server)."""
    for what, address in pipeline_addresses(tracking_uri, parent_run_id, ui).items():
        print(f"MLflow {what}: {address}", file=file)
    if not ui and (hint := ui_hint(tracking_uri)):
        print(f"  ({hint})", file=file)
