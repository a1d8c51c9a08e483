"""Opening an HDF5 file that genreflow reads (a packed features file, an embeddings file):
found, opened and checked for what its kind must hold in one place, each problem a
one-line error naming the file.

A file is untrusted input, and HDF5 lets one reach beyond itself: a dataset's bytes may
live in other files (external storage, virtual datasets) and a link may point elsewhere
(soft and external links). Reading such a dataset reads whatever file it names (say
/proc/self/environ, secrets included) into rows that an error message could then quote.
So every file is walked once when it opens, and refused if anything in it reaches out;
messages show what a file holds only through `shown` (escaped, a short prefix).
"""

from __future__ import annotations

import os
import unicodedata
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
        refuse_outside_references(hf, path)
        yield path, hf


def refuse_outside_references(hf: h5py.File, path: Path) -> None:
    """Every link in the file hard, every dataset's bytes inside the file.

    Raises:
        GenreflowError: naming the file and the first link or dataset that reaches out.
    """

    # The visit stops at the first callback that returns something: the problem, raised
    # here (an exception raised inside h5py's visit comes out as a SystemError).
    def problem(name: str, link) -> str | None:
        where = shown(name)
        if isinstance(link, h5py.SoftLink):
            return f"{where} is a soft link"
        if isinstance(link, h5py.ExternalLink):
            return f"{where} is an external link to another file"
        if not isinstance(link, h5py.HardLink):  # a user-defined link class
            return f"{where} is a {type(link).__name__}"
        item = hf.get(name)
        if not isinstance(item, h5py.Dataset):
            return None
        if item.is_virtual:
            return f"dataset {where} is virtual (its data is in other files)"
        if item.id.get_create_plist().get_external_count():
            return f"dataset {where} uses external storage"
        return None

    found = hf.visititems_links(problem)
    if found:
        raise GenreflowError(f"{path}: {found}; refused")


def shown(value: object, limit: int = 40) -> str:
    """What a file holds, as a message may show it: escaped (no newline or control
    character reaches a log) and at most `limit` characters of it."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    escaped = repr(text[:limit])
    return escaped + ("..." if len(text) > limit else "")


def is_printable_name(name: str) -> bool:
    """No control, format (bidi overrides) or line/paragraph separator character in it."""
    return all(unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp") for c in name)


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
