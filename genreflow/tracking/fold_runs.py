"""A fold's child run under the pipeline's parent: opened when the fold starts, ended
FINISHED, FAILED, or KILLED on SIGTERM; its files logged with their checksums, and fetched
back (checked) when a retried task or an identical later fold takes them up again.

What to do with the run (train, retry, reuse, record a failure) is the fold step's
(genreflow.steps.fold); this module only talks to MLflow.

Anyone who can write to the experiment can make a run that looks like the pipeline's
(its tags, and sha256 values of its own files), so tags alone prove nothing. The pipeline
signs what it logs: `reuse_record`, an HMAC-SHA256 under a key only its steps hold
(GENREFLOW_REUSE_KEY, from a Kubernetes Secret), over the run, the fold's identity and
every file digest. A run is fetched only when its record checks; without a key, no run is.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from genreflow import storage
from genreflow.atomic import move_into_place
from genreflow.errors import GenreflowError
from genreflow.fold_result import (
    BEST,
    HEAD,
    METRICS,
    PREDICTIONS,
    SUMMARY,
    read_metrics,
    read_summary,
)
from genreflow.tracking.client import client, stringify, tracked
from genreflow.tracking.names import (
    ADOPTED_TAG,
    ATTEMPT_TAG,
    CHECKPOINT_MODEL_TAG,
    CHECKPOINT_PATH_TAG,
    CURVE,
    DATASET_CONTEXT_TAG,
    FOLD_KEY_TAG,
    FOLD_ROLE,
    FOLD_TAG,
    LOGGED_TAG,
    OWNER,
    OWNER_TAG,
    PARENT_TAG,
    PIPELINE_ROLE,
    REUSE_RECORD_TAG,
    REUSED_FROM_TAG,
    REUSED_TAG,
    ROLE_TAG,
    SHA256_TAG_PREFIX,
    SUMMARY_METRICS,
    SUMMARY_TAGS,
    TRIES_TAG,
)
from genreflow.tracking.runs import inherited_run

# What a fold's child run keeps: best.pth is the selected fine-tuned fold model (chosen on
# the validation split), head.pth the frozen-base path's head. last.pth stays in the fold
# folder: uploading a second 330 MB checkpoint per fold buys nothing.
FOLD_ARTIFACTS = (METRICS, PREDICTIONS, SUMMARY, BEST, HEAD)
CHECKPOINTS = (BEST, HEAD)
DIGEST_CHARS = 16
# The key the pipeline signs its fold runs with (mounted from a Secret on a cluster).
REUSE_KEY_ENV = "GENREFLOW_REUSE_KEY"
REUSE_KEY_MIN_CHARS = 32  # `openssl rand -hex 32` gives 64


class Terminated(SystemExit):
    """SIGTERM arrived (a pod being stopped): unwinds the step so its run ends KILLED."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame):
    raise Terminated()


def fold_run_name(fold: int) -> str:
    """fold-01 .. fold-10: run names that sort in the runs table as the folds do."""
    return f"fold-{fold:02d}"


def input_datasets(checksums: dict[str | Path, str]):
    """The fold's input files (packed features, or embeddings), given with their SHA-256,
    as MLflow dataset inputs: named by the file, the first DIGEST_CHARS hex digits of its
    SHA-256 as the digest (the store keeps 36 characters), the whole checksum and the size
    in its profile and as a tag on the input."""
    import json

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = []
    for path, sha256 in checksums.items():
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


def reuse_key() -> bytes | None:
    """The pipeline's signing key from the environment, or None where none is set.

    Raises:
        GenreflowError: a key too short to resist guessing.
    """
    key = os.environ.get(REUSE_KEY_ENV, "").strip()
    if not key:
        return None
    if len(key) < REUSE_KEY_MIN_CHARS:
        raise GenreflowError(
            f"{REUSE_KEY_ENV} holds {len(key)} characters, fewer than {REUSE_KEY_MIN_CHARS}; "
            "make one with `openssl rand -hex 32`"
        )
    return key.encode("utf-8")


