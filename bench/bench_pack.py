"""Packing throughput: `genreflow pack` against the seed's way, on the same files.

- ours: genreflow.features.pack with one decoding process per core (soundfile + soxr HQ,
  a fork server, workers decoding into a ring of shared memory that the writer stores
  from, one chunk write per clip, the output written out and dropped from the page cache
  as it goes, fsync at the end);
- the seed's way (panns_transfer_to_gtzan, utils/features.py): one process,
  `librosa.load(path, sr=32000, mono=True)`, pad or trim to 30 s, and one HDF5 row write
  per clip into datasets created once up front;
- this machine's limit: one core's decode + resample + int16 rate (the very work a pack
  worker does per clip, with no writing, in a worker process set up as pack's are) times
  the cores.

The clips are 30 s .au files of the synthetic set at 22050 Hz, as GTZAN's are, so decoding
and resampling dominate. Making a 30 s clip costs twice what decoding it does, so each
synthetic clip is also hard-linked under further names of its genre (`--names-per-clip`):
more files to pack at no synthesis cost, and decoding work does not depend on the music.
Every file is read once before timing, so every run finds them all in the page cache.

    python bench/bench_pack.py [--quick]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common


def seed_pack(clips, out: Path, clip_samples: int) -> None:
    """The seed's packing loop, restated: sequential librosa decode, a write per clip."""
    import h5py
    import librosa
    import numpy as np

    from genreflow.audio import SAMPLE_RATE, fit_length, float32_to_int16
    from genreflow.data.genres import GENRE_INDEX, GENRES

    with h5py.File(out, "w") as hf:
        names = hf.create_dataset("audio_name", shape=(len(clips),), dtype="S80")
        waveform = hf.create_dataset("waveform", shape=(len(clips), clip_samples), dtype=np.int16)
        target = hf.create_dataset("target", shape=(len(clips), len(GENRES)), dtype=np.float32)
        for row, clip in enumerate(clips):
            audio, _ = librosa.load(clip.path, sr=SAMPLE_RATE, mono=True)
            names[row] = clip.name.encode()
            waveform[row] = float32_to_int16(fit_length(audio, clip_samples))
            target[row] = np.eye(len(GENRES), dtype=np.float32)[GENRE_INDEX[clip.genre]]


def decode_alone(paths: list[str], clip_samples: int) -> float:
    """A pack worker's per-clip work (decode, resample, pad/trim, int16 into a row), with
    no writing; run in a worker process. Returns the seconds it took there."""
    import numpy as np

    from genreflow.features.workers import _decode_into

    row = np.empty(clip_samples, dtype=np.int16)
    started = time.perf_counter()
    for path in paths:
        reason = _decode_into(path, row)
        if reason is not None:
            raise RuntimeError(f"unreadable clip in the synthetic set: {path}: {reason}")
    return time.perf_counter() - started


def one_core_worker() -> ProcessPoolExecutor:
    """One process started as pack starts its workers (fork server, allocator settings):
    the bench's own process keeps its defaults, which the seed's way runs under."""
    from genreflow.features.workers import _worker_context
    from genreflow.runtime import keep_freed_memory

    return ProcessPoolExecutor(1, mp_context=_worker_context(), initializer=keep_freed_memory)


def link_more_names(root: Path, names_per_clip: int) -> None:
    """Hard-link every clip <genre>.000NN.au under names_per_clip - 1 further numbers."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        clips = sorted(folder.glob("*.au"))
        for copy in range(1, names_per_clip):
            for number, clip in enumerate(clips):
                name = f"{folder.name}.{copy * len(clips) + number:05d}.au"
                (folder / name).hardlink_to(clip)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--clips-per-genre", type=int, help="synthesised: 5 (--quick) or 10")
    p.add_argument(
        "--names-per-clip", type=int, help="files per synthesised clip: 4 (--quick) or 10"
    )
    p.add_argument("--rounds", type=int, help="default 3 (--quick) or 5")
    args = p.parse_args()
    clips_per_genre = args.clips_per_genre or (5 if args.quick else 10)
    names_per_clip = args.names_per_clip or (4 if args.quick else 10)
    rounds = args.rounds or (3 if args.quick else 5)
    seconds = 30.0

    import librosa

    from genreflow.audio import clip_samples
    from genreflow.data.layout import list_clips
    from genreflow.features import pack

    table = common.Table("Packing 30 s .au clips", args.load_at_start)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_pack."))
    worker = one_core_worker()
    try:
        root = common.synth_dataset(workdir, clips_per_genre=clips_per_genre, seconds=seconds)
        link_more_names(root, names_per_clip)
        clips = list_clips(root)
        paths = [str(c.path) for c in clips]
        n_samples = clip_samples(seconds)
        workers = common.cores()
        # Warm: imports, librosa's first call, the fork server and the one-core worker,
        # the page cache; then the runs take turns.
        librosa.load(paths[0], sr=32000, mono=True)
        worker.submit(decode_alone, paths, n_samples).result()
        inside: list[float] = []
        busy: dict[str, list[float]] = {}
        times = common.alternate(
            {
                "seed": lambda: seed_pack(clips, workdir / "seed.h5", n_samples),
                "ours": lambda: pack(
                    root,
                    workdir / "ours.h5",
                    clip_seconds=seconds,
                    workers=workers,
                    progress=False,
                ),
                "one core": lambda: inside.append(
                    worker.submit(decode_alone, paths, n_samples).result()
                ),
            },
            rounds,
            busy,
            settle=True,
        )
    finally:
        worker.shutdown()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    n = len(clips)
    rate = {name: n / common.median(values) for name, values in times.items()}
    limit = rate["one core"] * workers
    table.add(
        f"genreflow pack, {workers} workers vs the seed's way",
        rate["ours"],
        rate["seed"],
        "clips/s",
        target=1.7,
    )
    table.add(
        f"genreflow pack vs this machine's limit (one core's rate x {workers})",
        rate["ours"],
        limit,
        "clips/s",
    )
    table.note(
        f"{n} clips of {seconds:g} s (22050 Hz .au -> 32 kHz int16), median of {rounds} "
        "rounds, the three runs taking turns in each round; seconds per run: "
        + "; ".join(f"{name} {common.spread(values)}" for name, values in times.items())
    )
    table.note(
        f"one core: {rate['one core']:.1f} clips/s decoding alone ({n / common.median(inside):.1f} "
        "timed inside the worker); pack's figure includes listing, starting its workers, "
        "writing, fsync and replacing the previous output"
    )
    table.note(
        "busy CPU seconds of the whole machine per run (median; the kernel's page-cache "
        "and writeback work included): "
        + "; ".join(f"{name} {common.median(values):.2f}" for name, values in busy.items())
    )
    table.print(common.command_line())


if __name__ == "__main__":
    main()
