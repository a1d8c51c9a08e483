"""The synthetic set's archive: `genres.tar.gz` in the original GTZAN release's layout,
the clips made by genreflow.data.synth.recipes, byte-identical for one seed."""

from __future__ import annotations

import gzip
import io
import itertools
import multiprocessing
import os
import re
import secrets
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from genreflow import storage
from genreflow.atomic import move_into_place
from genreflow.data.genres import GENRE_INDEX, GENRES
from genreflow.data.synth.dsp import SAMPLE_RATE
from genreflow.data.synth.recipes import synthesize_clip
from genreflow.errors import GenreflowError

ARCHIVE_NAME = "genres.tar.gz"
TOP_FOLDER = "genres"
# Every member gets this mtime (2001-09-09) so that one seed gives one archive, byte for byte.
ARCHIVE_MTIME = 1_000_000_000
MAX_CLIPS_PER_GENRE = 100_000  # the five digits of <genre>.000NN.au
MAX_SECONDS = 600.0

_CLIP_NAME = re.compile(r"^(?P<genre>[a-z]+)\.(?P<number>\d{5})\.au$")


def make_synthetic_gtzan(
    out_dir: str | Path,
    clips_per_genre: int = 10,
    seconds: float = 5.0,
    seed: int = 0,
    names: Iterable[str] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> tuple[Path, str]:
    """Write `out_dir/genres.tar.gz`, a synthetic set in the original GTZAN layout.

    Args:
        out_dir: folder to write into (created if missing).
        clips_per_genre: clips `<genre>.00000.au` .. `<genre>.{N-1}.au` per genre; ignored
            when `names` is given.
        seconds: length of every clip.
        seed: one seed, one archive (byte-identical on the same platform and numpy).
        names: the exact clip file names to make instead, e.g. `["jazz.00054.au", ...]`,
            for sets that must match a published split list; clip `jazz.00054.au` is the
            same audio whether it is made this way or as one of `clips_per_genre`.
        workers: processes that make clips (the archive is the same for any number).
        progress: report progress on stderr (a bar on a terminal, else a line at intervals).

    Returns:
        The archive's path and its sha256 (hex).
    """
    plan = _clip_plan(clips_per_genre, names)
    if not (0 < seconds <= MAX_SECONDS):
        raise GenreflowError(f"synth: --seconds must be in (0, {MAX_SECONDS:g}], got {seconds}")
    if seed < 0:
        raise GenreflowError(f"synth: --seed must be >= 0, got {seed}")
    if workers < 1:
        raise GenreflowError(f"synth: --workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenreflowError(f"{out_dir}: cannot create the output folder ({exc})") from exc
    target = out_dir / ARCHIVE_NAME

    # A half-written archive must never look finished: write aside, rename when complete.
    partial = out_dir / f".{ARCHIVE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.part"
    # os.open with 0o666, not mkstemp (0o600): the archive gets the user's usual permissions.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as raw:
            # No file name and mtime 0 in the gzip header: the bytes depend on the seed only.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    _write_members(tar, plan, seconds, seed, workers, progress)
        move_into_place(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target, storage.sha256_of(target)


def _clip_plan(clips_per_genre: int, names: Iterable[str] | None) -> list[tuple[str, int, str]]:
    """(genre, number, file name) of every clip to make, sorted by name."""
    if names is None:
        if not (1 <= clips_per_genre <= MAX_CLIPS_PER_GENRE):
            raise GenreflowError(
                f"synth: --clips-per-genre must be in 1..{MAX_CLIPS_PER_GENRE}, "
                f"got {clips_per_genre}"
            )
        return sorted(
            (genre, k, f"{genre}.{k:05d}.au") for genre in GENRES for k in range(clips_per_genre)
        )
    plan = []
    seen = set()
    for name in names:
        match = _CLIP_NAME.match(name)
        if match is None or match["genre"] not in GENRE_INDEX:
            raise GenreflowError(
                f"synth: clip name '{name}' is not of the form <genre>.NNNNN.au "
                f"with a GTZAN genre ({', '.join(GENRES)})"
            )
        if name in seen:
            raise GenreflowError(f"synth: clip name '{name}' is given twice")
        seen.add(name)
        plan.append((match["genre"], int(match["number"]), name))
    if not plan:
        raise GenreflowError("synth: the list of clip names is empty")
    return sorted(plan, key=lambda item: item[2])


def _write_members(
    tar: tarfile.TarFile,
    plan: list[tuple[str, int, str]],
    seconds: float,
    seed: int,
    workers: int,
    progress: bool,
) -> None:
    # (path, text of a list file, or clip task, or None for a folder), written in path order.
    members: list[tuple[str, str | tuple[str, int, float, int] | None]] = [(TOP_FOLDER, None)]
    members += [(f"{TOP_FOLDER}/{name}", text) for name, text in _marsyas_lists(plan)]
    members += [(f"{TOP_FOLDER}/{genre}", None) for genre in {genre for genre, _, _ in plan}]
    members += [
        (f"{TOP_FOLDER}/{genre}/{name}", (genre, number, seconds, seed))
        for genre, number, name in plan
    ]
    members.sort(key=lambda member: member[0])
    tasks = [payload for _, payload in members if isinstance(payload, tuple)]
    clips = _render(tasks, workers)

    from genreflow.progress import progress_bar

    bar = progress_bar(len(tasks), desc="synth", unit="clip", enabled=progress)
    try:
        for path, payload in members:
            info = tarfile.TarInfo(path)
            info.mtime = ARCHIVE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if payload is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            data = payload.encode() if isinstance(payload, str) else next(clips)
            info.mode = 0o644
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if not isinstance(payload, str):
                bar.update(1)
    finally:
        clips.close()
        bar.close()


def _clip_file(task: tuple[str, int, float, int]) -> bytes:
    genre, number, seconds, seed = task
    return _au_bytes(synthesize_clip(genre, number, seconds, seed))


def _render(tasks: list[tuple[str, int, float, int]], workers: int) -> Iterator[bytes]:
    """The clips' .au bytes in task order, made by `workers` processes.

    Each clip depends only on its task, so the bytes are the same whatever `workers` is.
    At most a few clips per worker wait in memory, so long sets stream.
    """
    if workers <= 1 or len(tasks) < 2:
        yield from map(_clip_file, tasks)
        return
    # spawn, not fork: forking a process that already runs BLAS or torch threads can hang.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        waiting = iter(tasks)
        pending = deque(pool.submit(_clip_file, t) for t in itertools.islice(waiting, 3 * workers))
        while pending:
            yield pending.popleft().result()
            for task in itertools.islice(waiting, 1):
                pending.append(pool.submit(_clip_file, task))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _marsyas_lists(plan: list[tuple[str, int, str]]) -> list[tuple[str, str]]:
    """The release's stray .mf files: every clip path with its label, tab separated."""

    def listing(entries):
        return "".join(f"{TOP_FOLDER}/{genre}/{name}\t{genre}\n" for genre, _, name in entries)

    everything = listing(plan)
    lists = [("input.mf", everything), ("bextract_single.mf", everything)]
    for genre in GENRES:
        lists.append((f"{genre[:2]}.mf", listing(e for e in plan if e[0] == genre)))
    return lists


def _au_bytes(clip: np.ndarray) -> bytes:
    pcm = np.round(np.clip(clip, -1.0, 1.0) * 32767.0).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, SAMPLE_RATE, format="AU", subtype="PCM_16")
    return buffer.getvalue()
