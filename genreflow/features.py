"""Pack a GTZAN tree into one HDF5 file of fixed-length 32 kHz clips, as waveforms or as
the log-mel Cnn14's frozen front end makes of them.

The file is a contract the training and embedding steps read (see read_index):

- datasets: `audio_name` (N,) UTF-8 bytes, the clip's file name (b"blues.00000.au");
  the clips, one row per HDF5 chunk, as the `representation` attribute says: `waveform`
  (N, clip_samples) int16 (the seed's form), or `logmel` (N, frames, 64) float16, the
  front end's output (genreflow.models.cnn14.LogmelFrontEnd) for that very int16 waveform;
  `target` (N, 10) float32 one-hot in GENRES order; `fold` (N,) int32, the seed's rule
  over every clip found; `skipped` (M, 2) UTF-8 strings, [file name, reason] of each clip
  left out (M may be 0).
- attributes: representation ("waveform" or "logmel"; a file without it holds
  waveforms), sample_rate, clip_samples, clip_seconds, genres, source_sha256 ("" when
  unknown), clips_found, genreflow_version, created (ISO 8601, UTC); with log-mel also
  `front_end`, the front end's parameters as JSON (sample_rate, window_size, hop_size,
  mel_bins, fmin, fmax).

The front end is frozen and SpecAugment and mixup act after it (PannsCnn.forward), so
training and embedding on the log-mel compute what they would from the waveform, up to
float16 rounding, with a fifth of the bytes (0.38 MB per 30 s clip instead of 1.9 MB).

Rows are in sorted name order. Folds are assigned before anything is decoded, so a clip
that turns out unreadable leaves a hole in its fold instead of shifting its neighbours'.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing
import os
import re
import secrets
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import connection, shared_memory
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from genreflow import __version__, storage
from genreflow.atomic import move_into_place
from genreflow.audio import (
    FMAX,
    FMIN,
    HOP_SIZE,
    MEL_BINS,
    SAMPLE_RATE,
    WINDOW_SIZE,
    AudioDecodeError,
    clip_samples,
    float32_to_int16,
    load_audio,
    logmel_frames,
)
from genreflow.data.download import recorded_sha256
from genreflow.data.genres import FOLDS, GENRE_INDEX, GENRES, assign_folds
from genreflow.data.layout import AUDIO_SUFFIXES, Clip, list_clips
from genreflow.errors import GenreflowError
from genreflow.runtime import keep_freed_memory, libc_function

ON_ERROR_CHOICES = ("skip", "fail")
# What a packed file holds its clips as; each is also the name of the dataset holding them.
REPRESENTATIONS = ("waveform", "logmel")
# Files packed before log-mel packing existed record nothing, and hold waveforms.
UNRECORDED_REPRESENTATION = "waveform"
# The front end a log-mel file is made with: Cnn14's, as the published checkpoints have it.
FRONT_END = {
    "sample_rate": SAMPLE_RATE,
    "window_size": WINDOW_SIZE,
    "hop_size": HOP_SIZE,
    "mel_bins": MEL_BINS,
    "fmin": FMIN,
    "fmax": FMAX,
}
# A model's frozen front end (from its checkpoint) may differ from the one that packed a
# log-mel by this much, relative to the largest weight: 1e-5 moves a log-mel by about
# 4e-5 dB, far below float16's rounding of it (0.008 to 0.03 dB at 10 to 60 dB).
FRONT_END_TOLERANCE = 1e-5
REQUIRED_DATASETS = ("audio_name", "target", "fold")  # and the representation's own
REQUIRED_ATTRS = ("sample_rate", "clip_samples", "clip_seconds", "genres")
# Clips per task sent to a worker, and tasks in flight per worker: every clip in flight
# holds a row of the shared ring (1.9 MB at 30 s), and a worker always has a task queued
# while the writer stores the rows of the one before.
CLIPS_PER_TASK = 2
TASKS_IN_FLIGHT_PER_WORKER = 2
# Where POSIX shared memory lives on Linux, and the share of its free space the ring may take.
SHM_FOLDER = "/dev/shm"
SHM_SHARE = 0.5
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
    workers, tasks_in_flight = _plan_workers(workers, layout.nbytes, _shm_free_bytes())
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
        decoding = _Decoding(clips, layout, workers, tasks_in_flight)
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


@dataclass(frozen=True)
class RowLayout:
    """One packed clip as stored: its representation, row shape and dtype."""

    representation: str
    n_samples: int  # the clip's length as a waveform, whatever it is stored as
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, representation: str, n_samples: int) -> RowLayout:
        if representation == "waveform":
            return cls(representation, n_samples, (n_samples,), np.dtype(np.int16))
        frames = logmel_frames(n_samples, FRONT_END["hop_size"])
        return cls(representation, n_samples, (frames, FRONT_END["mel_bins"]), np.dtype(np.float16))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def _write(
    clips: list[Clip],
    folds: dict[str, int],
    path: Path,
    layout: RowLayout,
    clip_seconds: float,
    decoding: _Decoding,
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


class _Decoding:
    """Decodes clips in their order into the rows of a ring buffer that the writer stores.

    With more than one worker, worker processes decode into a ring in shared memory and
    only row numbers and reasons cross the pipe: pickling every 1.9 MB clip through a pipe,
    then unpickling and copying it in the writer, cost CPU on both ends that the decoding
    needs. With one worker, this process decodes into a row of its own.

    Iterating gives, for each clip, its row of the ring or the reason it is unreadable; the
    row holds the clip until the next item is asked for. `store` writes a row to HDF5.
    """

    def __init__(
        self, clips: Sequence[Clip], layout: RowLayout, workers: int, tasks_in_flight: int
    ):
        self._paths = [str(c.path) for c in clips]
        self._layout = layout
        self._encode: _Encoder | None = None
        self._workers = workers
        self._tasks_in_flight = tasks_in_flight
        self._rows: np.ndarray | None = None
        self._shm: shared_memory.SharedMemory | None = None
        self._pool: _Workers | None = None
        self._finished = False

    def __enter__(self) -> _Decoding:
        if self._workers == 1:
            self._rows = np.empty((1, *self._layout.shape), dtype=self._layout.dtype)
            self._encode = _Encoder(self._layout)
            return self
        slots = self._tasks_in_flight * CLIPS_PER_TASK
        try:
            self._shm = shared_memory.SharedMemory(
                name=shm_name(), create=True, size=slots * self._layout.nbytes
            )
        except OSError as exc:
            raise GenreflowError(
                f"cannot create the decoding workers' shared memory ({SHM_FOLDER}): {exc}; "
                "workers=1 decodes in this process without it"
            ) from None
        try:
            self._rows = _ring_rows(self._shm, slots, self._layout)
            self._pool = _Workers(self._workers, (self._shm.name, slots, self._layout))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Workers write to the ring: they are gone before it is. After an error or an
        # abandoned iteration they are killed, not asked, and queued work is dropped.
        if self._pool is not None:
            self._pool.close(kill=not self._finished)
            self._pool = None
        self._rows = None
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None

    def store(self, dataset: h5py.Dataset, index: int, row: int) -> None:
        """Write ring row `row` as row `index` of `dataset` (one row per chunk)."""
        # Handing HDF5 the chunk's bytes skips its selection and conversion machinery,
        # which costs more than the copy itself.
        dataset.id.write_direct_chunk((index,) + (0,) * len(self._layout.shape), self._rows[row])

    def __iter__(self) -> Iterator[int | str]:
        if self._pool is None:
            for path in self._paths:
                reason = self._encode(path, self._rows[0])
                yield 0 if reason is None else reason
            return
        tasks = (
            self._paths[i : i + CLIPS_PER_TASK] for i in range(0, len(self._paths), CLIPS_PER_TASK)
        )
        free = deque(range(self._tasks_in_flight))
        pending: deque[tuple[int, int]] = deque()  # (worker, group of rows), oldest first
        while True:
            # A group of rows is free again once the writer has stored all its clips.
            while free:
                task = next(tasks, None)
                if task is None:
                    break
                group = free.popleft()
                rows = range(group * CLIPS_PER_TASK, group * CLIPS_PER_TASK + len(task))
                pending.append((self._pool.submit(list(zip(task, rows, strict=True))), group))
            if not pending:
                self._finished = True
                return
            worker, group = pending.popleft()
            for offset, reason in enumerate(self._pool.result(worker)):
                yield group * CLIPS_PER_TASK + offset if reason is None else reason
            free.append(group)


class _Workers:
    """The decoding processes of one pack, owned by it: each takes tasks over a pipe of
    its own and answers them in order; when any dies, every one is killed at once.

    Python 3.11's ProcessPoolExecutor, when a worker was killed, could miss another and
    wait for it forever (it starts workers on demand while tasks are submitted): a pack,
    and the pod running it, that never ended. Here nothing waits on a worker without also
    watching every worker's exit.
    """

    def __init__(self, count: int, initargs: tuple):
        context = _worker_context()
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._pipes: list[connection.Connection] = []
        self._queued = [0] * count
        try:
            for _ in range(count):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=_serve, args=(theirs, *initargs), name="genreflow-pack", daemon=True
                )
                process.start()
                theirs.close()
                self._processes.append(process)
                self._pipes.append(ours)
        except BaseException:
            self.close(kill=True)
            raise

    def submit(self, task: list[tuple[str, int]]) -> int:
        """Queue `task` on the least busy worker; its number, for `result`."""
        worker = min(range(len(self._pipes)), key=self._queued.__getitem__)
        try:
            self._pipes[worker].send(task)
        except OSError:  # its end of the pipe is closed: it died
            self._stop_on_death()
        self._queued[worker] += 1
        return worker

    def result(self, worker: int) -> list[str | None]:
        """The answer to the oldest task queued on `worker`."""
        pipe = self._pipes[worker]
        sentinels = [p.sentinel for p in self._processes]
        ready = connection.wait([pipe, *sentinels])
        if pipe not in ready or any(s in ready for s in sentinels):
            self._stop_on_death()
        try:
            status, value = pipe.recv()
        except (EOFError, OSError):
            self._stop_on_death()
        self._queued[worker] -= 1
        if status == "error":
            self.close(kill=True)
            raise GenreflowError(value)
        return value

    def _stop_on_death(self) -> None:
        dead = [p for p in self._processes if p.exitcode is not None]
        self.close(kill=True)
        how = ", ".join(_exit_description(p.exitcode) for p in dead) or "its pipe closed"
        raise GenreflowError(
            f"a decoding worker process died ({how}): out of memory, shared memory "
            f"({SHM_FOLDER}) full, or a __main__ that worker processes cannot re-import (such "
            "as code piped into python's stdin); workers=1 decodes in this process"
        )

    def close(self, *, kill: bool) -> None:
        """End every worker: asked to (their work done), or killed; reaped either way."""
        for pipe in self._pipes:
            if not kill:
                try:
                    pipe.send(None)
                except OSError:
                    pass
        for process in self._processes:
            if kill:
                process.kill()
            process.join(timeout=None if kill else 10)
            if process.exitcode is None:  # did not stop when asked
                process.kill()
                process.join()
        for pipe in self._pipes:
            pipe.close()
        self._processes, self._pipes = [], []


def _exit_description(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def shm_name(pid: int | None = None) -> str:
    """A new name for a pack's ring in /dev/shm, that says whose it is: an operator (or a
    test) can tell a pack's segment, and the process it belongs to, from any other."""
    return f"genreflow-pack-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"


