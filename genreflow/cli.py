"""The `genreflow` command: one subcommand per pipeline step.

Each step's subcommand parses its arguments and calls its step function (genreflow.steps);
the KFP components call the same functions, so a step behaves the same from the shell, from
Python and in a pipeline: retry, reuse, failed.json and tracking included. The pipeline's
own subcommands (compile, run, submit) come from the pipelines package through the
`genreflow.commands` entry point. Heavy imports (torch, h5py, kfp, mlflow) happen inside the
handlers so that `genreflow --help` stays instant.

Why one file of this size: it is a flat list of sections, one per subcommand (its parser,
then its handler), and most of its lines are the options' help, which is the command's
documentation; splitting it would scatter that without separating any two jobs.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

from genreflow import __version__, storage
from genreflow.errors import GenreflowError
from genreflow.recipe import (
    PRECISIONS,
    HeadConfig,
    TrainConfig,
    add_options,
    defaults,
    from_options,
)

COMMANDS_GROUP = "genreflow.commands"  # entry points: add_commands(subparsers)
DEVICE_HELP = "auto (default: CUDA when torch sees a GPU), cpu, cuda or cuda:N"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, what is wrong and where to look, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- synth -------------------------------------------------------------------------------
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic GTZAN-shaped genres.tar.gz",
        description="Write DIR/genres.tar.gz: ten genres of synthetic music in the original "
        "GTZAN layout (genres/<genre>/<genre>.000NN.au, 22050 Hz mono 16-bit, with the "
        "release's .mf lists), and print its sha256. Same seed, same bytes.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--clips-per-genre", type=int, default=10, metavar="N", help="default 10")
    p.add_argument("--seconds", type=float, default=5.0, metavar="S", help="clip length (5)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (0)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes making clips (default: 1 for small sets, else the CPU count up to 8)",
    )
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    import os

    from genreflow.data.synth import make_synthetic_gtzan

    workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 8)
    # Spawning workers costs more than a small set takes to make.
    if args.workers is None and args.clips_per_genre * args.seconds < 200:
        workers = 1
    archive, sha256 = make_synthetic_gtzan(
        args.out,
        clips_per_genre=args.clips_per_genre,
        seconds=args.seconds,
        seed=args.seed,
        workers=workers,
        progress=True,
    )
    print(f"sha256  {sha256}  {archive}")
    return 0


# --- download ----------------------------------------------------------------------------
def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch, verify and safely extract a GTZAN archive",
        description="Fetch a GTZAN archive (resuming and retrying over HTTP), verify its "
        "checksum, extract it safely into --out and print the dataset root and the clips "
        "per genre. A second run over a verified result does nothing.",
    )
    p.add_argument(
        "--source",
        required=True,
        help="https://, http://, gs://BUCKET/OBJECT, file:// or a local path: an archive "
        "(.tar.gz, .tgz, .tar, .zip) or an already extracted folder (used in place)",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="folder that receives the extracted tree"
    )
    p.add_argument(
        "--sha256",
        help="expected SHA-256 of the archive (hex), or 'original': a copy of the original "
        "genres.tar.gz, checked against the original's checksums (built in)",
    )
    p.add_argument("--md5", help="expected MD5 of the archive (hex; built in for the official URL)")
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from genreflow.steps.download import download

    fetched = download(args.source, args.out, sha256=args.sha256 or "", md5=args.md5 or "")
    counts = fetched.clips()
    print(fetched.root)
    for genre, count in counts.items():
        print(f"  {genre:<10} {count:>5}")
    print(f"  {'total':<10} {sum(counts.values()):>5}")
    return 0


# --- pack --------------------------------------------------------------------------------
def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="decode, resample and pack clips into one HDF5 file",
        description="Decode every clip of an extracted GTZAN tree, mix to mono, resample "
        "to 32 kHz, pad or trim to the clip length and store int16 waveforms (or, with "
        "--representation logmel, Cnn14's frozen front-end output for them), one-hot "
        "targets and the seed's folds in one HDF5 file.",
    )
    p.add_argument("--dataset", required=True, type=Path, help="extracted GTZAN tree")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE|gs://",
        help="HDF5 file to write: a path, or gs://BUCKET/OBJECT (packed locally, then uploaded)",
    )
    p.add_argument(
        "--clip-seconds", type=float, default=30.0, help="clip length in seconds (default 30)"
    )
    p.add_argument(
        "--representation",
        choices=("waveform", "logmel"),
        default="waveform",
        help="store the clips as int16 waveforms (the seed's form, default) or as Cnn14's "
        "float16 log-mel (a fifth of the bytes; training and embedding give the same "
        "numbers up to float16 rounding)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: every core)"
    )
    p.add_argument(
        "--on-error",
        choices=("skip", "fail"),
        default="skip",
        help="an unreadable clip: leave it out and record why (skip, default), or stop (fail)",
    )
    p.add_argument(
        "--source-sha256", default=None, metavar="HEX", help="the archive's sha256, recorded"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_run_pack)


def _run_pack(args: argparse.Namespace) -> int:
    from genreflow.features import describe
    from genreflow.steps.pack import pack

    summary = pack(
        args.dataset,
        args.out,
        clip_seconds=args.clip_seconds,
        representation=args.representation,
        workers=args.workers,
        on_error=args.on_error,
        source_sha256=args.source_sha256 or "",
        progress=not args.no_progress,
    )
    print(describe(summary.path))
    print(summary)
    return 0


# --- train -------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune Cnn14 on one cross-validation fold",
        description="Train on the training rows, keep the checkpoint that does best on the "
        "validation rows (best.pth), report it on the test rows; write last.pth, best.pth, "
        "metrics.csv, predictions.csv and summary.json to DIR. --protocol cv10 (default): "
        "fold K is the test fold and fold K+1 (10 -> 1) the validation fold; --protocol "
        "filtered: the fault-filtered GTZAN lists. Killed, the same command resumes from "
        "the last checkpoint; rerun when finished, it does nothing. A transient failure (the "
        "network, storage) is retried from the last checkpoint, 3 tries in all. The recipe's "
        "defaults are the seed's (panns_transfer_to_gtzan). With --parent-run-id the fold "
        "is the pipeline step exactly: an MLflow child run, reused when an identical fold "
        "was logged before.",
    )
    p.add_argument(
        "--features",
        required=True,
        metavar="FILE|URL|gs://",
        help="packed features.h5: a path, http(s):// or gs:// (downloaded once, cached)",
    )
    p.add_argument(
        "--fold",
        required=True,
        type=int,
        metavar="K",
        help="cv10: the test fold, 1..10; filtered: the repetition, 1, 2, ... (seed + K - 1)",
    )
    _add_split_options(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR|gs://",
        help="output folder, or gs://BUCKET/PREFIX: trained in a local folder in the cache, "
        "uploaded at each checkpoint and at the end",
    )
    p.add_argument(
        "--pretrained",
        metavar="PATH|URL|gs://",
        help="start from this checkpoint (PANNs published or fine-tuned); default: random",
    )
    p.add_argument("--pretrained-sha256", metavar="HEX", help="expected sha256 of --pretrained")
    p.add_argument(
        "--freeze-base", action="store_true", help="train the new head only (no base gradients)"
    )
    add_options(p, TrainConfig)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    _add_fold_step_options(p)
    p.add_argument(
        "--work-root",
        default="",
        metavar="DIR|gs://",
        help="train in WORK_ROOT/folds/fold-KK-<identity> (a folder or gs:// prefix that "
        "outlives this machine), checkpointing there, and copy the outputs into --out: run "
        "again anywhere, the fold resumes from its last checkpoint (default: train in --out)",
    )
    p.set_defaults(func=_run_train)


def _add_fold_step_options(p: argparse.ArgumentParser) -> None:
    """What the fold steps (train, train-head) take beside the recipe, as in the pipeline."""
    p.add_argument(
        "--parent-run-id",
        default="",
        metavar="ID",
        help="log the fold as a child run of this MLflow run (a pipeline's parent run, "
        "from `genreflow open-run`); default: no tracking",
    )
    _add_tracking_uri(p)
    p.add_argument(
        "--no-reuse",
        dest="reuse",
        action="store_false",
        help="train even when MLflow holds an identical fold (same input, recipe, code)",
    )
    _add_folds_options(
        p,
        "fewest usable folds the run accepts: below the number of --folds, "
        "a fold that fails for good writes failed.json into --out and exits 0, so that the "
        "run goes on to a partial result (default 0: every fold must succeed)",
    )


def _add_folds_options(p: argparse.ArgumentParser, min_folds_help: str) -> None:
    p.add_argument("--min-folds", type=int, default=0, metavar="N", help=min_folds_help)
    p.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=list(range(1, 11)),
        metavar="K",
        help="the folds (repetitions, under filtered) the run was meant to have (default: 1 to 10)",
    )


def _tracking(args: argparse.Namespace) -> str:
    """The tracking URI of a step given --parent-run-id ("" without: no tracking)."""
    from genreflow.tracking.client import default_tracking_uri

    if not args.parent_run_id:
        if args.tracking_uri:
            raise GenreflowError(
                "--tracking-uri needs --parent-run-id, the run to log under "
                "(`genreflow open-run` opens one)"
            )
        return ""
    return args.tracking_uri or default_tracking_uri()


def _said_fold(result, out: str) -> str:
    """A fold step's result in one line: its accuracy, or why it failed."""
    from genreflow.fold_result import FailedFold

    if isinstance(result, FailedFold):
        return f"fold {result.fold} failed ({result.reason}): recorded in {out}/failed.json"
    return (
        f"fold {result['fold']} ({result['protocol']}): test accuracy "
        f"{result['final_accuracy']:.3f} of the checkpoint of iteration "
        f"{result['selected_iteration']} (chosen on {result['selection']}) -> {out}"
    )