def reuse_record(key: bytes, run_id: str, fold_key: str, digests: dict[str, str]) -> str:
    """The pipeline's record of a fold run: HMAC-SHA256 under `key` over canonical JSON of
    the run that holds the files, the fold's identity (genreflow.steps.fold.fold_key: its
    inputs, settings, fold number and code) and every file's SHA-256. Bound to the run,
    so a genuine record copied onto another run does not check."""
    message = json.dumps(
        {"run": run_id, "fold_key": fold_key, "sha256": digests},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hmac.new(key, message.encode("ascii"), hashlib.sha256).hexdigest()


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


def _checkpoint_in_model(store, run) -> tuple[str, str] | None:
    """(file name, artifact URI) of the run's checkpoint where it moved into the pipeline's
    model (genreflow.tracking.models.move_checkpoints); None where the run holds its own."""
    model_id = run.data.tags.get(CHECKPOINT_MODEL_TAG)
    if not model_id:
        return None
    location = store.get_logged_model(model_id).artifact_location.rstrip("/")
    path = run.data.tags[CHECKPOINT_PATH_TAG]
    return path.rsplit("/", 1)[-1], f"{location}/{path}"


class FoldRun:
    """One fold's child run while the fold step runs (see `fold_run`)."""

    def __init__(self, tracking_uri: str, run, fold: int, *, owned: bool, key: str = ""):
        self.tracking_uri, self.fold, self.owned = tracking_uri, fold, owned
        self.key = key  # the fold's identity (fold_key), "" for a folder logged as it is
        self.this, self.run_id = run, run.info.run_id
        self.experiment_id = run.info.experiment_id
        # A retried task whose run already holds every output.
        self.logged = run.data.tags.get(LOGGED_TAG) == "true"
        # Tries of this fold so far, in earlier starts of its step (a restarted pod).
        self.tries = int(run.data.tags.get(TRIES_TAG, "0"))
        self.reused_from = ""
        self.ended = False

    def record_try(self, number: int) -> None:
        """Note, before it starts, this step's try `number` (1-based) on the run."""
        total = str(self.tries + number)
        tracked(
            f"recording fold {self.fold}'s try",
            lambda: client(self.tracking_uri).set_tag(self.run_id, TRIES_TAG, total),
        )

    def reusable(self, key: str):
        """A finished fold run with the same key under another parent, or None: only one
        that genreflow's pipeline logged in this experiment (`_logged_by_the_pipeline`);
        its record is checked when it is fetched. None, saying why, where no key is set."""
        if reuse_key() is None:
            print(
                f"fold {self.fold}: not reused: {REUSE_KEY_ENV} is not set, so no run's "
                "record can be checked (a cluster mounts it from a Secret; locally, export "
                "one: openssl rand -hex 32)"
            )
            return None
        store = client(self.tracking_uri)
        runs = store.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{FOLD_KEY_TAG}` = '{key}' and tags.`{LOGGED_TAG}` = 'true'"
            f" and tags.`{ROLE_TAG}` = '{FOLD_ROLE}'",
            order_by=["attributes.start_time ASC"],
        )
        return next(
            (
                r
                for r in runs
                if r.info.run_id != self.run_id and self._logged_by_the_pipeline(store, r)
            ),
            None,
        )

    def _logged_by_the_pipeline(self, store, run) -> bool:
        """A fold run (role tag) in this experiment, nested under a pipeline's parent run
        (the tags genreflow's pipeline sets on both; a run that KFP's MLflow integration
        opened for the step has them too)."""
        if run.info.experiment_id != self.experiment_id:
            return False
        if run.data.tags.get(ROLE_TAG) != FOLD_ROLE or not run.data.tags.get(PARENT_TAG):
            return False
        parent = store.get_run(run.data.tags[PARENT_TAG])
        return (
            parent.info.experiment_id == self.experiment_id
            and parent.data.tags.get(ROLE_TAG) == PIPELINE_ROLE
        )

    def _origin(self, store, source) -> tuple[str, dict[str, str]]:
        """The run that holds `source`'s files (itself, or the run it was reused from) and
        the SHA-256 recorded for each. Refused: a run genreflow's pipeline did not log in
        this experiment, or whose record does not check, under this key, for this fold's
        identity and those digests."""
        origin = source.data.tags.get(REUSED_FROM_TAG, source.info.run_id)
        run = source if origin == source.info.run_id else store.get_run(origin)
        tags = run.data.tags
        if not self._logged_by_the_pipeline(store, run):
            raise GenreflowError(
                f"run {origin} is not a fold run that genreflow's pipeline logged in "
                f"experiment {self.experiment_id}"
            )
        recorded = {
            name[len(SHA256_TAG_PREFIX) :]: value
            for name, value in tags.items()
            if name.startswith(SHA256_TAG_PREFIX)
        }
        key = reuse_key()
        if key is None:
            raise GenreflowError(
                f"run {origin}: no valid record can be told apart: {REUSE_KEY_ENV} is not set"
            )
        expected = reuse_record(key, origin, self.key, recorded)
        if not hmac.compare_digest(tags.get(REUSE_RECORD_TAG, ""), expected):
            why = "none there" if REUSE_RECORD_TAG not in tags else "its record does not check"
            raise GenreflowError(
                f"run {origin} holds no valid record of the pipeline ({REUSE_RECORD_TAG}: "
                f"{why} for this fold's identity and file digests under this deployment's key)"
            )
        return origin, recorded

    def fetch(self, source, out: Path) -> None:
        """Put the fold folder that `source` (a reusable run, or this one) logged into
        `out`, every file checked against the SHA-256 recorded when it was logged."""
        origin, recorded = self._origin(client(self.tracking_uri), source)

        def fetch() -> None:
            store = client(self.tracking_uri)
            logged = {a.path for a in store.list_artifacts(origin)}
            moved = _checkpoint_in_model(store, store.get_run(origin))
            if moved:
                logged.add(moved[0])
            wanted = [name for name in FOLD_ARTIFACTS if name in logged]
            if not {SUMMARY, PREDICTIONS, METRICS} <= set(wanted) or not (
                set(CHECKPOINTS) & set(wanted)
            ):
                raise GenreflowError(f"run {origin} lacks the fold's files ({sorted(logged)})")
            out.parent.mkdir(parents=True, exist_ok=True)
            from mlflow.artifacts import download_artifacts

            staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.fetch-"))
            try:
                for name in wanted:
                    if moved and name == moved[0]:
                        download_artifacts(
                            artifact_uri=moved[1],
                            dst_path=str(staging),
                            tracking_uri=self.tracking_uri,
                        )
                    else:
                        store.download_artifacts(origin, name, str(staging))
                    _check_artifact(origin, name, staging / name, recorded.get(name))
                out.mkdir(exist_ok=True)
                # summary.json last: it is what marks a fold folder complete.
                for name in sorted(os.listdir(staging), key=lambda n: n == SUMMARY):
                    move_into_place(staging / name, out / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        tracked(f"fetching fold {self.fold} from run {origin}", fetch, keep=str(out))
        self.reused_from = origin

    def log_outputs(
        self,
        fold_dir: str | Path,
        *,
        reused_from: str = "",
        datasets=(),
        also: Iterable[Path] = (),
    ) -> None:
        """Log the finished fold folder: summary.json's recipe as params, its results and
        the metrics.csv columns (iteration as step) as metrics, the fold files and `also`
        (files made from them, such as a plot) as artifacts, `datasets` as the run's inputs.
        Curve points the run holds already (sent live) are not logged again; the others get
        the time the fold measured them (the run's start plus metrics.csv's seconds)."""
        if self.logged:
            print(f"MLflow: fold {self.fold} is already logged in run {self.run_id}")
            return
        fold_dir = Path(fold_dir)
        summary = read_summary(fold_dir)
        rows = read_metrics(fold_dir)
        tags = {k: summary[k] for k in SUMMARY_TAGS if isinstance(summary.get(k), str)}
        if reused_from:
            tags.update({REUSED_TAG: "true", REUSED_FROM_TAG: reused_from})
        artifacts = [fold_dir / n for n in FOLD_ARTIFACTS if (fold_dir / n).exists()]
        if reused_from:  # the checkpoints stay where they are, in the original run
            artifacts = [p for p in artifacts if p.name not in CHECKPOINTS]
        # What fetch checks before it trusts a file of this run (reused or retried), and
        # the pipeline's record of it (where a key is set and the fold has an identity).
        digests = {p.name: storage.sha256_of(p) for p in artifacts}
        tags.update({f"{SHA256_TAG_PREFIX}{name}": value for name, value in digests.items()})
        key = reuse_key()
        if key is not None and self.key:
            tags[REUSE_RECORD_TAG] = reuse_record(key, self.run_id, self.key, digests)
        artifacts += list(also)

        def log() -> None:
            from mlflow.entities import Metric, Param, RunTag

            store = client(self.tracking_uri)
            now = int(time.time() * 1000)
            run = store.get_run(self.run_id)
            existing = run.data.params
            params = [
                Param(k, v)
                for k, v in stringify(summary.get("config", {})).items()
                if k not in existing
            ]
            held = {
                key: {m.step for m in store.get_metric_history(self.run_id, key)}
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
            if not reused_from:  # trained again where a reuse of its record failed
                for stale in {REUSED_TAG, REUSED_FROM_TAG} & set(run.data.tags):
                    store.delete_tag(self.run_id, stale)
            tag_list = [RunTag(k, v) for k, v in stringify(tags).items()]
            store.log_batch(self.run_id, params=params[:100], tags=tag_list)
            for start in range(100, len(params), 100):
                store.log_batch(self.run_id, params=params[start : start + 100])
            for start in range(0, len(metrics), 500):  # the REST API caps a batch at 1000
                store.log_batch(self.run_id, metrics=metrics[start : start + 500])
            logged_inputs = {d.dataset.digest for d in run.inputs.dataset_inputs}
            missing = [d for d in datasets if d.dataset.digest not in logged_inputs]
            if missing:
                store.log_inputs(self.run_id, missing)
            for path in artifacts:
                store.log_artifact(self.run_id, str(path))
            store.set_tag(self.run_id, LOGGED_TAG, "true")  # last: everything is there

        tracked(f"logging fold {self.fold} to {self.tracking_uri}", log, keep=str(fold_dir))
        self.logged = True

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.owned:
            tracked(
                f"ending fold {self.fold}'s run {status}",
                lambda: client(self.tracking_uri).set_terminated(self.run_id, status),
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
        store = client(tracking_uri)
        inherited = inherited_run(store, f"fold {fold}")
        parent = store.get_run(parent_run_id)
        # The run the pipeline's parent was adopted through (a caller's nested run) is
        # every task's MLFLOW_RUN_ID under kfp.local: not a fold's own task run.
        adopted_through = parent.data.tags.get(ADOPTED_TAG)
        if inherited is not None and inherited.info.run_id not in (parent_run_id, adopted_through):
            if inherited.data.tags.get(PARENT_TAG) == parent_run_id:
                own = {ROLE_TAG: FOLD_ROLE, FOLD_TAG: str(fold), FOLD_KEY_TAG: key}
                for k, v in own.items():
                    store.set_tag(inherited.info.run_id, k, v)
                return FoldRun(tracking_uri, inherited, fold, owned=False, key=key)
            print(
                f"MLflow: ignoring MLFLOW_RUN_ID={inherited.info.run_id}: not a run of this "
                f"pipeline (parent {parent_run_id}); fold {fold} logs under the parent",
                file=sys.stderr,
            )
        earlier = store.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
            f" and tags.`{FOLD_TAG}` = '{fold}'",
        )
        if earlier:  # a retried task: one run per fold
            run = earlier[0]
            if run.info.status != "FINISHED":
                store.update_run(run.info.run_id, status="RUNNING")
                attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
                store.set_tag(run.info.run_id, ATTEMPT_TAG, str(attempt))
            run = store.get_run(run.info.run_id)
            return FoldRun(tracking_uri, run, fold, owned=True, key=key)
        run = store.create_run(
            parent.info.experiment_id,
            run_name=fold_run_name(fold),
            tags={
                PARENT_TAG: parent_run_id,
                ROLE_TAG: FOLD_ROLE,
                OWNER_TAG: OWNER,
                FOLD_TAG: str(fold),
                FOLD_KEY_TAG: key,
            },
        )
        return FoldRun(tracking_uri, run, fold, owned=True, key=key)

    run = tracked(f"opening fold {fold}'s run under {parent_run_id}", open_run, keep=keep)
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


def fold_checkpoint_runs(store, parent_run_id: str) -> dict[int, tuple[str, dict[str, int]]]:
    """fold -> (the run that holds its logged files, {file name: size}) for the fold runs
    under the parent whose outputs are all logged; a reused fold's files are in the run it
    was reused from. `store`: a `client`."""
    parent = store.get_run(parent_run_id)
    children = store.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{LOGGED_TAG}` = 'true'",
        max_results=1000,
    )
    found = {}
    for child in children:
        if FOLD_TAG not in child.data.tags:  # a nested run that is no fold
            continue
        holder = child.data.tags.get(REUSED_FROM_TAG, child.info.run_id)
        sizes = {a.path: a.file_size for a in store.list_artifacts(holder) if not a.is_dir}
        found[int(child.data.tags[FOLD_TAG])] = (holder, sizes)
    return found
