"""Outputs that appear whole or not at all: written beside their path, then renamed.

An interrupted step must never leave a file that looks finished. `os.replace` within one
folder is atomic on POSIX file systems, but only durable with two flushes: of the file
before it gets its final name (else a crash can leave the name pointing at a file whose
bytes never reached the disk) and of the folder after (else the rename itself can be
lost). `move_into_place` does both; every rename of genreflow's goes through it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems (FUSE mounts among them) cannot flush a folder; its entries are
        # then as durable as that file system makes them.
        if not (exc.errno in (errno.EINVAL, errno.ENOTSUP) and os.path.isdir(path)):
            raise
    finally:
        os.close(fd)


def move_into_place(source: str | Path, target: str | Path) -> None:
    """Rename `source` (a file or a folder) to `target`, durably: `source` flushed first,
    then the folder that holds the new name (and the one that held the old one)."""
    source, target = Path(source), Path(target)
    fsync_path(source)
    os.replace(source, target)
    fsync_path(target.parent)
    if os.path.abspath(source.parent) != os.path.abspath(target.parent):
        fsync_path(source.parent)


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file's path beside `path`; moved into place when the block ends, removed
    if it raises."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); outputs are shared like any other file.
        os.chmod(tmp, 0o644)
        move_into_place(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Call write(binary file) on a temporary file beside path, then rename it into place."""
    with _temporary_beside(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_path_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(temporary path) beside path, then rename it into place: for writers that
    open files by name (h5py)."""
    with _temporary_beside(path) as tmp:
        write(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def publish_copy(source: Path, target: Path) -> None:
    """Atomically make `target` a copy of `source`: a hard link where the file system
    has them (no second 330 MB write), else a real copy."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    move_into_place(tmp, target)