def _add_split_options(p: argparse.ArgumentParser) -> None:
    """--protocol and --selection, as train and train-head share them (genreflow.splits)."""
    p.add_argument(
        "--protocol",
        choices=("cv10", "filtered"),
        default="cv10",
        help="cv10 (default): the seed's 10-fold CV; filtered: the fault-filtered split "
        "(443 train, 197 validation, 290 test clips; the other clips are excluded)",
    )
    p.add_argument(
        "--selection",
        choices=("validation", "heldout"),
        default="validation",
        help="what chooses the checkpoint: validation (default; cv10: fold K+1) or "
        "heldout (the test rows themselves, as the seed did: optimistic)",
    )


def _run_train(args: argparse.Namespace) -> int:
    from genreflow.steps.fold import fine_tune_fold

    config = from_options(
        TrainConfig,
        args,
        features=args.features,
        fold=args.fold,
        out=args.out,
        pretrained=args.pretrained,
        pretrained_sha256=args.pretrained_sha256,
        freeze_base=args.freeze_base,
        seed=args.seed,
        device=args.device,
        protocol=args.protocol,
        selection=args.selection,
    )
    result = fine_tune_fold(
        config,
        tracking_uri=_tracking(args),
        parent_run_id=args.parent_run_id,
        reuse=args.reuse,
        min_folds=args.min_folds,
        expected_folds=args.folds,
        work_root=args.work_root,
    )
    print(_said_fold(result, args.out))
    return 0


