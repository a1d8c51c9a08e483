"""Locks that keep two genreflow processes on one machine out of each other's way.

Two runs sharing a cache or a workspace take turns at a cache slot (the second waits, then
finds the file there) and never write into the same output folder at once (the second
refuses, naming the first). A lock is an flock on a hidden file beside what it guards: the
kernel drops it when its process ends, however it ends, so a killed run leaves no stale
lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from genreflow.errors import GenreflowError

# Locks this thread holds, with how many times: a lock taken again inside itself (fetch
# inside cached) passes, where a second flock on a new descriptor would wait forever.
# Per thread, so that two threads exclude each other as two processes do.
_local = threading.local()


def lock_file_for(path: Path) -> Path:
    """The lock file that guards `path`: hidden, beside it."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def locked(path: str | Path, *, what: str, wait: bool) -> Iterator[None]:
    """Hold the lock on `path` for the block.

    wait=True waits for another process's hold to end, saying so on stderr; wait=False
    raises GenreflowError at once, naming `what` and the holder's pid.
    """
    lock = lock_file_for(Path(os.path.abspath(path)))
    key = str(lock)
    _held = _local.__dict__.setdefault("held", {})
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, what, wait)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        # Removed while still held: a waiter that then gets the old file sees it is gone
        # and locks a new one (_acquire), so no two processes ever hold "the" lock.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, what: str, wait: bool) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise GenreflowError(
                        f"{what}: in use by another genreflow process ({holder}); wait for it "
                        "to end, or give this run its own output"
                    ) from None
                print(f"{what}: waiting for another genreflow process ({holder})", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}\n".encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed this file as it let go: lock the new one


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "pid unknown"
    except OSError:
        return "pid unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
