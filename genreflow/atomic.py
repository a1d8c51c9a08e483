"""Outputs that appear whole or not at all: written beside their path, then renamed.

An interrupted step must never leave a file that looks finished; `os.replace` within one
folder is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file's path beside `path`; renamed into place when the block ends, removed
    if it raises."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private (0600); outputs are shared like any other file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Call write(binary file) on a temporary file beside path, then rename it into place."""
    with _temporary_beside(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_path_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(temporary path) beside path, then rename it into place: for writers that
    open files by name (h5py)."""
    with _temporary_beside(path) as tmp:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


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
    os.replace(tmp, target)