# --- embed / predict ---------------------------------------------------------------------
def _add_inference(sub: argparse._SubParsersAction) -> None:
    clip_help = "cut files into clips of S seconds (default: the checkpoint's, else 30)"
    p = sub.add_parser(
        "embed",
        help="write 2048-d Cnn14 embeddings of audio files",
        description="One row per file, in the order given, to a .npy file. A file longer "
        "than one clip is cut into consecutive clips whose embeddings are averaged.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="PANNs published or fine-tuned"
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files")
    p.add_argument("--out", required=True, metavar="OUT.npy", help="where to write")
    p.add_argument("--clip-seconds", type=float, metavar="S", help=clip_help)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=_run_embed)

    p = sub.add_parser(
        "predict",
        help="genre probabilities of audio files",
        description="Genre probabilities per file; several --checkpoint (the fold models) "
        "are averaged into an ensemble.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        action="append",
        dest="checkpoints",
        metavar="CKPT",
        help="a fine-tuned checkpoint; repeat for an ensemble",
    )
    source.add_argument(
        "--model",
        metavar="URI",
        help="a fold ensemble in MLflow: models:/NAME/VERSION, models:/NAME@ALIAS (e.g. "
        "@champion) or models:/MODEL_ID",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files")
    p.add_argument(
        "--json", action="store_true", help="print a JSON list of {file, genre, probabilities}"
    )
    p.add_argument("--clip-seconds", type=float, metavar="S", help=clip_help)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=_run_predict)


