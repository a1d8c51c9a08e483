"""A fold's checkpoints, uploaded to its gs:// folder in the background while it trains.

A fully fine-tuned Cnn14's resume state is 1.3 GB: at ~100 MB/s, 13 s of a GPU's time per
checkpoint if the loop waited for it. `Publisher.submit` instead takes a snapshot of the
files (a hard link each: genreflow writes every file under a temporary name and renames it
into place, so a later checkpoint replaces the name and never the bytes the link holds)
and returns at once; one thread uploads, one file in flight at a time. A snapshot still
waiting when a newer one of the same file arrives is dropped: only the newest state is
worth sending. A transient failure (genreflow.retry.is_transient) is retried with
back-off; one that remains is logged when it happens and raised by `close()`, which the
fold's end calls and which waits for what is queued, unless a newer version of that file
was uploaded since. A file of a submit that fails for good takes the files submitted after
it in the same call with it: the last of them is the commit point (resume.pt), which must
never stand in the bucket beside an older file than the one it vouches for. After an error
the fold leaves through `abort()`: what is queued is
dropped and only the upload in flight is waited for, so that no upload outlives the try.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from genreflow.retry import is_transient
from genreflow.storage import OutputFolder, redacted_text

# Beside the fold's files, hidden (so never published itself): the snapshots being sent.
SNAPSHOTS = ".publishing"
TRIES = 4  # per snapshot of a file
FIRST_DELAY_SECONDS = 2.0  # before the second try, then doubling


@dataclass
class UploadStats:
    """What the background uploads did, for the fold's log line and the benchmarks."""

    files: int = 0  # uploads completed
    bytes: int = 0  # their size
    seconds: float = 0.0  # the upload thread's time sending them
    dropped: int = 0  # snapshots replaced by a newer one before they were sent
    failed: int = 0  # uploads that failed after their tries
    waited_seconds: float = 0.0  # how long close() waited for the queue to drain


class Publisher:
    """Uploads snapshots of an OutputFolder's files in the background, newest first in
    line; for a local folder (no gs:// prefix) it does nothing."""

    def __init__(
        self,
        folder: OutputFolder,
        *,
        tries: int = TRIES,
        first_delay: float = FIRST_DELAY_SECONDS,
    ):
        self.folder = folder
        self.stats = UploadStats()
        self._tries, self._first_delay = tries, first_delay
        self._snapshots = folder.path / SNAPSHOTS
        self._pending: dict[str, Path] = {}  # file name -> its newest snapshot, in upload order
        self._failed: dict[str, BaseException] = {}
        self._submitted_with: dict[Path, int] = {}  # snapshot -> the submit call it came in
        self._condition = threading.Condition()
        self._closing = self._aborted = False
        self._count = self._submits = 0
        self._thread: threading.Thread | None = None
        if folder.uri is not None:
            shutil.rmtree(self._snapshots, ignore_errors=True)  # a killed run's
            self._snapshots.mkdir(parents=True)
            self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
            self._thread.start()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    # --- the training thread's side ----------------------------------------------------
    def submit(self, *names: str) -> None:
        """Queue the folder's files `names` as they are now, in this order (the commit
        point last), in place of any older snapshot of them still waiting."""
        if self._thread is None:
            return
        snapshot = {name: self._snapshot(name) for name in names}
        with self._condition:
            self._submits += 1
            for name, path in snapshot.items():
                older = self._pending.pop(name, None)  # re-inserted: it goes after the rest
                if older is not None:
                    del self._submitted_with[older]
                    older.unlink(missing_ok=True)
                    self.stats.dropped += 1
                self._pending[name] = path
                self._submitted_with[path] = self._submits
            self._condition.notify_all()

    def close(self) -> None:
        """Wait until everything queued is uploaded, then stop. Raises the failure of a
        file whose newest snapshot could not be uploaded (as it was raised, so that the
        fold's retry tells a transient one from the rest)."""
        if self._thread is None:
            return
        started = time.monotonic()
        self._stop()
        self.stats.waited_seconds = time.monotonic() - started
        if self._failed:
            raise next(iter(self._failed.values()))

    def abort(self) -> None:
        """Drop what is queued, wait for the upload in flight, stop; raises nothing (the
        error the fold is leaving by is the one to see)."""
        if self._thread is None:
            return
        with self._condition:
            self._aborted = True  # also cuts short a back-off before a retry
            for path in self._pending.values():
                path.unlink(missing_ok=True)
            self.stats.dropped += len(self._pending)
            self._pending.clear()
            self._submitted_with.clear()
        self._stop()

    def _snapshot(self, name: str) -> Path:
        """An immutable copy of the folder's file `name`: a hard link where the file system
        has them (no second write of 1.3 GB), else a real copy."""
        self._count += 1
        path = self._snapshots / f"{self._count:06d}-{Path(name).name}"
        try:
            path.hardlink_to(self.folder.path / name)
        except OSError:
            shutil.copyfile(self.folder.path / name, path)
        return path

    def _stop(self) -> None:
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        assert self._thread is not None
        self._thread.join()
        self._thread = None
        shutil.rmtree(self._snapshots, ignore_errors=True)

    # --- the upload thread -------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                name = next(iter(self._pending))
                path = self._pending.pop(name)
                submit = self._submitted_with.pop(path)
            try:
                sent = self._upload(name, path)
            finally:
                path.unlink(missing_ok=True)
            if not sent:
                self._drop_submit(submit)

    def _drop_submit(self, submit: int) -> None:
        """Drop what waits of the submit call `submit` (after its failed file)."""
        with self._condition:
            for name, path in list(self._pending.items()):
                if self._submitted_with.get(path) == submit:
                    del self._pending[name], self._submitted_with[path]
                    path.unlink(missing_ok=True)
                    self.stats.dropped += 1
                    self._log(f"{name} not uploaded: a file submitted before it failed")

    def _upload(self, name: str, path: Path) -> bool:
        """Upload one snapshot, retrying what is transient; a newer snapshot of the same
        file arriving during the back-off takes its place. False if it failed for good."""
        delay = self._first_delay
        for attempt in range(1, self._tries + 1):
            started = time.monotonic()
            try:
                sent = self.folder.publish_file(name, path)
            except Exception as exc:  # noqa: BLE001 - every failure is reported and kept
                said = f"{type(exc).__name__}: {redacted_text(str(exc))}"
                if not is_transient(exc) or attempt == self._tries:
                    self._log(f"upload of {name} failed ({said}); the fold's end raises it")
                    with self._condition:
                        self._failed[name] = exc
                        self.stats.failed += 1
                    return False
                self._log(f"upload of {name}: {said} (transient); try {attempt + 1} in {delay:g} s")
                with self._condition:
                    newer = lambda: name in self._pending or self._aborted  # noqa: E731
                    if self._condition.wait_for(newer, timeout=delay):
                        return True  # a newer snapshot of it is queued (that one goes), or abort
                delay *= 2
                continue
            with self._condition:
                self._failed.pop(name, None)  # the newest version is up: an older failure is moot
                self.stats.files += 1
                self.stats.bytes += sent
                self.stats.seconds += time.monotonic() - started
            return True

    def _log(self, message: str) -> None:
        print(f"{redacted_text(str(self.folder.uri))}: {message}", file=sys.stderr, flush=True)
