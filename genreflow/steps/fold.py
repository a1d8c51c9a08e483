"""The fine-tune fold step, and the fold mechanism both fold steps share.

A fold step trains one fold (genreflow.train here, the frozen base's head in
genreflow.steps.head) and around it, the same for both, `tracked_fold`:

- retry in-step: a transient failure (genreflow.retry) costs a retry from the last
  checkpoint, not the fold; FOLD_TRIES in all, the tries of earlier starts of the step
  counted on its MLflow run (KFP ignores `set_retry` inside a ParallelFor on open-source
  backends, kubeflow/pipelines#12389);
- reuse: a fold already trained on the same inputs (their content) with the same settings
  and code is taken from MLflow instead of trained again (`fold_key`);
- failed.json: where the run accepts partial results (min_folds), a fold that still fails
  records why instead of failing the step, and so the whole DAG (kubeflow/pipelines#7330);
- its MLflow run: the pipeline parent's child, with its live curve (genreflow.tracking);
  no tracking URI, no MLflow.

A fine-tune fold also trains in a durable work folder (`work_root`) that outlives its pod,
so a step started again resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from genreflow import __version__, storage
from genreflow.errors import GenreflowError
from genreflow.fold_result import (
    FAILED,
    FINE_TUNE,
    PREDICTIONS,
    FailedFold,
    partial_allowed,
    read_summary,
    write_failure,
)
from genreflow.recipe import TrainConfig
from genreflow.retry import FOLD_TRIES, retry_transient
from genreflow.tracking.fold_runs import FoldRun, fold_run, input_datasets
from genreflow.tracking.live import watching

# The first pause before a retry of the fold's training (then doubling).
FOLD_RETRY_FIRST_DELAY_SECONDS = 30.0
# Under the pipeline root, beside the runs' folders: fine-tune folds' working state.
WORK_FOLDER = "genreflow-work"
# A config's fields that are not settings of the fold's result: its inputs (their content
# counts instead), where it writes, which fold (given apart) and how it runs (device,
# logging, how often it saves resume state).
NOT_SETTINGS = (
    "features",
    "embeddings",
    "out",
    "fold",
    "device",
    "log_every",
    "resume_every_seconds",
)


def fine_tune_fold(
    config: TrainConfig,
    *,
    tracking_uri: str = "",
    parent_run_id: str = "",
    reuse: bool = True,
    min_folds: int = 0,
    expected_folds: Iterable[int] | None = None,
    work_root: str = "",
    pipeline_root: str = "",
) -> dict | FailedFold:
    """Fine-tune one fold (genreflow.train.train_fold) as `tracked_fold` does.

    Args:
        config: the fold's recipe, input and output folder.
        tracking_uri: MLflow ("" = no tracking).
        parent_run_id: the pipeline's parent run, which the fold's run nests under.
        reuse: take an identical fold from MLflow instead of training it again.
        min_folds, expected_folds: with min_folds (0 = all) below the number of expected
            folds (default: this fold alone), a fold that fails for good is recorded in
            config.out/failed.json and returned instead of raised.
        work_root: a folder or gs:// prefix that outlives the step (default: the pipeline
            root's genreflow-work/, where that is a folder or gs:// prefix; "" without
            one): the fold trains in `work_root/folds/fold-KK-<key>`, named by its identity
            (inputs' content, recipe, code), checkpointing there at every evaluation, and
            its outputs are copied into config.out when it ends, so a step started again (a
            restarted pod, a rerun or resubmission) resumes from the last checkpoint.
        pipeline_root: the pipeline root, for the default work root.

    Returns:
        summary.json's content, or the FailedFold of a tolerated failure.
    """
    from genreflow.train import train_fold

    settings = {"path": FINE_TUNE, **fold_settings(config)}
    train = functools.partial(train_fold, config)
    key = ""
    work_root = _work_root(work_root, pipeline_root)
    if work_root:
        key = fold_key([storage.input_path(config.features)], {"fold": config.fold, **settings})
        work = f"{work_root.rstrip('/')}/folds/fold-{config.fold:02d}-{key[:16]}"
        print(f"fold {config.fold}: working in {storage.redacted(work)} (resumes from there)")
        train = functools.partial(_train_in, dataclasses.replace(config, out=work), config.out)
    return tracked_fold(
        train,
        out=config.out,
        fold=config.fold,
        inputs=[config.features],
        settings=settings,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        reuse=reuse,
        tolerate_failure=partial_allowed(min_folds, expected_folds or [config.fold]),
        key=key,
    )


def fold_settings(config) -> dict:
    """What a fold's result depends on in its config (a TrainConfig or a HeadConfig),
    beside its inputs' content, the fold number and the code."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_SETTINGS}


def tracked_fold(
    train: Callable[..., dict],
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
) -> dict | FailedFold:
    """The fold mechanism: train (retried in-step, resuming from its last checkpoint) or
    reuse an identical earlier fold, log it as the parent's child run, return its summary.

    Args:
        train: train(on_evaluation=...) trains the fold into `out` and returns
            summary.json's content, calling on_evaluation (None: nothing to call) with each
            evaluation's metrics.csv row as it happens (the live curve); called again after
            a transient failure, it resumes from the checkpoint it left in `out`.
        out: the fold folder (local where tracked or tolerating failure; else also gs://).
        fold: the fold number (under the filtered protocol, the repetition).
        inputs: the files the fold reads (their content is part of the reuse key).
        settings: everything else the result depends on (protocol, recipe, seed, ...).
        tracking_uri: MLflow ("" = no tracking: train only).
        parent_run_id: the pipeline's parent run.
        reuse: take a finished fold with the same key (same inputs, settings and code) from
            MLflow instead of training it again.
        tolerate_failure: when the pipeline accepts partial results, a fold that still
            fails after its retries does not fail the step: its run ends FAILED,
            `out/failed.json` says why, and the aggregate names it. A SIGTERM always stops
            the step. Only training failures are tolerated: a tracking server that is down
            fails the step, its outputs intact.
        key: the fold's identity (fold_key of inputs and settings), when the caller has it.

    Returns:
        summary.json's content, or the FailedFold of a tolerated failure.
    """
    folder = storage.local_path(out)
    if folder is None and (tracking_uri or tolerate_failure):
        raise GenreflowError(
            f"{storage.redacted(out)}: a tracked fold, or one whose failure is recorded, "
            "writes a local folder; give a local output folder (a fine-tune fold keeps its "
            "durable state in a gs:// work root instead)"
        )
    if tracking_uri and not parent_run_id:
        raise GenreflowError(
            f"fold {fold}: tracking at {storage.redacted(tracking_uri)} needs the pipeline's "
            "parent run (parent_run_id; `genreflow open-run` opens one)"
        )
    if folder is not None:
        (folder / FAILED).unlink(missing_ok=True)  # an earlier attempt's, in this folder

    def train_or_record_failure(run: FoldRun | None = None, on_evaluation=None):
        """Train, retrying transient failures within the fold's tries (those of earlier
        starts of the step counted); a failure that remains is raised, or, where partial
        results are allowed, recorded in failed.json and returned."""
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
            failure = FailedFold(fold, folder, f"{type(exc).__name__}: {exc}")
            write_failure(failure)
            print(f"fold {fold} failed ({failure.reason}); the run goes on to a partial result")
            return failure

    if not tracking_uri:
        return train_or_record_failure()
    inputs = [storage.input_path(path) for path in inputs]
    key = key or fold_key(inputs, {"fold": fold, **settings})
    datasets = input_datasets({path: input_sha256(path) for path in inputs})
    with fold_run(tracking_uri, parent_run_id, fold, key=key, keep=str(folder)) as run:
        # A retried task whose run already holds the fold takes it back; a finished
        # identical fold is reused. Either only where the run's record checks (its files
        # are fetched only then); anything else trains, and is logged again.
        retried = run.logged
        source = run.this if retried else (run.reusable(key) if reuse else None)
        if source is not None:
            try:
                run.fetch(source, folder)
            except GenreflowError as exc:
                print(
                    f"fold {fold}: not reused: cannot reuse run {source.info.run_id} ({exc}); "
                    "training"
                )
                source, run.logged = None, False
        if source is not None:
            if not retried:
                print(
                    f"fold {fold}: reused from MLflow run {run.reused_from} (same inputs and "
                    "recipe)"
                )
                _log_outputs(run, folder, reused_from=run.reused_from, datasets=datasets)
            return read_summary(folder)
        with watching(tracking_uri, run.run_id, fold, datasets=datasets) as on_evaluation:
            result = train_or_record_failure(run, on_evaluation)
        if isinstance(result, FailedFold):
            run.end("FAILED")
            return result
        _log_outputs(run, folder, datasets=datasets)
        return read_summary(folder)


def log_fold(tracking_uri: str, parent_run_id: str, fold_dir: str | Path) -> str:
    """Log an already finished fold folder as a child run of the parent; return its id."""
    summary = read_summary(fold_dir)
    with fold_run(tracking_uri, parent_run_id, int(summary["fold"]), keep=str(fold_dir)) as run:
        _log_outputs(run, Path(fold_dir))
    return run.run_id


def _log_outputs(run: FoldRun, fold_dir: Path, **options) -> None:
    """The fold folder on its run, with the fold's own confusion matrix plot beside it."""
    plots = [_fold_confusion_png(fold_dir)] if (fold_dir / PREDICTIONS).exists() else []
    run.log_outputs(fold_dir, also=plots, **options)


def _fold_confusion_png(fold_dir: Path) -> Path:
    """The fold's own confusion matrix plot, beside the fold folder."""
    from genreflow.aggregate import CONFUSION_PNG, fold_confusion_png
    from genreflow.atomic import write_atomic

    png = fold_confusion_png(fold_dir)
    out = fold_dir.with_name(fold_dir.name + ".confusion")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / CONFUSION_PNG, lambda f: f.write(png))
    return out / CONFUSION_PNG


# --- the fold's identity -----------------------------------------------------------------
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
    package = Path(__file__).resolve().parents[1]
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


# --- the durable work folder -------------------------------------------------------------
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


def _train_in(config: TrainConfig, out: str | Path, *, on_evaluation=None) -> dict:
    """Fine-tune in the durable folder config.out, then copy its outputs into `out`, the
    step's own output folder (the KFP artifact, uploaded only when the step ends)."""
    from genreflow.train import train_fold

    summary = train_fold(config, on_evaluation=on_evaluation)
    storage.copy_folder(config.out, out)
    return summary
