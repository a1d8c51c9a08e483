"""What every transfer shares: a progress bar, a chunked copy, the download cap and a
full disk said as one."""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from genreflow.errors import GenreflowError
from genreflow.limits import exceeded, limit
from genreflow.storage.uris import redacted

CHUNK_BYTES = 1 << 20


@contextmanager
def progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Iterator:
    from genreflow.progress import progress_bar

    bar = progress_bar(
        total, desc=desc, unit="B", unit_scale=True, initial=initial, enabled=enabled, leave=False
    )
    try:
        yield bar
    finally:
        bar.close()


def copy_stream(src: IO[bytes], dst: IO[bytes], on_chunk: Callable[[int], object]) -> int:
    copied = 0
    while chunk := src.read(CHUNK_BYTES):
        dst.write(chunk)
        copied += len(chunk)
        on_chunk(len(chunk))
    return copied


def check_download_size(uri: str | Path, size: int | None) -> None:
    """Refuse a download that would write more than GENREFLOW_MAX_DOWNLOAD_BYTES."""
    cap = limit("GENREFLOW_MAX_DOWNLOAD_BYTES")
    if size is not None and size > cap:
        raise exceeded(redacted(uri), "GENREFLOW_MAX_DOWNLOAD_BYTES", f"{size} bytes")


@contextmanager
def full_disk_said(dest: Path, uri: str | Path) -> Iterator[None]:
    """A full disk or quota while writing `dest` becomes one error that says so: no retry
    can get past it, and it must not read as a network failure."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise GenreflowError(
            f"{dest.parent}: no space left on the disk ({exc.strerror}) while writing "
            f"{dest.name} from {redacted(uri)}; free some space or write elsewhere"
        ) from exc