def _run_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from genreflow.atomic import write_atomic
    from genreflow.inference import embed

    out = Path(args.out)
    if not out.parent.is_dir():
        raise GenreflowError(f"{out}: folder {out.parent} does not exist")
    embeddings = embed(
        args.checkpoint, args.files, clip_seconds=args.clip_seconds, device=args.device
    )
    write_atomic(out, lambda f: np.save(f, embeddings))
    print(f"{embeddings.shape[0]} x {embeddings.shape[1]} embeddings -> {out}")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    import json

    from genreflow.inference import format_table, predict, predict_model

    if args.model:
        results = predict_model(args.model, args.files, device=args.device)
    else:
        results = predict(
            args.checkpoints, args.files, clip_seconds=args.clip_seconds, device=args.device
        )
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


# --- aggregate ---------------------------------------------------------------------------
def _add_aggregate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        help="pool the folds' held-out predictions into the cross-validation report",
        description="Read each fold folder's predictions.csv and summary.json and write "
        "report.json, report.html, confusion.csv, confusion.png and per_genre.csv into --out. "
        "With --parent-run-id, the pipeline's report step exactly: the fold ensemble logged "
        "as the parent run's model (and registered with --registered-model), the aggregate "
        "metrics and the report logged on the parent run.",
    )
    p.add_argument(
        "--fold-dir",
        dest="fold_dirs",
        action="append",
        required=True,
        type=Path,
        metavar="DIR",
        help="a fold's training output folder (repeat once per fold)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="report folder")
    _add_folds_options(
        p, "fewest usable folds for a (partial) report; fewer is an error (default 0: every fold)"
    )
    p.add_argument(
        "--protocol",
        default=None,
        choices=["cv10", "filtered"],
        help="the evaluation protocol that produced the folds (default: what the folds' "
        "summary.json record; cv10 where they record none); given, it must agree with them",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=None,
        help="cv10: n_train / (n_train + n_test) of one fold for the interval correction "
        "(default: derived from the fold sizes)",
    )
    p.add_argument(
        "--parent-run-id",
        default="",
        metavar="ID",
        help="log the report and the fold ensemble on this MLflow run (the folds' parent); "
        "default: no tracking",
    )
    _add_tracking_uri(p)
    p.add_argument(
        "--registered-model",
        default="",
        metavar="NAME",
        help="register the fold ensemble as a version of NAME, alias candidate (default: "
        "log it, do not register)",
    )
    p.add_argument(
        "--register-anyway",
        action="store_true",
        help="register it even when chosen on test data (selection heldout) or partial",
    )
    p.add_argument(
        "--clip-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="the clip length the fold models read: the logged ensemble's input (default 30)",
    )
    p.add_argument(
        "--embeddings",
        type=Path,
        default=None,
        metavar="DIR",
        help="frozen base: the embed-features folder whose base.pth the heads share",
    )
    p.set_defaults(func=_run_aggregate)


def _run_aggregate(args: argparse.Namespace) -> int:
    from genreflow.aggregate import REPORT_HTML, REPORT_JSON, headline
    from genreflow.embedding import BASE
    from genreflow.steps.report import report as write_report

    report = write_report(
        args.fold_dirs,
        args.out,
        expected_folds=args.folds,
        min_folds=args.min_folds,
        protocol=args.protocol,
        train_fraction=args.train_fraction,
        clip_seconds=args.clip_seconds,
        tracking_uri=_tracking(args),
        parent_run_id=args.parent_run_id,
        registered_model=args.registered_model,
        register_anyway=args.register_anyway,
        base=args.embeddings / BASE if args.embeddings else None,
    )
    for line in headline(report):
        print(line)
    print(f"report: {args.out / REPORT_HTML} (data: {args.out / REPORT_JSON})")
    return 0


# --- open-run / close-run ---------------------------------------------------------------
def _add_run_steps(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "open-run",
        help="open a pipeline run's MLflow parent run, for folds run by hand to nest under",
        description="Open the MLflow parent run that the pipeline's first step opens, tagged "
        "and with the parameters given; print its id on stdout (for --parent-run-id of "
        "train, train-head and aggregate) and where to look at it on stderr. Close it with "
        "close-run.",
    )
    _add_tracking_uri(p)
    p.add_argument("--experiment", default=None, help="the experiment (default genreflow-gtzan)")
    p.add_argument("--name", default="", help="the run's name (default: MLflow's)")
    p.add_argument(
        "--pipeline-run-id",
        default=None,
        metavar="ID",
        help="the pipeline run's id, a tag by which close-run finds the run (default: a new one)",
    )
    p.add_argument("--profile", default="custom", help="a tag (default custom)")
    _add_split_options(p)
    p.add_argument("--source", default="", help="the dataset's source, a param")
    p.add_argument("--sha256", default="", help="its checksum (or 'original'), the data.sha256 tag")
    p.add_argument("--pretrained", default="", help="the checkpoint the folds start from, a param")
    p.add_argument("--freeze-base", action="store_true", help="the frozen-base path (a tag)")
    p.add_argument("--clip-seconds", type=float, default=30.0, help="a param (default 30)")
    p.add_argument("--seed", type=int, default=0, help="a param (default 0)")
    p.add_argument(
        "--representation", choices=("waveform", "logmel"), default="waveform", help="a param"
    )
    p.set_defaults(func=_run_open_run)

    p = sub.add_parser(
        "close-run",
        help="close a pipeline run's MLflow parent run with its final state",
        description="End the parent run that open-run (or the pipeline) opened for this "
        "pipeline run id: SUCCEEDED -> FINISHED, FAILED, CANCELED -> KILLED; a fold run left "
        "RUNNING ends too.",
    )
    _add_tracking_uri(p)
    p.add_argument("--pipeline-run-id", required=True, metavar="ID", help="as open-run said")
    p.add_argument(
        "--state",
        required=True,
        type=str.upper,
        choices=("SUCCEEDED", "FAILED", "CANCELED"),
        help="the pipeline run's final state",
    )
    p.set_defaults(func=_run_close_run)


def _run_open_run(args: argparse.Namespace) -> int:
    import uuid

    from genreflow.steps.run import open_run
    from genreflow.tracking.addresses import print_addresses
    from genreflow.tracking.client import DEFAULT_EXPERIMENT, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    pipeline_run_id = args.pipeline_run_id or f"genreflow-{uuid.uuid4().hex[:12]}"
    parent = open_run(
        uri,
        experiment=args.experiment or DEFAULT_EXPERIMENT,
        pipeline_run=args.name,
        pipeline_run_id=pipeline_run_id,
        profile=args.profile,
        protocol=args.protocol,
        selection=args.selection,
        source=args.source,
        sha256=args.sha256,
        pretrained=args.pretrained,
        freeze_base=args.freeze_base,
        clip_seconds=args.clip_seconds,
        seed=args.seed,
        representation=args.representation,
    )
    print(parent.run_id)
    print_addresses(uri, parent.run_id, file=sys.stderr)
    print(
        f"close it with: genreflow close-run --pipeline-run-id {pipeline_run_id} --state SUCCEEDED",
        file=sys.stderr,
    )
    return 0


def _run_close_run(args: argparse.Namespace) -> int:
    from genreflow.steps.run import close_run
    from genreflow.tracking.client import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if close_run(uri, args.pipeline_run_id, args.state) is None:
        raise GenreflowError(f"{uri}: no parent run of pipeline run {args.pipeline_run_id}")
    return 0


# --- compare -----------------------------------------------------------------------------
def _add_tracking_uri(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else workspace/mlflow.db)",
    )


