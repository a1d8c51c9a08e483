"""A fold's run while it trains: its curve at each evaluation, its system metrics."""

from __future__ import annotations

import contextlib
import functools
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator

from genreflow.tracking.client import client, retrying
from genreflow.tracking.names import CURVE

# Live points retry a blip briefly: they are sent again from metrics.csv at the end anyway.
LIVE_ATTEMPTS = 3
LIVE_FIRST_DELAY_SECONDS = 1.0
# The most a fold's end waits for its queued live points: well inside the grace period a
# stopped pod gets (Kubernetes: 30 s) before its run must be ended KILLED.
LIVE_CLOSE_SECONDS = 10.0
SYSTEM_METRICS_SECONDS = 10.0


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
        store = client(self.tracking_uri)
        if self._datasets:
            self._try("dataset inputs", lambda: store.log_inputs(self.run_id, self._datasets))
        sent = self._steps_on_run(store)
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
            if self._try(what, functools.partial(self._log_batch, store, metrics)):
                sent.update(steps)

    def _log_batch(self, store, metrics: list) -> None:
        for start in range(0, len(metrics), 900):  # the REST API caps a batch at 1000
            store.log_batch(self.run_id, metrics=metrics[start : start + 900])

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

    def _steps_on_run(self, store) -> set:
        """The steps whose curve the run holds already (a retried or restarted fold)."""
        try:
            if CURVE[-1] not in store.get_run(self.run_id).data.metrics:
                return set()
            return {m.step for m in store.get_metric_history(self.run_id, CURVE[-1])}
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


@contextlib.contextmanager
def watching(
    tracking_uri: str, run_id: str, fold: int, *, datasets=()
) -> Iterator[Callable[[dict], None]]:
    """While the block trains the fold: its live curve (yields the callback the training
    loop gives each evaluation to), its dataset inputs, system metrics."""
    live = LiveLog(tracking_uri, run_id, fold, datasets=datasets)
    monitor = _system_metrics(tracking_uri, run_id)
    try:
        yield live.evaluation
    finally:
        live.close()
        if monitor is not None:
            monitor.finish()
