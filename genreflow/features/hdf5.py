"""Opening an HDF5 file that genreflow reads (a packed features file, an embeddings file):
found, opened and checked for what its kind must hold in one place, each problem a
one-line error naming the file."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from genreflow import storage
from genreflow.errors import GenreflowError


@contextmanager
def open_checked(source: str | os.PathLike, kind: str) -> Iterator[tuple[Path, h5py.File]]:
    """(local path, the open file) of `source`, a path or a file://, http(s):// or gs:// URI
    (remote: downloaded once, into the cache); `kind` names the file in errors
    ("features", "embeddings"). Check its contents with `require`.

    Raises:
        GenreflowError: no such file, or not one HDF5 can read.
    """
    path = storage.input_path(source)
    if not path.is_file():
        raise GenreflowError(f"{path}: {kind} file not found")
    try:
        hf = h5py.File(path, "r")
    except OSError as exc:
        raise GenreflowError(f"{path}: not a readable HDF5 file ({exc})") from None
    with hf:
        yield path, hf


def require(
    hf: h5py.File, path: Path, what: str, datasets: Sequence[str], attrs: Sequence[str]
) -> None:
    """An open file must hold these datasets and attributes, or it is not `what`.

    Raises:
        GenreflowError: naming every one that is missing.
    """
    missing = [f"dataset '{d}'" for d in datasets if d not in hf]
    missing += [f"attribute '{a}'" for a in attrs if a not in hf.attrs]
    if missing:
        raise GenreflowError(f"{path}: not {what}, missing {', '.join(missing)}")


def plain(value: object) -> object:
    """An HDF5 attribute as a plain Python value (lists, str, ints, floats): JSON- and
    checkpoint-safe."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def plain_attrs(hf: h5py.File) -> dict:
    """Every attribute of an open file, as plain values."""
    return {key: plain(value) for key, value in hf.attrs.items()}