def _add_mlflow_options(p: argparse.ArgumentParser, written: str) -> None:
    """--tracking-uri and --markdown, for the commands that read MLflow and report to CI."""
    _add_tracking_uri(p)
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"also write {written} as Markdown, fit for a CI comment",
    )


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two pipeline runs from MLflow: aggregate metrics and per-fold differences",
        description="Read two pipeline runs (MLflow parent run ids) and their fold runs; print "
        "their aggregate metrics side by side (A, B, B - A), the per-fold differences, a test "
        "(paired with the Nadeau-Bengio correction for cv10, Welch's for filtered "
        "repetitions) and a one-line verdict. Exit status 0 whatever the verdict.",
    )
    p.add_argument("run_a", metavar="RUN_A", help="run A's MLflow parent run id")
    p.add_argument("run_b", metavar="RUN_B", help="run B's MLflow parent run id")
    _add_mlflow_options(p, "the comparison")
    p.add_argument(
        "--metric",
        default="final_accuracy",
        help="the fold runs' metric to compare fold by fold (default: final_accuracy)",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=None,
        help="cv10: n_train / (n_train + n_test) of one fold for the correction (default: "
        "the parents' test_train_ratio metric, else (k-1)/k for k folds)",
    )
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from genreflow.compare import compare_runs, render_text, write_markdown

    result = compare_runs(
        args.run_a,
        args.run_b,
        tracking_uri=args.tracking_uri,
        metric=args.metric,
        train_fraction=args.train_fraction,
    )
    print(render_text(result), end="")
    if args.markdown is not None:
        print(f"markdown: {write_markdown(result, args.markdown)}")
    return 0


