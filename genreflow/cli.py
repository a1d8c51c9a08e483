"""The `genreflow` command: one subcommand per pipeline step.

Each subcommand parses its arguments and calls one library function; the KFP components
call the same functions, so a step behaves the same from the shell, from Python and in
a pipeline. Heavy imports (torch, h5py, kfp, mlflow) happen inside the handlers so that
`genreflow --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genreflow import __version__
from genreflow.errors import GenreflowError


# --- synth -------------------------------------------------------------------------------
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic GTZAN-shaped genres.tar.gz")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    raise GenreflowError("synth: not implemented yet")


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
    p.add_argument("--sha256", help="expected SHA-256 of the archive (hex)")
    p.add_argument("--md5", help="expected MD5 of the archive (hex; built in for the official URL)")
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from genreflow.data.download import count_clips, download

    root = download(args.source, args.out, sha256=args.sha256, md5=args.md5)
    counts = count_clips(root)
    print(root)
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
        "to 32 kHz, pad or trim to the clip length and store int16 waveforms, one-hot "
        "targets and the seed's folds in one HDF5 file.",
    )
    p.add_argument("--dataset", required=True, type=Path, help="extracted GTZAN tree")
    p.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    p.add_argument(
        "--clip-seconds", type=float, default=30.0, help="clip length in seconds (default 30)"
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
    from genreflow.features import describe, pack

    summary = pack(
        args.dataset,
        args.out,
        clip_seconds=args.clip_seconds,
        workers=args.workers,
        on_error=args.on_error,
        source_sha256=args.source_sha256,
        progress=not args.no_progress,
    )
    print(describe(summary.path))
    print(summary)
    return 0


# --- train -------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune Cnn14 on one cross-validation fold")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    raise GenreflowError("train: not implemented yet")


# --- embed / predict ---------------------------------------------------------------------
def _add_inference(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write 2048-d Cnn14 embeddings of audio files")
    p.set_defaults(func=_run_embed)
    p = sub.add_parser("predict", help="genre probabilities of audio files")
    p.set_defaults(func=_run_predict)


def _run_embed(args: argparse.Namespace) -> int:
    raise GenreflowError("embed: not implemented yet")


def _run_predict(args: argparse.Namespace) -> int:
    raise GenreflowError("predict: not implemented yet")


# --- aggregate ---------------------------------------------------------------------------
def _add_aggregate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        help="pool the folds' held-out predictions into the cross-validation report",
        description="Read each fold folder's predictions.csv and summary.json and write "
        "report.json, report.html, confusion.csv, confusion.png and per_genre.csv into --out.",
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
    p.add_argument(
        "--min-folds",
        type=int,
        default=10,
        metavar="N",
        help="fewest usable folds for a (partial) report; fewer is an error (default: 10)",
    )
    p.add_argument(
        "--protocol",
        default="cv10",
        help="the evaluation protocol that produced the folds: cv10 or filtered (default: cv10)",
    )
    p.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=list(range(1, 11)),
        metavar="K",
        help="the folds the run was meant to have (default: 1 to 10)",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        default=None,
        help="n_train / (n_train + n_test) of one fold for the interval correction "
        "(default: derived from the fold sizes)",
    )
    p.set_defaults(func=_run_aggregate)


def _run_aggregate(args: argparse.Namespace) -> int:
    from genreflow.aggregate import REPORT_HTML, REPORT_JSON, aggregate, headline

    report = aggregate(
        args.fold_dirs,
        args.out,
        expected_folds=args.folds,
        min_folds=args.min_folds,
        protocol=args.protocol,
        train_fraction=args.train_fraction,
    )
    for line in headline(report):
        print(line)
    print(f"report: {args.out / REPORT_HTML} (data: {args.out / REPORT_JSON})")
    return 0


# --- compile / run (the pipeline) -------------------------------------------------------
def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile the KFP pipeline to IR YAML")
    p.add_argument("--out", type=Path, default=Path("pipeline.yaml"), help="the YAML to write")
    p.add_argument("--parallelism", type=int, default=10, help="folds trained at once")
    p.add_argument("--accelerator", default=None, help="GPU type (default nvidia.com/gpu)")
    p.add_argument("--image-cpu", default=None, help="image for the CPU steps (tag or digest)")
    p.add_argument("--image-gpu", default=None, help="image for the GPU steps (tag or digest)")
    p.set_defaults(func=_run_compile)

    p = sub.add_parser("run", help="run the whole pipeline locally through kfp.local")
    p.add_argument("--profile", default="demo", help="demo (synthetic, minutes) or seed")
    p.add_argument("--workspace", type=Path, default=Path("workspace"))
    p.add_argument("--source", default=None, help="dataset archive, URL or folder")
    p.add_argument("--sha256", default="", help="the source archive's SHA-256")
    p.add_argument("--tracking-uri", default=None, help="MLflow (default: workspace sqlite)")
    p.add_argument("--no-cache", action="store_true", help="rerun download/pack/embed too")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pipeline argument (JSON value), e.g. --set folds=[1,2] --set lr=3e-4",
    )
    p.set_defaults(func=_run_run)


def _run_compile(args: argparse.Namespace) -> int:
    from genreflow.pipelines.compile import compile_pipeline
    from genreflow.pipelines.cv import ACCELERATOR

    out = compile_pipeline(
        args.out,
        parallelism=args.parallelism,
        accelerator=args.accelerator or ACCELERATOR,
        image_cpu=args.image_cpu,
        image_gpu=args.image_gpu,
    )
    print(out)
    return 0


def _parse_overrides(pairs: list[str]) -> dict:
    import json

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise GenreflowError(f"--set {pair}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string
    return overrides


def _run_run(args: argparse.Namespace) -> int:
    from genreflow.pipelines.local import run_local

    report = run_local(
        args.workspace,
        profile=args.profile,
        source=args.source,
        sha256=args.sha256,
        tracking_uri=args.tracking_uri,
        overrides=_parse_overrides(args.set),
        cache=not args.no_cache,
    )
    print(report)
    return 0


# -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genreflow",
        description="Fine-tune PANNs Cnn14 on GTZAN: every pipeline step as a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"genreflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_download, _add_pack, _add_train, _add_inference, _add_aggregate, _add_pipeline):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (GenreflowError, FileNotFoundError) as exc:
        print(f"genreflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
