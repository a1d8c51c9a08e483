"""Pack a GTZAN tree into one HDF5 file of fixed-length 32 kHz int16 clips.

The file is a contract the training and embedding steps read (see read_index):

- datasets: `audio_name` (N,) UTF-8 bytes, the clip's file name (b"blues.00000.au");
  `waveform` (N, clip_samples) int16, one row per HDF5 chunk; `target` (N, 10) float32
  one-hot in GENRES order; `fold` (N,) int32, the seed's rule over every clip found;
  `skipped` (M, 2) UTF-8 strings, [file name, reason] of each clip left out (M may be 0).
- attributes: sample_rate, clip_samples, clip_seconds, genres, source_sha256 ("" when
  unknown), clips_found, genreflow_version, created (ISO 8601, UTC).

Rows are in sorted name order. Folds are assigned before anything is decoded, so a clip
that turns out unreadable leaves a hole in its fold instead of shifting its neighbours'.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from genreflow import __version__, storage
from genreflow.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    clip_samples,
    float32_to_int16,
    load_clip,
)
from genreflow.data.download import recorded_sha256
from genreflow.data.genres import FOLDS, GENRE_INDEX, GENRES, assign_folds
from genreflow.data.layout import Clip, list_clips
from genreflow.errors import GenreflowError

ON_ERROR_CHOICES = ("skip", "fail")
REQUIRED_DATASETS = ("audio_name", "waveform", "target", "fold")
REQUIRED_ATTRS = ("sample_rate", "clip_samples", "clip_seconds", "genres")
# Clips per task sent to a worker: enough to amortise the round trip, small enough that
# the few tasks in flight per worker stay a few tens of MB at 30 s per clip.
CLIPS_PER_TASK = 4
TASKS_IN_FLIGHT_PER_WORKER = 2
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

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"packed {self.clips} clips ({len(self.skipped)} skipped) into {self.path} in "
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
        workers: decoding processes (default: the usable cores; 1 decodes in-process).
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
                workers=workers,
                on_error=on_error,
                source_sha256=source_sha256,
                progress=progress,
            )
        summary.path = str(out)
        return summary
    if on_error not in ON_ERROR_CHOICES:
        raise GenreflowError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}: {on_error!r}")
    if source_sha256 is None:
        source_sha256 = recorded_sha256(dataset)
    sha = (source_sha256 or "").strip().lower()
    if sha and not _SHA256.match(sha):
        raise GenreflowError(f"source sha256 must be 64 hex digits, got {source_sha256!r}")
    n_samples = clip_samples(clip_seconds)
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

    out.parent.mkdir(parents=True, exist_ok=True)
    # A name that cannot be mistaken for a finished file, in the same folder so that the
    # final rename is atomic.
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    print(
        f"pack: {len(clips)} clips in {len(GENRES)} genres from {dataset}, "
        f"{clip_seconds:g} s at {SAMPLE_RATE} Hz, {workers} worker{'s' if workers > 1 else ''}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    try:
        summary = _write(
            clips, folds, partial, n_samples, clip_seconds, workers, on_error, sha, progress
        )
        with open(partial, "rb+") as f:  # durable before it gets the finished name
            os.fsync(f.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary.path = out
    summary.seconds = time.perf_counter() - started
    summary.workers = workers
    return summary


def _write(
    clips: list[Clip],
    folds: dict[str, int],
    path: Path,
    n_samples: int,
    clip_seconds: float,
    workers: int,
    on_error: str,
    source_sha256: str,
    progress: bool,
) -> PackSummary:
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    per_genre: Counter[str] = Counter()
    with h5py.File(path, "w") as hf:
        waveform = hf.create_dataset(
            "waveform",
            shape=(len(clips), n_samples),
            maxshape=(None, n_samples),
            dtype=np.int16,
            chunks=(1, n_samples),
        )
        bar = tqdm(
            total=len(clips), unit="clip", desc="pack", file=sys.stderr, disable=not progress
        )
        # closing(): on an error, stop the workers now rather than when the traceback
        # holding this frame is collected.
        with bar, closing(_decode_all(clips, n_samples, workers)) as decoded_clips:
            for clip, decoded in zip(clips, decoded_clips, strict=True):
                bar.update()
                if isinstance(decoded, str):
                    if on_error == "fail":
                        raise GenreflowError(f"{clip.path}: {decoded} (--on-error fail)")
                    skipped.append((clip.name, decoded))
                    tqdm.write(f"pack: skipped {clip.path}: {decoded}", file=sys.stderr)
                    continue
                # One row is one chunk: handing HDF5 the chunk's bytes skips its selection
                # and conversion machinery, which costs more than the copy itself.
                waveform.id.write_direct_chunk((len(names), 0), decoded.tobytes())
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
        waveform.resize(n, axis=0)
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
        hf.attrs.update(
            {
                "sample_rate": SAMPLE_RATE,
                "clip_samples": n_samples,
                "clip_seconds": float(clip_seconds),
                "genres": list(GENRES),
                "source_sha256": source_sha256,
                "clips_found": len(clips),
                "genreflow_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
    return PackSummary(path=path, clips=n, skipped=skipped, per_genre=dict(per_genre))


def _decode_all(clips: Sequence[Clip], n_samples: int, workers: int) -> Iterator[np.ndarray | str]:
    """Each clip's int16 waveform, or the reason it is unreadable, in the clips' order."""
    paths = [str(c.path) for c in clips]
    tasks = [paths[i : i + CLIPS_PER_TASK] for i in range(0, len(paths), CLIPS_PER_TASK)]
    if workers == 1:
        for task in tasks:
            yield from _decode_task(task, n_samples)
        return
    # Forking a process that already runs threads (tqdm's monitor, BLAS, torch) can
    # deadlock; a fork server preloaded with this module starts workers in milliseconds
    # after its own start (about half a second, once per process).
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    # Submitting only a few tasks ahead (unlike Executor.map, which submits all) keeps the
    # decoded audio waiting in memory bounded when writing falls behind.
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: deque[Future] = deque()
        queue = iter(tasks)
        try:
            for task in queue:
                pending.append(pool.submit(_decode_task, task, n_samples))
                if len(pending) >= workers * TASKS_IN_FLIGHT_PER_WORKER:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        except BrokenProcessPool as exc:
            raise GenreflowError(
                f"a decoding worker process died ({exc}): out of memory, or a __main__ that "
                "worker processes cannot re-import (such as code piped into python's stdin); "
                "workers=1 decodes in this process"
            ) from None
        finally:
            # On an error or an abandoned generator, drop the queued work instead of
            # decoding the rest of the dataset before returning.
            for future in pending:
                future.cancel()


def _decode_task(paths: list[str], n_samples: int) -> list[np.ndarray | str]:
    """Worker: decode a few clips; an unreadable one becomes its reason."""
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(float32_to_int16(load_clip(path, n_samples)))
        except AudioDecodeError as exc:
            out.append(exc.reason)
    return out


def read_index(features_path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Names, genre indices, folds and attributes of a packed file, after checking it.

    Args:
        features_path: a path, file://, http(s):// or gs:// URI (remote: downloaded once
            into the cache).

    Returns:
        (names, targets, folds, attrs): str names (N,), int64 genre indices (N,), int32
        folds (N,), and the attributes as plain Python values plus `skipped`, a list of
        (name, reason).

    Raises:
        GenreflowError: the file is missing, not HDF5, or not a complete genreflow file.
    """
    path = storage.input_path(features_path)
    if not path.is_file():
        raise GenreflowError(f"{path}: features file not found")
    try:
        hf = h5py.File(path, "r")
    except OSError as exc:
        raise GenreflowError(f"{path}: not a readable HDF5 file ({exc})") from None
    with hf:
        missing = [f"dataset '{d}'" for d in REQUIRED_DATASETS if d not in hf]
        missing += [f"attribute '{a}'" for a in REQUIRED_ATTRS if a not in hf.attrs]
        if missing:
            raise GenreflowError(
                f"{path}: not a genreflow features file, missing {', '.join(missing)}"
            )
        attrs = {key: _plain(value) for key, value in hf.attrs.items()}
        names = np.array(hf["audio_name"].asstr()[:], dtype=str)
        target = hf["target"][:]
        folds = hf["fold"][:].astype(np.int32)
        waveform_shape = hf["waveform"].shape
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
    if waveform_shape != (n, attrs["clip_samples"]):
        problems.append(
            f"waveform has shape {waveform_shape}, expected ({n}, {attrs['clip_samples']})"
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


def _plain(value: object) -> object:
    """An HDF5 attribute as a plain Python value (lists of str, ints, floats, str)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


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
        f"  audio    {attrs['sample_rate']} Hz mono int16, {attrs['clip_seconds']:g} s clips "
        f"({attrs['clip_samples']} samples)",
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