# --- ui ----------------------------------------------------------------------------------
def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="serve the MLflow UI on the runs and print where the latest pipeline run is",
        description="Print the MLflow UI's addresses of the latest pipeline run (its parent "
        "run, the experiment's runs table, its folds side by side and their test accuracy "
        "curves), in the UI's classic view, then serve the UI on a database or folder "
        "(`mlflow ui`) until Ctrl-C. A tracking server serves its own UI: only the "
        "addresses are printed.",
    )
    _add_tracking_uri(p)
    p.add_argument("--experiment", default=None, help="the experiment (default genreflow-gtzan)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port to serve on (default 5000)")
    p.add_argument("--no-serve", action="store_true", help="print the addresses only")
    p.set_defaults(func=_run_ui)


def _run_ui(args: argparse.Namespace) -> int:
    from genreflow.tracking.addresses import print_addresses
    from genreflow.tracking.client import (
        DEFAULT_EXPERIMENT,
        default_tracking_uri,
        local_artifact_root,
    )
    from genreflow.tracking.runs import latest_pipeline_run

    uri = args.tracking_uri or default_tracking_uri()
    served = not uri.startswith(("http://", "https://"))
    # Opening a database that is not there would make an empty one.
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise GenreflowError(f"{uri}: no MLflow database there yet (make run writes one)")
    ui = f"http://{args.host}:{args.port}" if served else ""
    experiment = args.experiment or DEFAULT_EXPERIMENT
    latest = latest_pipeline_run(uri, experiment)
    if latest is None:
        print(f"no pipeline run in experiment {experiment} at {storage.redacted(uri)} yet")
    else:
        print(f"latest pipeline run: {latest.info.run_name} ({latest.info.run_id})")
        print_addresses(uri, latest.info.run_id, ui=ui)
    if args.no_serve or not served:
        return 0
    print(f"MLflow UI on {ui} (Ctrl-C stops it)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    if (root := local_artifact_root(uri)) is not None:  # the runs' artifacts, and any new ones
        command += ["--default-artifact-root", root.as_uri(), "--artifacts-destination", str(root)]
    os.execv(sys.executable, [*command, "--host", args.host, "--port", str(args.port)])
    return 0  # not reached: the process is mlflow ui's now


# --- promote -----------------------------------------------------------------------------
def _add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="move the registered model's alias champion to its candidate, if no worse",
        description="Compare the registered model's candidate (alias candidate, or "
        "--version) with its champion as `genreflow compare` does (champion = A, candidate "
        "= B) and move the alias champion to the candidate unless that shows a significant "
        "loss (the corrected 95%% interval of B - A below 0), or cannot be made (another "
        "protocol, data or split; too few folds); a candidate chosen on test data or partial "
        "is held back; the first candidate becomes champion. Prints the verdict. Exit "
        "status 0 when the candidate is the champion afterwards, 1 when held back.",
    )
    p.add_argument("model", metavar="NAME", help="the registered model, e.g. genreflow-gtzan-cnn14")
    p.add_argument("--version", default=None, help="the version to promote (default: @candidate)")
    _add_mlflow_options(p, "the verdict (and the comparison)")
    p.set_defaults(func=_run_promote)


