"""Pack a GTZAN tree into one HDF5 file of fixed-length 32 kHz clips, as waveforms or as
the log-mel Cnn14's frozen front end makes of them (the file's contract:
genreflow.features). The clips are decoded by genreflow.features.workers; this module
plans the pack and writes the file.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from genreflow import __version__, storage
from genreflow.atomic import move_into_place
from genreflow.audio import SAMPLE_RATE, clip_samples
from genreflow.data.download import recorded_sha256
from genreflow.data.genres import GENRE_INDEX, GENRES, assign_folds
from genreflow.data.layout import Clip, list_clips
from genreflow.errors import GenreflowError
from genreflow.features.reader import REPRESENTATIONS, UNRECORDED_REPRESENTATION, RowLayout
from genreflow.features.workers import (
    CLIPS_PER_TASK,
    SHM_FOLDER,
    Decoding,
    free_shared_memory,
    plan_workers,
)
from genreflow.logmel import FRONT_END, WINDOW_SIZE
from genreflow.runtime import libc_function

ON_ERROR_CHOICES = ("skip", "fail")
# Bytes of output between two steps of writing it out and dropping it (see _Writeback).
WRITEBACK_BYTES = 64 << 20
# sync_file_range's flags (fcntl.h): start writing; wait for what is being written, write,
# and wait for that.
_SYNC_WRITE = 2
_SYNC_WAIT_WRITE_WAIT = 1 | 2 | 4
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class PackSummary:
    """What a pack did; `str()` gives the one-line throughput report."""

    path: Path | str
    clips: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    per_genre: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 1
    representation: str = UNRECORDED_REPRESENTATION

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"packed {self.clips} clips ({len(self.skipped)} skipped) as {self.representation} "
            f"into {self.path} in "
            f"{self.seconds:.1f} s: {self.clips_per_second:.1f} clips/s with "
            f"{self.workers} worker{'s' if self.workers != 1 else ''}"
        )


def default_workers() -> int:
    """The cores this process may use (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def pack(
    dataset: str | Path,
    out: str | Path,
    *,
    clip_seconds: float = 30.0,
    representation: str = UNRECORDED_REPRESENTATION,
    workers: int | None = None,
    on_error: str = "skip",
    source_sha256: str | None = None,
    progress: bool = True,
) -> PackSummary:
    """Decode, resample, pad/trim and store every clip of a GTZAN tree in one HDF5 file.

    Args:
        dataset: an extracted GTZAN tree in any layout genreflow.data.layout knows.
        out: the HDF5 file to write; replaced only once the new one is complete. A
            gs://BUCKET/OBJECT is packed locally and uploaded when complete.
        clip_seconds: clip length; longer files are trimmed, shorter ones zero-padded.
        representation: "waveform" stores the int16 clips (the seed's form); "logmel"
            stores Cnn14's front-end output for each (float16, a fifth of the bytes).
        workers: decoding processes (default: the usable cores; 1 decodes in-process;
            fewer where shared memory, /dev/shm, cannot hold their clips in flight).
        on_error: "skip" leaves an unreadable clip out and records why; "fail" stops.
        source_sha256: the archive's checksum, recorded so a file says what it came from;
            by default the one `genreflow download` recorded in `dataset`, if any.
        progress: show a progress bar on stderr.

    Raises:
        GenreflowError: bad arguments, a missing or empty genre (also one whose clips are
            all unreadable), or with on_error="fail" the first unreadable clip.
    """
    if storage.local_path(out) is None:
        with storage.output_file(out) as staging:
            summary = pack(
                dataset,
                staging,
                clip_seconds=clip_seconds,
                representation=representation,
                workers=workers,
                on_error=on_error,
                source_sha256=source_sha256,
                progress=progress,
            )
        summary.path = str(out)
        return summary
    if on_error not in ON_ERROR_CHOICES:
        raise GenreflowError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}: {on_error!r}")
    if representation not in REPRESENTATIONS:
        raise GenreflowError(
            f"representation must be one of {', '.join(REPRESENTATIONS)}: {representation!r}"
        )
    if source_sha256 is None:
        source_sha256 = recorded_sha256(dataset)
    sha = (source_sha256 or "").strip().lower()
    if sha and not _SHA256.match(sha):
        raise GenreflowError(f"source sha256 must be 64 hex digits, got {source_sha256!r}")
    n_samples = clip_samples(clip_seconds)
    layout = RowLayout.of(representation, n_samples)
    if representation == "logmel" and n_samples <= WINDOW_SIZE // 2:
        raise GenreflowError(
            f"clips of {clip_seconds:g} s are too short for the log-mel front end "
            f"(more than {WINDOW_SIZE // 2} samples needed)"
        )
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise GenreflowError(f"workers must be at least 1, got {workers}")
    out = storage.local_path(out)
    if out.is_dir():
        raise GenreflowError(f"{out}: is a folder; --out names the HDF5 file to write")

    clips = list_clips(dataset)
    duplicates = sorted(n for n, count in Counter(c.name for c in clips).items() if count > 1)
    if duplicates:
        raise GenreflowError(
            f"{dataset}: the same file name in more than one genre folder: "
            + ", ".join(duplicates[:5])
        )
    folds = assign_folds(c.name for c in clips)
    workers = min(workers, max(1, -(-len(clips) // CLIPS_PER_TASK)))
    wanted = workers
    workers, tasks_in_flight = plan_workers(workers, layout.nbytes, free_shared_memory())
    if workers < wanted:
        print(
            f"pack: {wanted} workers' clips do not fit in half the free shared memory "
            f"({SHM_FOLDER}); using {workers}",
            file=sys.stderr,
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    # A name that cannot be mistaken for a finished file, in the same folder so that the
    # final rename is atomic.
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    print(
        f"pack: {len(clips)} clips in {len(GENRES)} genres from {dataset}, "
        f"{clip_seconds:g} s at {SAMPLE_RATE} Hz as {representation}, "
        f"{workers} worker{'s' if workers > 1 else ''}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    try:
        decoding = Decoding(clips, layout, workers, tasks_in_flight)
        summary = _write(
            clips, folds, partial, layout, clip_seconds, decoding, on_error, sha, progress
        )
        move_into_place(partial, out)  # flushed before it gets the finished name
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary.path = out
    summary.seconds = time.perf_counter() - started
    summary.workers = workers
    summary.representation = representation
    return summary


def _write(
    clips: list[Clip],
    folds: dict[str, int],
    path: Path,
    layout: RowLayout,
    clip_seconds: float,
    decoding: Decoding,
    on_error: str,
    source_sha256: str,
    progress: bool,
) -> PackSummary:
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    per_genre: Counter[str] = Counter()
    with h5py.File(path, "w") as hf:
        rows = hf.create_dataset(
            layout.representation,
            shape=(len(clips), *layout.shape),
            maxshape=(None, *layout.shape),
            dtype=layout.dtype,
            chunks=(1, *layout.shape),
        )
        from genreflow.progress import progress_bar

        bar = progress_bar(len(clips), desc="pack", unit="clip", enabled=progress)
        # On an error, the with statement stops the workers now rather than when the
        # traceback holding this frame is collected.
        with bar, decoding, _Writeback(path) as writeback:
            for clip, decoded in zip(clips, decoding, strict=True):
                bar.update()
                if isinstance(decoded, str):
                    if on_error == "fail":
                        raise GenreflowError(f"{clip.path}: {decoded} (--on-error fail)")
                    skipped.append((clip.name, decoded))
                    tqdm.write(f"pack: skipped {clip.path}: {decoded}", file=sys.stderr)
                    continue
                decoding.store(rows, len(names), decoded)
                writeback.wrote(layout.nbytes)
                names.append(clip.name)
                per_genre[clip.genre] += 1

        empty = [g for g in GENRES if per_genre[g] == 0]
        if empty:
            folders = sorted({str(c.path.parent) for c in clips if c.genre in empty})
            raise GenreflowError(
                f"no readable clip in genre folder{'s' if len(folders) > 1 else ''} "
                + ", ".join(folders)
                + " (every file in it was skipped)"
            )
        n = len(names)
        rows.resize(n, axis=0)
        # Fixed-length bytes as in the seed's file (its readers .decode() each name),
        # declared UTF-8 so that .asstr() works, sized to the longest name: never cut.
        encoded = [name.encode("utf-8") for name in names]
        name_dtype = h5py.string_dtype("utf-8", max(map(len, encoded)))
        hf.create_dataset("audio_name", data=np.array(encoded, dtype=name_dtype))
        target = np.zeros((n, len(GENRES)), dtype=np.float32)
        genre_of_name = {c.name: c.genre for c in clips}
        target[np.arange(n), [GENRE_INDEX[genre_of_name[name]] for name in names]] = 1.0
        hf.create_dataset("target", data=target)
        hf.create_dataset("fold", data=np.array([folds[name] for name in names], np.int32))
        hf.create_dataset(
            "skipped",
            data=np.array([list(row) for row in skipped], dtype=object).reshape(-1, 2),
            dtype=h5py.string_dtype("utf-8"),
        )
        if layout.representation == "logmel":
            hf.attrs["front_end"] = json.dumps(FRONT_END, sort_keys=True)
        hf.attrs.update(
            {
                "representation": layout.representation,
                "sample_rate": SAMPLE_RATE,
                "clip_samples": layout.n_samples,
                "clip_seconds": float(clip_seconds),
                "genres": list(GENRES),
                "source_sha256": source_sha256,
                "clips_found": len(clips),
                "genreflow_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
    return PackSummary(path=path, clips=n, skipped=skipped, per_genre=dict(per_genre))


class _Writeback:
    """Writes a growing file to disk as it goes, and lets go of the pages written (Linux).

    Two reasons. pack fsyncs the file before publishing it: without this, the kernel would
    write the whole file during that fsync, with the cores idle (0.7 s per GB here). And
    a pack writes what the dataset decodes to (1.9 GB for GTZAN), which the next step
    reads once, often on another machine: dropping each stretch once it is on disk lets
    the next rows reuse its pages, where fresh ones cost up to 2.5 ms per MB to fill on a
    VM that hands free memory back to its host (the writer's largest cost here), and
    leaves the rest of the page cache alone. Elsewhere it does nothing, and the final
    fsync writes everything.
    """

    def __init__(self, path: Path):
        self._path = path
        self._unsynced = 0
        self._started = 0  # the file up to here is being written out or already is
        self._dropped = 0  # the file up to here has been dropped from the page cache
        self._fd = -1
        self._sync_file_range = libc_function("sync_file_range")
        if not hasattr(os, "posix_fadvise"):
            self._sync_file_range = None

    def __enter__(self) -> _Writeback:
        if self._sync_file_range is not None:
            self._sync_file_range.argtypes = [
                ctypes.c_int,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_uint,
            ]
            self._fd = os.open(self._path, os.O_RDONLY)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def wrote(self, nbytes: int) -> None:
        """Count `nbytes` more written; every WRITEBACK_BYTES, start writing what is new
        and drop the stretch before it, which is on disk by then."""
        self._unsynced += nbytes
        if self._fd < 0 or self._unsynced < WRITEBACK_BYTES:
            return
        self._unsynced = 0
        size = os.fstat(self._fd).st_size
        # An I/O error is reported here, to this descriptor, and perhaps never again (the
        # final fsync opens another one): it must stop the pack before pages are dropped.
        self._sync(self._started, size - self._started, _SYNC_WRITE)
        if self._started > self._dropped:
            length = self._started - self._dropped
            self._sync(self._dropped, length, _SYNC_WAIT_WRITE_WAIT)
            os.posix_fadvise(self._fd, self._dropped, length, os.POSIX_FADV_DONTNEED)
            self._dropped = self._started
        self._started = size

    def _sync(self, offset: int, length: int, flags: int) -> None:
        if self._sync_file_range(self._fd, offset, length, flags) != 0:
            errno = ctypes.get_errno()
            raise GenreflowError(f"{self._path}: writing to disk failed: {os.strerror(errno)}")