def _worker_context() -> multiprocessing.context.BaseContext:
    # Forking a process that already runs threads (tqdm's monitor, BLAS, torch) can
    # deadlock; a fork server preloaded with this module starts workers in milliseconds
    # after its own start (about half a second, once per process).
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _plan_workers(workers: int, row_bytes: int, shm_free_bytes: int | None) -> tuple[int, int]:
    """(worker processes, tasks in flight) for up to `workers`, as shared memory allows.

    Every task in flight holds CLIPS_PER_TASK rows of the ring, and a worker that touches
    a page of a full tmpfs dies of SIGBUS, so the ring takes at most SHM_SHARE of the free
    space (a default Docker container has 64 MB in all). (1, 0): decode in this process.
    """
    if workers < 2:
        return 1, 0
    tasks = workers * TASKS_IN_FLIGHT_PER_WORKER
    if shm_free_bytes is not None:
        tasks = min(tasks, int(shm_free_bytes * SHM_SHARE) // (CLIPS_PER_TASK * row_bytes))
    if tasks < 2:  # one worker process would decode no faster than this one
        return 1, 0
    return min(workers, tasks), tasks


def _shm_free_bytes() -> int | None:
    """Free bytes where shared memory lives, or None where that cannot be measured."""
    try:
        stat = os.statvfs(SHM_FOLDER)
    except (OSError, AttributeError):  # no /dev/shm (macOS), no statvfs (Windows)
        return None
    return stat.f_bavail * stat.f_frsize


def _ring_rows(shm: shared_memory.SharedMemory, slots: int, layout: RowLayout) -> np.ndarray:
    return np.ndarray((slots, *layout.shape), layout.dtype, buffer=shm.buf)


class _Encoder:
    """Decodes a clip into a row of the file's representation: the int16 waveform, or the
    front end's log-mel of that very int16 waveform, read as training reads it."""

    def __init__(self, layout: RowLayout, *, torch_threads: int | None = None):
        self._torch_threads = torch_threads
        self._waveform = None
        self._front_end = None
        if layout.representation == "logmel":
            self._waveform = np.empty(layout.n_samples, dtype=np.int16)

    def __call__(self, path: str, row: np.ndarray) -> str | None:
        """Fill `row` from the file at `path`; None, or the reason it is unreadable."""
        if self._waveform is None:
            return _decode_into(path, row)
        reason = _decode_into(path, self._waveform)
        if reason is None:
            row[...] = self._logmel(self._waveform)
        return reason

    def _logmel(self, waveform: np.ndarray) -> np.ndarray:
        import torch

        if self._front_end is None:
            from genreflow.models.cnn14 import LogmelFrontEnd

            if self._torch_threads is not None:
                torch.set_num_threads(self._torch_threads)
            self._front_end = LogmelFrontEnd(**FRONT_END).eval()
        with torch.inference_mode():
            clips = model_input("waveform", waveform[None], torch.device("cpu"))
            return self._front_end(clips)[0, 0].half().numpy()


# The state of a worker process: the ring it decodes into, and how it encodes a clip.
_worker: dict[str, object] = {}


def _start_worker(shm_name: str, slots: int, layout: RowLayout) -> None:
    """Worker initializer: map the writer's ring, and keep freed memory for the next clip
    (a clip's buffers would otherwise be mapped fresh and zeroed by the kernel for every
    clip; a decoding worker is short-lived, so holding its peak is harmless)."""
    keep_freed_memory()
    shm = shared_memory.SharedMemory(name=shm_name)
    _worker["shm"] = shm
    _worker["rows"] = _ring_rows(shm, slots, layout)
    # One torch thread per worker: the workers already fill the cores.
    _worker["encode"] = _Encoder(layout, torch_threads=1)


def _serve(pipe: connection.Connection, shm_name: str, slots: int, layout: RowLayout) -> None:
    """A worker process: answer tasks from the pipe in order until told to stop (None) or
    the pack is gone (the pipe closed)."""
    _start_worker(shm_name, slots, layout)
    while True:
        try:
            task = pipe.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            reply = ("ok", _decode_task(task))
        except Exception as exc:  # noqa: BLE001 (sent to the writer, which raises it)
            reply = ("error", str(exc) if isinstance(exc, GenreflowError) else repr(exc))
        pipe.send(reply)


def _decode_task(clips: list[tuple[str, int]]) -> list[str | None]:
    """Worker: decode (path, ring row) pairs; None, or the reason a clip is unreadable."""
    rows, encode = _worker["rows"], _worker["encode"]
    return [encode(path, rows[row]) for path, row in clips]


def _decode_into(path: str, row: np.ndarray) -> str | None:
    """Decode, pad or trim and store one clip into an int16 row; None, or why it is unreadable."""
    try:
        audio = load_audio(path, max_samples=len(row))  # only the frames the clip needs
    except AudioDecodeError as exc:
        return exc.reason
    except Exception as exc:  # not the file's fault (memory, a library bug): stop, naming it
        raise GenreflowError(f"{path}: decoding failed: {type(exc).__name__}: {exc}") from None
    used = min(len(audio), len(row))
    float32_to_int16(audio[:used], out=row[:used])
    row[used:] = 0
    return None


def read_index(features_path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Names, genre indices, folds and attributes of a packed file, after checking it.

    Args:
        features_path: a path, file://, http(s):// or gs:// URI (remote: downloaded once
            into the cache).

    Returns:
        (names, targets, folds, attrs): str names (N,), int64 genre indices (N,), int32
        folds (N,), and the attributes as plain Python values plus `skipped`, a list of
        (name, reason); `representation` is always there, and with log-mel `front_end`
        is a dict.

    Raises:
        GenreflowError: the file is missing, not HDF5, or not a complete genreflow file,
            or its clips are not what its `representation` attribute says.
    """
    path = storage.input_path(features_path)
    if not path.is_file():
        raise GenreflowError(f"{path}: features file not found")
    try:
        hf = h5py.File(path, "r")
    except OSError as exc:
        raise GenreflowError(f"{path}: not a readable HDF5 file ({exc})") from None
    with hf:
        representation = representation_of(hf, path)
        missing = [f"dataset '{d}'" for d in (*REQUIRED_DATASETS, representation) if d not in hf]
        missing += [f"attribute '{a}'" for a in REQUIRED_ATTRS if a not in hf.attrs]
        if missing:
            raise GenreflowError(
                f"{path}: not a genreflow features file of {representation} clips, missing "
                f"{', '.join(missing)}"
            )
        attrs = {key: _plain(value) for key, value in hf.attrs.items()}
        attrs["representation"] = representation
        if representation == "logmel":
            attrs["front_end"] = _front_end_of(attrs, path)
        names = _clip_names(path, hf["audio_name"])
        target = hf["target"][:]
        folds = hf["fold"][:].astype(np.int32)
        clips_shape, clips_dtype = hf[representation].shape, hf[representation].dtype
        if representation == "waveform" and clips_dtype != np.int16:
            # Every reader scales by 1/32767: float clips would arrive near silent.
            raise GenreflowError(
                f"{path}: waveform is {clips_dtype}, expected int16 (clips stored "
                "as the seed stores them; float data would be silently rescaled)"
            )
        skipped = [tuple(row) for row in hf["skipped"].asstr()[:]] if "skipped" in hf else []

    n = len(names)
    if attrs["genres"] != list(GENRES):
        raise GenreflowError(
            f"{path}: genre order {attrs['genres']} differs from genreflow's {list(GENRES)}"
        )
    problems = []
    if target.shape != (n, len(GENRES)):
        problems.append(f"target has shape {target.shape}, expected ({n}, {len(GENRES)})")
    if folds.shape != (n,):
        problems.append(f"fold has shape {folds.shape}, expected ({n},)")
    layout = RowLayout.of(representation, int(attrs["clip_samples"]))
    if representation == "logmel":
        frames = logmel_frames(layout.n_samples, attrs["front_end"]["hop_size"])
        layout = dataclasses.replace(layout, shape=(frames, attrs["front_end"]["mel_bins"]))
    if clips_shape != (n, *layout.shape) or clips_dtype != layout.dtype:
        problems.append(
            f"{representation} is {clips_dtype} of shape {clips_shape}, expected "
            f"{layout.dtype} of shape {(n, *layout.shape)}"
        )
    one_hot = np.all((target == 0) | (target == 1), axis=1) & (target.sum(axis=1) == 1)
    if not problems and not one_hot.all():
        problems.append("target rows are not one-hot")
    if not problems and not np.isin(folds, FOLDS).all():
        problems.append(f"folds outside {FOLDS[0]}..{FOLDS[-1]}")
    if problems:
        raise GenreflowError(f"{path}: inconsistent features file: {'; '.join(problems)}")
    attrs["skipped"] = skipped
    return names, target.argmax(axis=1), folds, attrs


def representation_of(hf: h5py.File, path: str | Path) -> str:
    """What an open packed file holds its clips as (its `representation` attribute)."""
    representation = _plain(hf.attrs.get("representation", UNRECORDED_REPRESENTATION))
    if representation not in REPRESENTATIONS:
        raise GenreflowError(
            f"{path}: holds clips as {representation!r}; genreflow reads "
            f"{' or '.join(REPRESENTATIONS)}"
        )
    return representation


def _front_end_of(attrs: dict, path: str | Path) -> dict:
    """The front-end parameters a log-mel file records, checked to be complete."""
    try:
        front_end = json.loads(attrs["front_end"])
    except (KeyError, TypeError, ValueError):
        raise GenreflowError(
            f"{path}: a log-mel file without a readable 'front_end' attribute (the "
            "parameters its log-mel was made with); pack it again"
        ) from None
    if not isinstance(front_end, dict) or set(front_end) != set(FRONT_END):
        raise GenreflowError(
            f"{path}: its 'front_end' attribute names {front_end!r}, expected the keys "
            f"{', '.join(FRONT_END)}"
        )
    return front_end


def model_input(representation: str, rows: np.ndarray, device):
    """Packed rows as the model takes them, on `device` (torch.device): int16 waveforms
    -> float32 in [-1, 1] (int16 / 32767, as packing stored them); float16 log-mel ->
    float32 (batch, 1, frames, mel).

    The stored dtype travels and the device converts: fewer bytes over PCIe, and no
    float copy of a batch of 30 s clips on the host.
    """
    import torch

    clips = torch.from_numpy(rows).to(device).float()
    if representation == "waveform":
        return clips.div_(32767.0)
    return clips.unsqueeze(1)


def check_fits_model(path: str | Path, attrs: dict, model) -> None:
    """A log-mel file must have been made by `model`'s own front end (a PannsCnn or a
    transfer model): the same parameters, and frozen weights equal within
    FRONT_END_TOLERANCE (a checkpoint brings its own). Waveform files fit any model.

    Args:
        path: the file, for the message.
        attrs: its attributes as read_index returns them.
        model: the model that will read it.
    """
    if attrs["representation"] != "logmel":
        return
    from genreflow.models.cnn14 import LogmelFrontEnd

    base = getattr(model, "base", model)
    packed = attrs["front_end"]
    if packed != base.front_end_config:
        differ = [k for k in FRONT_END if packed[k] != base.front_end_config[k]]
        raise GenreflowError(
            f"{path}: its log-mel was made with "
            + ", ".join(f"{k} {packed[k]}" for k in differ)
            + ", the model's front end has "
            + ", ".join(f"{k} {base.front_end_config[k]}" for k in differ)
            + "; pack the features again"
        )
    import torch

    # Building one draws the STFT's initial weights (overwritten) from torch's generator:
    # the caller's random state (SpecAugment and dropout in training) must not move.
    with torch.random.fork_rng(devices=[]):
        reference = LogmelFrontEnd(**packed).state_dict()
    ours = base.state_dict()
    for key, weight in reference.items():
        difference = float((ours[key].detach().cpu() - weight).abs().max() / weight.abs().max())
        if difference > FRONT_END_TOLERANCE:
            raise GenreflowError(
                f"{path}: its log-mel was made by genreflow's front end, but the model's "
                f"(from its checkpoint) differs in {key} (relative difference "
                f"{difference:.1e}); pack waveforms (--representation waveform) for this model"
            )


def _clip_names(path: Path, dataset: h5py.Dataset) -> np.ndarray:
    """audio_name as str, each row checked: UTF-8 text, a clip's file name, unique."""
    if h5py.check_string_dtype(dataset.dtype) is None or dataset.ndim != 1:
        raise GenreflowError(
            f"{path}: audio_name is {dataset.dtype} of shape {dataset.shape}, expected one "
            "UTF-8 string per clip"
        )
    names, rows = [], {}
    for row, raw in enumerate(dataset[:]):
        try:
            name = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise GenreflowError(
                f"{path}: audio_name row {row}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        if (
            not name
            or "/" in name
            or "\\" in name
            or "\x00" in name
            or Path(name).suffix.lower() not in AUDIO_SUFFIXES
        ):
            raise GenreflowError(
                f"{path}: audio_name row {row}: {name!r} is not a clip's file name "
                "(expected e.g. blues.00000.au)"
            )
        if name in rows:
            raise GenreflowError(
                f"{path}: audio_name row {row}: {name!r} already names row {rows[name]}"
            )
        rows[name] = row
        names.append(name)
    return np.array(names, dtype=str)