def _run_promote(args: argparse.Namespace) -> int:
    from genreflow.registry import promote, write_markdown
    from genreflow.tracking.client import default_tracking_uri

    result = promote(args.tracking_uri or default_tracking_uri(), args.model, version=args.version)
    print(f"{args.model} version {result['candidate']['version']}: {result['decision']}")
    if args.markdown is not None:
        print(f"markdown: {write_markdown(result, args.markdown)}")
    return 0 if result["promoted"] else 1


# --- embed-features / train-head (the frozen-base fast path) -----------------------------
def _add_frozen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed-features",
        help="frozen base: embed every packed clip once (eval mode) into embeddings.h5",
        description="Push every clip of a packed features.h5 through the Cnn14 base once "
        "and write DIR/embeddings.h5 and DIR/base.pth (the base that made them). Killed, "
        "the same command resumes; rerun when finished, it does nothing.",
    )
    p.add_argument(
        "--features",
        required=True,
        metavar="FILE|URL|gs://",
        help="packed features.h5: a path, http(s):// or gs:// (downloaded once, cached)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--pretrained",
        metavar="SRC",
        help="base checkpoint: path, file://, http(s):// or gs:// (default: a random "
        "base seeded with --seed, for demos only)",
    )
    p.add_argument("--pretrained-sha256", metavar="HEX", help="expected sha256 of --pretrained")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="default: 16")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="bf16 autocast or fp32, as for train; auto (default): bf16 where the CPU or GPU "
        "computes in bf16 natively, else fp32",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile the base (bf16 only; about a minute, then faster); auto "
        "(default): on a CPU when the clips hold 3 hours of audio or more",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a random base (default: 0)")
    p.set_defaults(func=_run_embed_features)

    head = defaults(HeadConfig)
    p = sub.add_parser(
        "train-head",
        help="frozen base: train the genre head of one fold on stored embeddings",
        description="Train fc_transfer on the training rows' embeddings, keep the head that "
        "does best on the validation rows, report it on the test rows (--protocol and "
        "--selection as for train); writes metrics.csv, predictions.csv, summary.json and "
        "head.pth to --out; retried, reused and tracked as train is. "
        f"The head's recipe (genreflow.recipe.HeadConfig): {head['iterations']} full-batch "
        f"steps (batch size {head['batch_size']}), lr {head['lr']}, weight decay "
        f"{head['weight_decay']}, {'mixup' if head['mixup'] else 'no mixup'} (alpha "
        f"{head['mixup_alpha']} when on), evaluation every {head['eval_every']} steps, "
        f"seed {HeadConfig.seed}.",
    )
    p.add_argument(
        "--embeddings",
        required=True,
        metavar="FILE|URL|gs://",
        help="embeddings.h5: a path, http(s):// or gs:// (downloaded once, cached)",
    )
    p.add_argument(
        "--fold",
        required=True,
        type=int,
        metavar="K",
        help="cv10: the test fold, 1..10; filtered: the repetition, 1, 2, ... (seed + K - 1)",
    )
    _add_split_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_options(p, HeadConfig)
    p.add_argument("--seed", type=int, default=HeadConfig.seed, help="seeds sampling and mixup")
    _add_fold_step_options(p)
    p.set_defaults(func=_run_train_head)


