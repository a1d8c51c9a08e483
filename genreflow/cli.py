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
    p = sub.add_parser("download", help="fetch, verify and safely extract a GTZAN archive")
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    raise GenreflowError("download: not implemented yet")


# --- pack --------------------------------------------------------------------------------
def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="decode, resample and pack clips into one HDF5 file")
    p.set_defaults(func=_run_pack)


def _run_pack(args: argparse.Namespace) -> int:
    raise GenreflowError("pack: not implemented yet")


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


# -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genreflow",
        description="Fine-tune PANNs Cnn14 on GTZAN: every pipeline step as a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"genreflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_download, _add_pack, _add_train, _add_inference):
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