def _plain(value: object) -> object:
    """An HDF5 attribute as a plain Python value (lists of str, ints, floats, str)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _stored_as(attrs: dict) -> str:
    if attrs["representation"] == "waveform":
        return "int16 waveforms"
    front_end = attrs["front_end"]
    return (
        f"float16 log-mel ({front_end['mel_bins']} mel bins, window {front_end['window_size']}, "
        f"hop {front_end['hop_size']}, {front_end['fmin']}-{front_end['fmax']} Hz)"
    )


def describe(features_path: str | Path) -> str:
    """A few lines on what a packed file holds: clips per genre and fold, audio, origin."""
    names, targets, folds, attrs = read_index(features_path)
    per_genre = np.bincount(targets, minlength=len(GENRES))
    per_fold = Counter(folds.tolist())
    skipped = attrs["skipped"]
    lines = [
        f"{features_path}",
        f"  clips    {len(names)} packed of {attrs.get('clips_found', len(names))} found, "
        f"{len(skipped)} skipped",
        f"  audio    {attrs['sample_rate']} Hz mono, {attrs['clip_seconds']:g} s clips "
        f"({attrs['clip_samples']} samples), stored as {_stored_as(attrs)}",
        "  genres   "
        + ", ".join(f"{g} {c}" for g, c in zip(GENRES, per_genre.tolist(), strict=True)),
        "  folds    " + ", ".join(f"{k}: {per_fold.get(k, 0)}" for k in FOLDS),
    ]
    lines += [f"  skipped  {name}: {reason}" for name, reason in skipped]
    lines.append(f"  source   sha256 {attrs.get('source_sha256') or '(not recorded)'}")
    lines.append(
        f"  made by  genreflow {attrs.get('genreflow_version', '?')} at {attrs.get('created', '?')}"
    )
    return "\n".join(lines)