def _run_embed_features(args: argparse.Namespace) -> int:
    import json

    from genreflow.steps.embed import embed

    summary = embed(
        args.features,
        args.out,
        pretrained=args.pretrained or "",
        pretrained_sha256=args.pretrained_sha256 or "",
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        compile_base=args.compile,
        seed=args.seed,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _run_train_head(args: argparse.Namespace) -> int:
    import json

    from genreflow.fold_result import FailedFold
    from genreflow.steps.head import head_fold

    config = from_options(
        HeadConfig,
        args,
        embeddings=args.embeddings,
        fold=args.fold,
        out=args.out,
        seed=args.seed,
        protocol=args.protocol,
        selection=args.selection,
    )
    result = head_fold(
        config,
        tracking_uri=_tracking(args),
        parent_run_id=args.parent_run_id,
        reuse=args.reuse,
        min_folds=args.min_folds,
        expected_folds=args.folds,
    )
    failed = isinstance(result, FailedFold)
    print(_said_fold(result, args.out) if failed else json.dumps(result, indent=2))
    return 0


# -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="genreflow",
        description="Fine-tune PANNs Cnn14 on GTZAN: every pipeline step as a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"genreflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_synth,
        _add_download,
        _add_pack,
        _add_train,
        _add_inference,
        _add_aggregate,
        _add_run_steps,
        _add_compare,
        _add_promote,
        _add_frozen,
        _add_ui,
    ):
        add(sub)
    # Steps that live outside the library (the pipeline's compile, run and submit, from
    # genreflow.pipelines.commands) register here through an entry point, so that the
    # library never imports them.
    for entry_point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry_point.load()(sub)
    return parser


# What to do about the file-system errors a path argument commonly meets.
_OS_ERROR_HINTS = {
    FileNotFoundError: "check the path",
    PermissionError: "choose a path you may use, or change its permissions",
    IsADirectoryError: "give a file there, not a folder",
    NotADirectoryError: "a part of that path is a file, not a folder",
    FileExistsError: "remove it or choose another path",
}


def os_error_line(exc: OSError) -> str:
    """An OSError as one line: the path, what is wrong and, where known, what to do."""
    if exc.filename is None:
        return str(exc)
    where = str(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    line = f"{where}: {exc.strerror or exc}"
    hint = next((h for kind, h in _OS_ERROR_HINTS.items() if isinstance(exc, kind)), None)
    return f"{line} ({hint})" if hint else line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except GenreflowError as exc:
        message = str(exc)
    except OSError as exc:  # a path argument the system refused: the user's to fix
        message = os_error_line(exc)
    message = storage.redacted_text(" ".join(message.split()))
    print(f"genreflow {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
