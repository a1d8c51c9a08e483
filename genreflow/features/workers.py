"""The decoding workers of a pack: each clip decoded (and for log-mel, encoded) in a
worker process into a ring buffer in shared memory, handed to the writer in the clips'
order (`Decoding`), by a pool that ends the pack when a worker dies (`_Workers`)."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing import connection, shared_memory

import h5py
import numpy as np
import torch

from genreflow.audio import AudioDecodeError, float32_to_int16, load_audio
from genreflow.data.layout import Clip
from genreflow.errors import GenreflowError
from genreflow.features.reader import RowLayout, model_input
from genreflow.logmel import FRONT_END, LogmelFrontEnd
from genreflow.runtime import keep_freed_memory

# Clips per task sent to a worker, and tasks in flight per worker: every clip in flight
# holds a row of the shared ring (1.9 MB at 30 s), and a worker always has a task queued
# while the writer stores the rows of the one before.
CLIPS_PER_TASK = 2
TASKS_IN_FLIGHT_PER_WORKER = 2
# Where POSIX shared memory lives on Linux, and the share of its free space the ring may take.
SHM_FOLDER = "/dev/shm"
SHM_SHARE = 0.5


class Decoding:
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

    def __enter__(self) -> Decoding:
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
    # after its own start (once per process: 1.5 to 3 s on 2 busy cores, half of it
    # importing torch, which the log-mel encoder needs and each worker then shares).
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def plan_workers(workers: int, row_bytes: int, shm_free_bytes: int | None) -> tuple[int, int]:
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


def free_shared_memory() -> int | None:
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
        if self._front_end is None:
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
