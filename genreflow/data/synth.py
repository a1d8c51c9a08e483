"""A synthetic GTZAN-shaped set: ten genres of made-up music in the original release's layout.

GTZAN cannot be downloaded everywhere, so everything downstream (download, pack, train)
can run on this set instead. The archive looks like the real `genres.tar.gz`:
`genres/<genre>/<genre>.000NN.au` (Sun .au, 22050 Hz, mono, 16-bit PCM) and the stray
Marsyas list files users find beside them in `genres/` (`input.mf`, `bextract_single.mf`
and one per genre, `bl.mf` .. `ro.mf`), each line `<clip path>\\t<genre>`.

The music is made so that a model has to look at the log-mel image: the genres differ in
tempo and rhythm pattern, instrument timbre, harmony and register, noise and distortion,
every clip draws its own tempo, key, instrument mix and levels, and neighbouring genres
share parts of their recipes (rock sits between blues and metal, pop and disco share
four-on-the-floor and synth pads). Every clip is normalised to a loudness drawn from one
range shared by all genres, so loudness alone says nothing about the genre.

Clip k of a genre comes from its own random stream (seed, genre, k): it does not depend
on how many clips are asked for, and one seed gives the same bytes on the same platform
and numpy version. Synthesis is vectorised over samples: loops run over parts, drum hits
and blocks of samples, never over single samples.
"""

from __future__ import annotations

import functools
import gzip
import io
import itertools
import multiprocessing
import os
import re
import secrets
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from genreflow import storage
from genreflow.atomic import move_into_place
from genreflow.data.genres import GENRE_INDEX, GENRES
from genreflow.errors import GenreflowError

SAMPLE_RATE = 22050
ARCHIVE_NAME = "genres.tar.gz"
TOP_FOLDER = "genres"
# Every member gets this mtime (2001-09-09) so that one seed gives one archive, byte for byte.
ARCHIVE_MTIME = 1_000_000_000
# Loudness of every clip, whatever its genre: RMS drawn uniformly in this range (dBFS).
LOUDNESS_RANGE_DB = (-26.0, -16.0)
MAX_CLIPS_PER_GENRE = 100_000  # the five digits of <genre>.000NN.au
MAX_SECONDS = 600.0

_CLIP_NAME = re.compile(r"^(?P<genre>[a-z]+)\.(?P<number>\d{5})\.au$")
_TWO_PI = 2.0 * np.pi


# --- the archive ---------------------------------------------------------------------------
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


# --- one clip ------------------------------------------------------------------------------
def synthesize_clip(genre: str, number: int, seconds: float = 5.0, seed: int = 0) -> np.ndarray:
    """Clip `number` of `genre`: float32 mono at 22050 Hz, in [-1, 1].

    The same (genre, number, seconds, seed) always gives the same samples; its random
    stream is its own, so other clips never change it.
    """
    if genre not in GENRE_INDEX:
        raise GenreflowError(f"synth: '{genre}' is not a GTZAN genre ({', '.join(GENRES)})")
    rng = np.random.default_rng([seed, GENRE_INDEX[genre], number])
    n = max(1, int(round(seconds * SAMPLE_RATE)))
    mix = _RECIPES[genre](rng, n)
    return _master(rng, mix)


def _master(rng: np.random.Generator, mix: np.ndarray) -> np.ndarray:
    """Recording bandwidth, hiss, then one loudness range for all genres and a soft limiter."""
    mix = _lowpass(mix, rng.uniform(7000.0, 10500.0), order=2)
    hiss = _highpass(rng.standard_normal(len(mix)), 1500.0)
    mix = mix + hiss * _rms(mix) * 10 ** (rng.uniform(-60.0, -40.0) / 20)
    target = 10 ** (rng.uniform(*LOUDNESS_RANGE_DB) / 20)
    mix = mix * (target / max(_rms(mix), 1e-9))
    # A limiter, not a clip: a soft knee from -7 dBFS that never passes -1 dBFS.
    ceiling = 10 ** (-1.0 / 20)
    loud = np.abs(mix) > 0.5 * ceiling
    mix[loud] = np.sign(mix[loud]) * (
        0.5 * ceiling
        + 0.5 * ceiling * np.tanh((np.abs(mix[loud]) - 0.5 * ceiling) / (0.5 * ceiling))
    )
    return mix.astype(np.float32)


# --- signal helpers ------------------------------------------------------------------------
def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def _norm(x: np.ndarray) -> np.ndarray:
    """Scale a part to RMS 1 so that the mix levels (dB) mean what they say."""
    level = _rms(x)
    return x / level if level > 1e-12 else x


@functools.lru_cache(maxsize=512)
def _butter(kind: str, edges: tuple[float, ...], order: int) -> np.ndarray:
    return signal.butter(
        order, edges if len(edges) > 1 else edges[0], kind, fs=SAMPLE_RATE, output="sos"
    )


def _filter(x: np.ndarray, kind: str, edges: tuple[float, ...], order: int) -> np.ndarray:
    # Cut-offs on a 25 Hz grid: designs are cached, and nobody hears the difference.
    edges = tuple(min(round(e / 25) * 25, 0.45 * SAMPLE_RATE) for e in edges)
    return signal.sosfilt(_butter(kind, edges, order), x).astype(np.float32)


def _lowpass(x: np.ndarray, hz: float, order: int = 2) -> np.ndarray:
    return _filter(x, "lowpass", (hz,), order)


def _highpass(x: np.ndarray, hz: float, order: int = 2) -> np.ndarray:
    return _filter(x, "highpass", (hz,), order)


def _bandpass(x: np.ndarray, lo: float, hi: float, order: int = 2) -> np.ndarray:
    return _filter(x, "bandpass", (lo, hi), order)


def _drive(x: np.ndarray, gain: float) -> np.ndarray:
    """Soft clipping: the overdriven amp of blues and rock, the saturated wall of metal."""
    x = _norm(x)
    return np.tanh(gain * x) / np.tanh(gain)


def _reverb(rng: np.random.Generator, x: np.ndarray, seconds: float, wet: float) -> np.ndarray:
    """A room as decaying noise: enough to smear onsets the way a hall does."""
    # Cut where the tail has fallen by 40 dB: the rest is below the mix.
    tau = _tau(0.6 * seconds)
    response = _lowpass(rng.standard_normal(len(tau)), 5000.0) * np.exp(-6.9 * tau / seconds)
    tail = signal.fftconvolve(x.astype(np.float32), response.astype(np.float32))[: len(x)]
    return (1 - wet) * x + wet * _norm(tail) * _rms(x)


def _echo(x: np.ndarray, delay_s: float, feedback: float, taps: int = 4) -> np.ndarray:
    """Dub delay: repeats of the part, each `feedback` softer."""
    out = x.copy()
    shift = int(delay_s * SAMPLE_RATE)
    for tap in range(1, taps + 1):
        if tap * shift >= len(x):
            break
        out[tap * shift :] += feedback**tap * x[: len(x) - tap * shift]
    return out


def _swing(beats: np.ndarray, ratio: float, unit: float) -> np.ndarray:
    """Delay the off-beat of every `unit` (in beats) to `ratio` of it: 0.5 straight, 2/3 triplet."""
    position = beats / unit
    whole = np.floor(position)
    frac = position - whole
    warped = np.where(frac < 0.5, frac * 2 * ratio, ratio + (frac - 0.5) * 2 * (1 - ratio))
    return (whole + warped) * unit


def _midi_hz(midi: np.ndarray) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=float) - 69.0) / 12.0)


def _phase(f: np.ndarray) -> np.ndarray:
    return _TWO_PI * np.cumsum(f) / SAMPLE_RATE


# --- instruments ---------------------------------------------------------------------------
# An instrument is a set of harmonic weights. Each note gets one wavetable (one period,
# band-limited to its own pitch so that nothing aliases) and is read out by phase, which
# costs the same whatever the number of harmonics. A plucked or struck sound starts from
# `bright` weights and settles to `dull` ones, the way high partials die first.
_TABLE_SIZE = 2048  # a power of two: the phase wraps with a bit mask


@functools.lru_cache(maxsize=4)
def _sines(n_harm: int) -> np.ndarray:
    k = np.arange(1, n_harm + 1)[:, None]
    return np.sin(_TWO_PI * k * np.arange(_TABLE_SIZE)[None, :] / _TABLE_SIZE).astype(np.float32)


WeightsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Tone:
    """An instrument: harmonic weights, envelope and pitch movements.

    `bright` (and `dull`) are weights of harmonics 1..K, or a function of the notes'
    pitches (Hz) and indices that gives one row of weights per note (vowels).
    """

    bright: np.ndarray | WeightsFn
    dull: np.ndarray | None = None
    settle: float = 0.0  # 1/s: how fast bright turns into dull
    attack: float = 0.003
    decay: float = 0.0  # 1/s while held
    release: float = 0.08
    vibrato: float = 0.0  # depth (fraction of the pitch), at 5.5 Hz, fading in
    detune: float = 0.0  # a second copy this much sharp: ensembles, fat synths
    drop: float = 0.0  # the pitch starts this fraction higher and falls into place (808)
    tremolo_hz: float = 0.0
    tremolo_depth: float = 0.0
    breath: float = 0.0  # level of a noise burst at each onset (consonants)


def _weights(spec: np.ndarray | WeightsFn, hz: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if callable(spec):
        return spec(hz, ids)
    return np.broadcast_to(np.asarray(spec, dtype=float), (len(hz), len(spec)))


def _tables(spec: np.ndarray | WeightsFn, hz: np.ndarray, ids: np.ndarray, headroom: float):
    """One wavetable per note, without the harmonics that would alias at its highest pitch."""
    weights = _weights(spec, hz, ids)
    k = np.arange(1, weights.shape[1] + 1)
    audible = k[None, :] * (hz * headroom)[:, None] < 0.45 * SAMPLE_RATE
    # einsum, not BLAS: threaded BLAS can sum in a different order from run to run, and a
    # seed must give the same bytes.
    masked = (weights * audible).astype(np.float32)
    return np.einsum("nk,kt->nt", masked, _sines(weights.shape[1])).ravel()


def _pluck(brightness: float, decay: float, damping: float, n_harm: int = 12, where=0.2):
    """A plucked string: `where` along the string it is plucked; high partials die first."""
    k = np.arange(1, n_harm + 1)
    bright = k**-brightness * np.abs(np.sin(np.pi * k * where)) / np.sin(np.pi * where)
    return _Tone(bright, bright * np.exp(-1.2 * (k - 1)), settle=damping, decay=decay, release=0.06)


def _organ(levels: Sequence[float], leslie_hz: float, leslie_depth: float) -> _Tone:
    """A drawbar organ: steady partials, the rotating speaker's tremolo."""
    return _Tone(
        np.asarray(levels, float),
        attack=0.005,
        release=0.04,
        tremolo_hz=leslie_hz,
        tremolo_depth=leslie_depth,
    )


def _bowed(brightness: float, attack: float, vibrato: float, voices: int = 2, n_harm: int = 14):
    """Bowed strings: sawtooth-like partials, a slow attack, delayed vibrato, an ensemble."""
    weights = np.arange(1, n_harm + 1) ** -brightness
    return _Tone(
        weights,
        attack=attack,
        decay=0.3,
        release=0.25,
        vibrato=vibrato,
        detune=0.006 if voices > 1 else 0.0,
    )


def _spectrum(period: np.ndarray, n_harm: int) -> np.ndarray:
    """Harmonic magnitudes of one period of a waveform."""
    return np.abs(np.fft.rfft(period))[1 : n_harm + 1] * 2 / len(period)


def _fm(ratio: int, index: float, index_decay: float, decay: float) -> _Tone:
    """Two-operator FM (the electric piano): the index, and the brightness, fall away."""
    theta = _TWO_PI * np.arange(256) / 256
    bright = _spectrum(np.sin(theta + index * np.sin(ratio * theta)), 24)
    dull = _spectrum(np.sin(theta + 0.1 * index * np.sin(ratio * theta)), 24)
    return _Tone(bright, dull, settle=index_decay, decay=decay, release=0.15)


def _saw(brightness: float, detune: float, attack: float, decay: float, n_harm: int = 16):
    """A synthesiser: two detuned saws (pads, leads, synth bass)."""
    weights = np.arange(1, n_harm + 1) ** -brightness
    return _Tone(weights, attack=attack, decay=decay, release=0.12, detune=2 * detune)


def _sub(drop: float, decay: float, grit: float) -> _Tone:
    """The 808: a sine, saturated by `grit`, falling into its pitch, long."""
    theta = _TWO_PI * np.arange(256) / 256
    weights = _spectrum(np.tanh(grit * np.sin(theta)) / np.tanh(grit), 8)
    return _Tone(weights, attack=0.004, decay=decay, release=0.1, drop=drop)


# Formants (F1, F2, F3, Hz) of a, e, i, o, u: averages for adult male speakers
# (Peterson & Barney 1952).
_VOWELS = np.array(
    [[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]],
    dtype=float,
)
_FORMANT_GAINS = np.array([1.0, 0.6, 0.3])
_FORMANT_WIDTHS = np.array([90.0, 120.0, 160.0])


def _voice(vowels: np.ndarray, vibrato: float, breath: float) -> _Tone:
    """A voice: harmonics of the pitch shaped by each note's vowel, vibrato and breath."""

    def shaped(hz: np.ndarray, ids: np.ndarray) -> np.ndarray:
        formants = _VOWELS[vowels[ids % len(vowels)]]  # (notes, 3)
        harmonics = hz[:, None, None] * np.arange(1, 33)[None, :, None]  # (notes, K, 1)
        distance = (harmonics - formants[:, None, :]) / _FORMANT_WIDTHS
        return (_FORMANT_GAINS / (1 + distance**2)).sum(axis=2)

    return _Tone(shaped, attack=0.02, decay=0.5, release=0.08, vibrato=vibrato, breath=breath)


_BLOCK = 8192  # samples per step: temporaries stay small (cached, never fresh pages)


def _notes(
    n: int,
    starts: np.ndarray,
    durs: np.ndarray | float,
    midis: np.ndarray,
    vels: np.ndarray | float,
    tone: _Tone,
    bends: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One monophonic line: each note sounds until the next one starts (5 ms crossfade)."""
    starts = np.atleast_1d(np.asarray(starts, dtype=float))
    out = np.zeros(n, dtype=np.float32)
    if len(starts) == 0:
        return out
    order = np.argsort(starts, kind="stable")

    def per_note(values, dtype=np.float32):
        return np.ascontiguousarray(
            np.broadcast_to(np.asarray(values, dtype=dtype), starts.shape)[order]
        )

    onset = np.round(starts[order] * SAMPLE_RATE).astype(np.int64)
    first = int(np.clip(onset[0], 0, n))
    if first == n:
        return out
    # Which note sounds at each sample: the line is piecewise constant over notes.
    counts = np.diff(np.append(np.clip(onset, first, n), n))
    seg = np.repeat(np.arange(len(onset), dtype=np.int32), counts)

    hz = _midi_hz(per_note(midis, float))
    headroom = (1 + 2 * tone.vibrato) * (1 + tone.drop) * (1 + tone.detune)
    bend = None if bends is None else per_note(bends) / 12
    if bend is not None:
        headroom *= 2 ** bend.max()
    bright = _tables(tone.bright, hz, order, headroom)
    dull = None if tone.dull is None else _tables(tone.dull, hz, order, headroom)
    # Per-note values, read per sample through `seg`.
    onset_s = (onset / SAMPLE_RATE).astype(np.float32)
    steps = hz * (_TABLE_SIZE / SAMPLE_RATE)  # table steps per sample
    held_s = per_note(durs)
    gain = per_note(vels)
    # Fade out in the last 5 ms before the next note takes the line over.
    until_s = (np.append(onset[1:], n + SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    base = np.arange(len(onset), dtype=np.int64) * _TABLE_SIZE
    copies = (1.0, 1.0 + tone.detune) if tone.detune else (1.0,)
    phase = [0.0] * len(copies)
    noise = None
    if tone.breath and rng is not None:
        noise = _norm(_bandpass(rng.standard_normal(n - first), 2500.0, 7000.0))
        noise = noise.astype(np.float32) * np.float32(tone.breath * 0.3)

    for lo in range(first, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        s = seg[lo - first : hi - first]
        t = np.arange(lo, hi, dtype=np.float32) * np.float32(1 / SAMPLE_RATE)
        tau = t - onset_s[s]
        f = steps[s]
        if bend is not None:
            # A bent string: the pitch rises by `bend` semitones over the first ~120 ms.
            rise = np.minimum(tau * np.float32(1 / 0.12), 1)
            f = f * np.exp2(bend[s] * rise * rise)
        if tone.vibrato:
            depth = np.minimum(tau * np.float32(1 / 0.35), 1) * np.float32(tone.vibrato)
            f = f * (1 + depth * np.sin(np.float32(_TWO_PI * 5.5) * tau))
        if tone.drop:
            f = f * (1 + np.float32(tone.drop) * np.exp(np.float32(-25.0) * tau))
        fade = None if dull is None else np.exp(np.float32(-tone.settle) * tau)
        wave = np.zeros(hi - lo, dtype=np.float32)
        for c, sharpen in enumerate(copies):
            cycles = np.cumsum(f * sharpen)
            cycles += phase[c]
            phase[c] = cycles[-1]
            at = cycles.astype(np.int64)
            at &= _TABLE_SIZE - 1
            at += base[s]
            if dull is None:
                wave += bright[at]
            else:
                low = dull[at]
                wave += low + (bright[at] - low) * fade
        if noise is not None:
            wave += noise[lo - first : hi - first] * np.exp(np.float32(-40.0) * tau)
        held = np.minimum(tau, held_s[s])
        # Linear attack; one exponential for the decay while held and the release after.
        env = np.minimum(tau * np.float32(1 / tone.attack), 1)
        env *= np.exp(
            -(held * np.float32(tone.decay) + (tau - held) * np.float32(1 / tone.release))
        )
        if tone.tremolo_depth:
            wobble = np.sin(np.float32(_TWO_PI * tone.tremolo_hz) * tau)
            env *= 1 - np.float32(tone.tremolo_depth) * (0.5 + 0.5 * wobble)
        env *= np.minimum((until_s[s] - t) * np.float32(200.0), 1)
        env *= gain[s]
        out[lo:hi] = wave * env
    return out


# --- drums: one sample per drum and clip, added in at every hit ---------------------------
def _tau(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * SAMPLE_RATE), dtype=np.float32) / np.float32(SAMPLE_RATE)


def _kick(rng: np.random.Generator) -> np.ndarray:
    tau = _tau(0.5)
    low, high = rng.uniform(42, 60), rng.uniform(80, 160)
    f = low + (high - low) * np.exp(-tau * rng.uniform(20, 45))
    body = np.sin(_phase(f)) * np.exp(-tau * rng.uniform(5, 12))
    click = _highpass(rng.standard_normal(len(tau)), 2000.0) * np.exp(-tau * 300.0)
    return body + rng.uniform(0.05, 0.4) * click


def _snare(rng: np.random.Generator) -> np.ndarray:
    tau = _tau(0.4)
    tone = np.sin(_TWO_PI * rng.uniform(160, 240) * tau) * np.exp(-tau * 30.0)
    rattle = _bandpass(rng.standard_normal(len(tau)), 1000.0, rng.uniform(6000, 9500))
    return 0.5 * tone + rattle * np.exp(-tau * rng.uniform(12, 25))


def _hat(rng: np.random.Generator, decay: float) -> np.ndarray:
    tau = _tau(min(0.8, 6.0 / decay))
    metal = _highpass(rng.standard_normal(len(tau)), rng.uniform(6000, 8000), order=4)
    return metal * np.exp(-tau * decay)


def _cymbal(rng: np.random.Generator, decay: float, ping: float) -> np.ndarray:
    """Ride or crash: inharmonic partials (the bell) over high noise (the wash)."""
    tau = _tau(min(3.0, 5.0 / decay))
    partials = rng.uniform(2500, 9000, 6).astype(np.float32)
    bell = np.sin(np.float32(_TWO_PI) * partials[:, None] * tau[None, :]).sum(axis=0) / 6
    wash = _highpass(rng.standard_normal(len(tau)), 3500.0, order=2)
    return (ping * bell + wash) * np.exp(-tau * decay)


def _rim(rng: np.random.Generator) -> np.ndarray:
    tau = _tau(0.12)
    click = _bandpass(rng.standard_normal(len(tau)), 1500.0, 4000.0) * np.exp(-tau * 120.0)
    return click + np.sin(_TWO_PI * rng.uniform(400, 600) * tau) * np.exp(-tau * 60.0)


def _clap(rng: np.random.Generator) -> np.ndarray:
    tau = _tau(0.3)
    burst = _bandpass(rng.standard_normal(len(tau)), 900.0, 3000.0)
    flutter = sum(np.exp(-np.maximum(tau - d, 0) * 150.0) * (tau >= d) for d in (0, 0.011, 0.022))
    return burst * (flutter + 0.5 * np.exp(-tau * 18.0) * (tau >= 0.03))


def _brush(rng: np.random.Generator) -> np.ndarray:
    tau = _tau(0.35)
    swish = _bandpass(rng.standard_normal(len(tau)), 2000.0, 8000.0)
    return swish * -np.expm1(-tau / 0.02) * np.exp(-tau * 9.0)


# --- the song grid -------------------------------------------------------------------------
_CHORDS = {
    "maj": (0, 4, 7),
    "min": (0, 3, 7),
    "dom7": (0, 4, 7, 10),
    "min7": (0, 3, 7, 10),
    "maj7": (0, 4, 7, 11),
    "min9": (0, 3, 7, 10, 14),
    "dom9": (0, 4, 7, 10, 14),
    "maj9": (0, 4, 7, 11, 14),
    "pow": (0, 7, 12),
}
_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "major_pent": (0, 2, 4, 7, 9),
    "minor_pent": (0, 3, 5, 7, 10),
    "blues": (0, 3, 5, 6, 7, 10),
}


class _Song:
    """The clip's grid: tempo, swing, key and chord progression, and the parts mixed so far.

    A clip is an excerpt, so it starts anywhere in a bar and anywhere in the progression.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        n: int,
        bpm: float,
        progression: Sequence[tuple[int, str]],
        beats_per_chord: float = 4.0,
        swing: float = 0.5,
        swing_unit: float = 1.0,
        jitter_s: float = 0.004,
    ) -> None:
        self.rng, self.n = rng, n
        self.beat_s = 60.0 / bpm
        self.swing, self.swing_unit, self.jitter_s = swing, swing_unit, jitter_s
        self.key = int(rng.integers(12))
        self.progression = list(progression)
        self.beats_per_chord = beats_per_chord
        self.first_chord = int(rng.integers(len(self.progression)))
        self.start_beat = rng.uniform(0.0, 4.0)
        self.n_bars = int(np.ceil((n / SAMPLE_RATE / self.beat_s + self.start_beat) / 4)) + 1
        self.mix = np.zeros(n)

    def grid(
        self, pattern: Sequence[float], prob: float = 1.0, every: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Onset times (s) and beats of a one-bar pattern (positions in beats) over the clip.

        `prob` keeps each hit with that chance (ghost notes, fills); `every` plays the
        pattern only in every n-th bar.
        """
        pattern = np.asarray(pattern, dtype=float)
        bars = np.repeat(np.arange(self.n_bars), len(pattern))
        beats = np.tile(pattern, self.n_bars) + 4.0 * bars
        keep = (self.rng.random(len(beats)) < prob) & (bars % every == 0)
        swung = _swing(beats, self.swing, self.swing_unit)
        times = (swung - self.start_beat) * self.beat_s
        times = times + self.rng.normal(0.0, self.jitter_s, len(times))
        # Notes struck up to two bars before the excerpt may still be ringing in it.
        keep &= (times > -8 * self.beat_s - 0.5) & (times < self.n / SAMPLE_RATE)
        return times[keep], beats[keep]

    def chord(self, beats: np.ndarray) -> list[tuple[int, str]]:
        steps = np.floor(np.asarray(beats) / self.beats_per_chord).astype(int) + self.first_chord
        return [self.progression[s % len(self.progression)] for s in steps]

    def roots(self, beats: np.ndarray, low: int) -> np.ndarray:
        """The chord root at each beat, in the octave starting at MIDI note `low`."""
        return np.array([low + (self.key + o - low) % 12 for o, _ in self.chord(beats)], dtype=int)

    def chord_tones(self, beats: np.ndarray, low: int, voices: int) -> np.ndarray:
        """(voices, len(beats)) MIDI notes: the chord at each beat, stacked upward from `low`."""
        out = np.zeros((voices, len(beats)), dtype=int)
        for j, (offset, quality) in enumerate(self.chord(beats)):
            tones = _CHORDS[quality]
            root = low + (self.key + offset - low) % 12
            for v in range(voices):
                out[v, j] = root + tones[v % len(tones)] + 12 * (v // len(tones))
        return out

    def melody(self, beats: np.ndarray, scale: str, low: int, high: int, step: float = 1.6):
        """One pitch per beat: a random walk over the scale, reflected at `low` and `high`."""
        degrees = np.array(_SCALES[scale])
        pitches = np.array(
            [p for p in range(low, high + 1) if (p - self.key) % 12 in set(degrees.tolist())]
        )
        moves = np.round(self.rng.normal(0.0, step, len(beats))).astype(int)
        walk = np.cumsum(moves) + self.rng.integers(len(pitches))
        # Reflect at the ends so the line stays in its register.
        period = 2 * (len(pitches) - 1)
        walk = walk % period
        return pitches[np.where(walk >= len(pitches), period - walk, walk)]

    def drum(self, times: np.ndarray, sample: np.ndarray, vel: float = 1.0, spread: float = 0.1):
        """The drum sample struck at `times` with velocities around `vel`."""
        out = np.zeros(self.n, dtype=np.float32)
        sample = sample.astype(np.float32)
        at = np.round(times * SAMPLE_RATE).astype(np.int64)
        velocity = np.clip(self.rng.normal(vel, spread * vel, len(times)), 0.05, None)
        for start, strength in zip(at.tolist(), velocity.tolist(), strict=True):
            lo, hi = max(start, 0), min(start + len(sample), self.n)
            if lo < hi:
                out[lo:hi] += np.float32(strength) * sample[lo - start : hi - start]
        return out

    def notes(self, times, durs, midis, vels, tone: _Tone, bends=None) -> np.ndarray:
        return _notes(self.n, times, durs, midis, vels, tone, bends, self.rng)

    def comp(self, times, beats, tone: _Tone, low, voices, dur, vel=1.0, strum=0.0) -> np.ndarray:
        """Chords struck at `times`: one line per chord tone, `strum` seconds apart."""
        tones = self.chord_tones(beats, low, voices)
        return sum(self.notes(times + v * strum, dur, tones[v], vel, tone) for v in range(voices))

    def add(self, part: np.ndarray, level_db: float) -> None:
        self.mix += _norm(part) * 10 ** (level_db / 20)

    def pump(self, depth: float) -> np.ndarray:
        """Side-chain ducking on every beat (the dance-floor breathing of disco and pop)."""
        beats = (np.arange(self.n) / SAMPLE_RATE / self.beat_s + self.start_beat) % 1.0
        return 1 - depth * np.exp(-beats * self.beat_s * 12.0)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


# --- the ten genres ------------------------------------------------------------------------
def _rock_drums(s: _Song, rng: np.random.Generator, level: float, hats: str = "closed") -> None:
    s.add(
        s.drum(s.grid([0, 2])[0], _kick(rng)) + s.drum(s.grid([2.5], 0.4)[0], _kick(rng), 0.7),
        level,
    )
    s.add(s.drum(s.grid([1, 3])[0], _snare(rng)), level - 2)
    hat = _hat(rng, 45) if hats == "closed" else _cymbal(rng, _uniform(rng, 2, 4), 0.6)
    s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], hat, 0.8, 0.2), level - _uniform(rng, 6, 10))


def _blues(rng: np.random.Generator, n: int) -> np.ndarray:
    twelve_bar = [(0, "dom7")] * 4 + [(5, "dom7")] * 2 + [(0, "dom7")] * 2
    twelve_bar += [(7, "dom7"), (5, "dom7"), (0, "dom7"), (7, "dom7")]
    s = _Song(
        rng, n, _uniform(rng, 60, 115), twelve_bar, swing=_uniform(rng, 0.6, 0.68), jitter_s=0.008
    )
    if rng.random() < 0.85:
        s.add(s.drum(s.grid([0, 2])[0], _kick(rng)), -10)
        s.add(s.drum(s.grid([1, 3])[0], _snare(rng) if rng.random() < 0.7 else _brush(rng)), -12)
        ride = _cymbal(rng, _uniform(rng, 3, 6), 0.5) if rng.random() < 0.5 else _hat(rng, 40)
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], ride, 0.8, 0.25), -19)
    # The shuffle bass: root, root, fifth, fifth, sixth, sixth, flat seventh, sixth.
    t, b = s.grid(np.arange(0, 4, 0.5))
    walk = np.array([0, 0, 7, 7, 9, 9, 10, 9])[np.round((b % 4) * 2).astype(int)]
    bass = _pluck(_uniform(rng, 1.4, 2.2), _uniform(rng, 2, 4), 3.0, 8)
    s.add(s.notes(t, 0.8 * s.beat_s / 2, s.roots(b, 28) + walk, 1.0, bass), -8)
    # The shuffle guitar rocks between fifth and sixth over the root.
    guitar = _pluck(_uniform(rng, 0.8, 1.3), _uniform(rng, 2, 5), 2.0, 14)
    low = s.roots(b, 40)
    upper = low + np.where(np.round(b * 2).astype(int) % 4 >= 2, 9, 7)
    rhythm = s.notes(t, 0.45 * s.beat_s, low, 1.0, guitar)
    rhythm = rhythm + s.notes(t + 0.008, 0.45 * s.beat_s, upper, 0.9, guitar)
    s.add(_drive(rhythm, _uniform(rng, 1.0, 4.0)), -10)
    if rng.random() < 0.75:
        t, b = s.grid(np.arange(0, 4, 0.5), prob=0.55)
        lead = _pluck(_uniform(rng, 0.8, 1.2), _uniform(rng, 1, 3), 1.5, 14)
        pitches = s.melody(b, "blues", 60, 79)
        bends = np.where(rng.random(len(t)) < 0.3, rng.choice([1.0, 2.0], len(t)), 0.0)
        line = s.notes(t, 0.9 * s.beat_s, pitches, rng.uniform(0.6, 1.0, len(t)), lead, bends)
        s.add(_drive(line, _uniform(rng, 1.5, 5.0)), -9)
    if rng.random() < 0.3:
        t, b = s.grid([0, 2])
        organ = _organ([1, 0.8, 0.5, 0.4, 0.2, 0.1], _uniform(rng, 0.8, 6.5), 0.3)
        s.add(s.comp(t, b, organ, 52, 3, 1.8 * s.beat_s), -16)
    return _reverb(rng, s.mix, _uniform(rng, 0.6, 1.5), _uniform(rng, 0.1, 0.3))


def _classical(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "maj"), (5, "maj"), (7, "maj"), (0, "maj")],
            [(0, "maj"), (9, "min"), (2, "min"), (7, "dom7")],
            [
                (0, "maj"),
                (7, "maj"),
                (9, "min"),
                (4, "min"),
                (5, "maj"),
                (0, "maj"),
                (5, "maj"),
                (7, "maj"),
            ],
            [(0, "min"), (5, "min"), (7, "dom7"), (0, "min")],
            [(0, "min"), (8, "maj"), (3, "maj"), (10, "maj")],
        ],
    )
    s = _Song(
        rng,
        n,
        _uniform(rng, 50, 130),
        progression,
        beats_per_chord=_choice(rng, [2.0, 4.0]),
        jitter_s=0.015,
    )
    scale = "minor" if progression[0][1] == "min" else "major"
    strings = _bowed(
        _uniform(rng, 1.0, 1.6), _uniform(rng, 0.08, 0.3), _uniform(rng, 0.002, 0.006), voices=2
    )
    t, b = s.grid([0, 2] if s.beats_per_chord == 2 else [0])
    s.add(s.comp(t, b, strings, _choice(rng, [48, 52, 55]), 4, s.beats_per_chord * s.beat_s), -8)
    cello = _bowed(_uniform(rng, 1.1, 1.5), 0.12, 0.004, voices=1)
    s.add(s.notes(t, s.beats_per_chord * s.beat_s, s.roots(b, 36), 1.0, cello), -11)
    texture = rng.random()
    if texture < 0.45:
        # Arpeggios on a piano-like string (harp or piano).
        step = _choice(rng, [0.5, 0.25])
        t, b = s.grid(np.arange(0, 4, step))
        tones = s.chord_tones(b, _choice(rng, [55, 60]), 4)
        order = (np.round(b / step).astype(int)) % 4
        piano = _pluck(_uniform(rng, 1.2, 1.8), _uniform(rng, 1.0, 2.5), 1.2, 12, 0.12)
        s.add(s.notes(t, 2 * s.beat_s, tones[order, np.arange(len(b))], 0.8, piano), -9)
    elif texture < 0.8:
        t, b = s.grid(np.arange(0, 4, 1.0), prob=0.8)
        violin = _bowed(_uniform(rng, 1.0, 1.4), 0.06, 0.007, voices=1)
        line = s.notes(t, 1.1 * s.beat_s, s.melody(b, scale, 67, 88, 1.3), 0.9, violin)
        s.add(line, -9)
    else:
        t, b = s.grid(np.arange(0, 4, 1.0), prob=0.7)
        flute = _bowed(2.6, 0.05, 0.006, voices=1, n_harm=4)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, scale, 72, 91, 1.2), 0.9, flute), -10)
    # Phrasing: a slow swell over the excerpt.
    swell = 1 + _uniform(rng, 0.2, 0.7) * np.sin(
        _TWO_PI * _uniform(rng, 0.05, 0.2) * np.arange(n) / SAMPLE_RATE + _uniform(rng, 0, 6.3)
    )
    return _reverb(rng, s.mix * swell, _uniform(rng, 1.5, 3.0), _uniform(rng, 0.3, 0.55))


def _country(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "maj"), (5, "maj"), (7, "maj"), (0, "maj")],
            [(0, "maj"), (0, "maj"), (7, "maj"), (0, "maj")],
            [(0, "maj"), (5, "maj"), (0, "maj"), (7, "maj")],
        ],
    )
    s = _Song(rng, n, _uniform(rng, 88, 150), progression, swing=_uniform(rng, 0.5, 0.57))
    s.add(s.drum(s.grid([0, 2])[0], _kick(rng)), -12)
    back = _snare(rng) if rng.random() < 0.5 else (_rim(rng) if rng.random() < 0.5 else _brush(rng))
    s.add(s.drum(s.grid([1, 3])[0], back), -13)
    if rng.random() < 0.3:  # the train beat: soft snare sixteenths
        s.add(s.drum(s.grid(np.arange(0, 4, 0.25))[0], _brush(rng), 0.5, 0.3), -22)
    else:
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], _hat(rng, 50), 0.7, 0.2), -21)
    # Boom-chick: root on one, fifth on three; the guitar strums the off beats.
    t, b = s.grid([0, 2])
    fifths = np.where(np.round(b % 4) == 2, 7, 0)
    bass = _pluck(_uniform(rng, 1.5, 2.2), _uniform(rng, 2, 5), 3.0, 8)
    s.add(s.notes(t, 0.9 * s.beat_s, s.roots(b, 33) + fifths, 1.0, bass), -8)
    acoustic = _pluck(_uniform(rng, 0.6, 1.0), _uniform(rng, 3, 6), 2.5, 16, 0.15)
    t, b = s.grid(_choice(rng, [[1, 3], [0.5, 1, 1.5, 2.5, 3, 3.5], [1, 1.5, 3, 3.5]]))
    s.add(s.comp(t, b, acoustic, 52, 4, 0.5 * s.beat_s, strum=_uniform(rng, 0.008, 0.02)), -10)
    lead_kind = rng.random()
    t, b = s.grid(np.arange(0, 4, 0.5), prob=0.5)
    if lead_kind < 0.45:  # twangy picked lead with bends
        twang = _pluck(_uniform(rng, 0.5, 0.9), _uniform(rng, 2, 4), 1.5, 16, 0.08)
        bends = np.where(rng.random(len(t)) < 0.25, 2.0, 0.0)
        s.add(s.notes(t, s.beat_s, s.melody(b, "major_pent", 62, 81), 0.9, twang, bends), -10)
    elif lead_kind < 0.75:  # fiddle
        fiddle = _bowed(_uniform(rng, 0.9, 1.2), 0.04, 0.008, voices=1)
        s.add(s.notes(t, s.beat_s, s.melody(b, "major_pent", 64, 86), 0.9, fiddle), -11)
    else:  # a singer
        t, b = s.grid([0, 1, 2, 3], prob=0.8)
        singer = _voice(rng.integers(0, 5, len(t)), 0.01, 0.2)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, "major_pent", 52, 67, 1.2), 1.0, singer), -9)
    return _reverb(rng, s.mix, _uniform(rng, 0.6, 1.4), _uniform(rng, 0.1, 0.25))


def _disco(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "min7"), (5, "min7")],
            [(0, "min7"), (10, "maj"), (8, "maj7"), (10, "maj")],
            [(0, "maj7"), (2, "min7")],
        ],
    )
    s = _Song(
        rng,
        n,
        _uniform(rng, 110, 134),
        progression,
        beats_per_chord=_choice(rng, [2, 4]),
        jitter_s=0.002,
    )
    s.add(s.drum(s.grid([0, 1, 2, 3])[0], _kick(rng), 1.0, 0.05), -8)
    s.add(s.drum(s.grid([1, 3])[0], _clap(rng) if rng.random() < 0.5 else _snare(rng)), -12)
    s.add(s.drum(s.grid([0.5, 1.5, 2.5, 3.5])[0], _hat(rng, _uniform(rng, 7, 12))), -15)
    s.add(s.drum(s.grid(np.arange(0, 4, 0.25))[0], _hat(rng, 60), 0.5, 0.3), -24)
    # The octave bass: root low, root high, in eighths.
    t, b = s.grid(np.arange(0, 4, 0.5))
    octave = 12 * (np.round(b * 2).astype(int) % 2)
    bass = (
        _pluck(_uniform(rng, 1.0, 1.6), _uniform(rng, 4, 8), 3.0, 10)
        if rng.random() < 0.6
        else _saw(_uniform(rng, 1.4, 2.0), 0.003, 0.003, 6.0)
    )
    s.add(s.notes(t, 0.4 * s.beat_s, s.roots(b, 33) + octave, 1.0, bass), -7)
    t, b = s.grid([0])
    strings = _bowed(_uniform(rng, 0.9, 1.3), _uniform(rng, 0.05, 0.15), 0.004, voices=3)
    s.add(s.comp(t, b, strings, 60, 4, 4 * s.beat_s) * s.pump(_uniform(rng, 0.0, 0.3)), -12)
    if rng.random() < 0.65:  # the muted "chicken scratch" guitar in sixteenths
        t, b = s.grid(np.arange(0, 4, 0.25), prob=0.7)
        scratch = _pluck(_uniform(rng, 0.6, 0.9), 25.0, 4.0, 16, 0.1)
        s.add(_highpass(s.comp(t, b, scratch, 64, 3, 0.06, strum=0.004), 500.0), -15)
    if rng.random() < 0.4:
        t, b = s.grid([0, 1.5, 2, 3], prob=0.8)
        singer = _voice(rng.integers(0, 5, len(t)), 0.012, 0.15)
        s.add(s.notes(t, 1.2 * s.beat_s, s.melody(b, "dorian", 60, 76), 1.0, singer), -11)
    return _reverb(rng, s.mix, _uniform(rng, 0.5, 1.2), _uniform(rng, 0.05, 0.2))


def _hiphop(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "min7"), (8, "maj7")],
            [(0, "min9"), (5, "min7")],
            [(0, "min7"), (3, "maj7"), (8, "maj7"), (7, "min7")],
        ],
    )
    half_time = rng.random() < 0.4
    bpm = _uniform(rng, 130, 160) if half_time else _uniform(rng, 78, 100)
    s = _Song(
        rng,
        n,
        bpm,
        progression,
        beats_per_chord=_choice(rng, [4, 8]),
        swing=_uniform(rng, 0.5, 0.62),
        swing_unit=0.5,
        jitter_s=0.006,
    )
    if half_time:  # snare on three, kicks around it, hats in eighths with rolls
        kicks, snares = [0, 2.75, 3.5], [2]
        hats = s.grid(np.arange(0, 4, 0.5))[0]
        rolls = s.grid(np.arange(0, 4, 0.125), prob=0.15)[0]
        hat_times = np.concatenate([hats, rolls])
    else:  # boom-bap: kick on one and the and-of-two, snare on two and four
        kicks, snares = [0, 1.75, 2.5], [1, 3]
        hat_times = s.grid(np.arange(0, 4, 0.5), prob=0.9)[0]
    kick_times, kick_beats = s.grid(kicks, prob=0.9)
    s.add(s.drum(kick_times, _kick(rng), 1.0, 0.1), -7)
    s.add(s.drum(s.grid(snares)[0], _snare(rng) if rng.random() < 0.6 else _clap(rng)), -9)
    s.add(s.drum(hat_times, _hat(rng, _uniform(rng, 35, 70)), 0.7, 0.3), -18)
    # The 808 follows the kick with the chord root, long and low.
    sub = _sub(_uniform(rng, 0.3, 1.0), _uniform(rng, 0.8, 2.5), _uniform(rng, 1.0, 3.0))
    s.add(s.notes(kick_times, 1.5 * s.beat_s, s.roots(kick_beats, 24), 1.0, sub), -6)
    # A sampled loop: an electric piano, dulled as if lifted off a record.
    t, b = s.grid([0] if rng.random() < 0.6 else [0, 2.5])
    keys = _fm(1.0, _uniform(rng, 1.0, 3.0), _uniform(rng, 3, 8), _uniform(rng, 0.5, 1.5))
    loop = _lowpass(s.comp(t, b, keys, 55, 4, 2 * s.beat_s), _uniform(rng, 1500, 4000))
    s.add(loop, -13)
    if rng.random() < 0.8:  # a rapper: short syllables on the sixteenth grid, spoken pitch
        t, b = s.grid(np.arange(0, 4, 0.25), prob=_uniform(rng, 0.4, 0.7))
        rapper = _voice(rng.integers(0, 5, len(t)), 0.0, _uniform(rng, 0.4, 0.9))
        pitch = 45 + rng.integers(0, 5, len(t))
        s.add(s.notes(t, 0.12, pitch, rng.uniform(0.6, 1.0, len(t)), rapper), -8)
    # Vinyl: crackle (sparse clicks) and surface noise.
    clicks = (rng.random(n) < _uniform(rng, 10, 60) / SAMPLE_RATE) * rng.standard_normal(n)
    s.add(_highpass(clicks, 1000.0), -30)
    return s.mix


def _jazz(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(2, "min7"), (7, "dom9"), (0, "maj7"), (0, "maj7")],
            [(0, "maj7"), (9, "dom7"), (2, "min7"), (7, "dom7")],
            [(2, "min9"), (7, "dom9"), (0, "maj9"), (9, "dom7")],
        ],
    )
    s = _Song(
        rng,
        n,
        _uniform(rng, 95, 220),
        progression,
        beats_per_chord=_choice(rng, [2, 4]),
        swing=_uniform(rng, 0.6, 0.7),
        jitter_s=0.01,
    )
    if rng.random() < 0.7:  # the ride: ding, ding-da, ding, ding-da
        ride = _cymbal(rng, _uniform(rng, 1.5, 3.0), _uniform(rng, 0.8, 1.5))
        s.add(s.drum(s.grid([0, 1, 1.5, 2, 3, 3.5])[0], ride, 0.8, 0.2), -16)
    else:  # brushes
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], _brush(rng), 0.7, 0.3), -14)
    s.add(s.drum(s.grid([1, 3])[0], _hat(rng, 30), 0.6), -20)
    s.add(s.drum(s.grid([0, 1, 2, 3])[0], _kick(rng), 0.3, 0.3), -24)  # feathered
    s.add(s.drum(s.grid(np.arange(0, 4, 0.5), prob=0.15)[0], _snare(rng), 0.4, 0.4), -22)
    # Walking bass: a chord tone on every beat, passing tones between.
    t, b = s.grid([0, 1, 2, 3])
    tones = s.chord_tones(b, 31, 4)
    choice = rng.integers(0, 4, len(b))
    choice[np.round(b % s.beats_per_chord) == 0] = 0  # the root when the chord changes
    walk = tones[choice, np.arange(len(b))] + rng.choice([0, 0, 0, 2, -1], len(b))
    upright = _pluck(_uniform(rng, 1.8, 2.6), _uniform(rng, 2, 4), 4.0, 8, 0.3)
    s.add(s.notes(t, 0.95 * s.beat_s, walk, rng.uniform(0.7, 1.0, len(t)), upright), -8)
    # Piano comping on syncopated hits (the Charleston and its cousins).
    t, b = s.grid(_choice(rng, [[0, 1.5], [1.5, 3.5], [0.5, 2, 3.5]]), prob=0.8)
    piano = (
        _pluck(_uniform(rng, 1.3, 1.9), _uniform(rng, 1.5, 3.0), 1.5, 12, 0.12)
        if rng.random() < 0.6
        else _fm(1.0, _uniform(rng, 1.5, 3.5), 6.0, 1.5)
    )
    s.add(s.comp(t, b, piano, _choice(rng, [50, 53]), 4, 0.7 * s.beat_s, strum=0.004), -12)
    if rng.random() < 0.55:  # a horn: a reedy voice with a little breath
        t, b = s.grid(np.arange(0, 4, 0.5), prob=0.6)
        horn = _bowed(_uniform(rng, 0.7, 1.0), 0.03, 0.005, voices=1, n_harm=16)
        line = s.notes(t, 0.45 * s.beat_s, s.melody(b, "dorian", 58, 79), 0.9, horn)
        s.add(_bandpass(line, 300.0, 4000.0), -10)
    return _reverb(rng, s.mix, _uniform(rng, 0.8, 1.8), _uniform(rng, 0.15, 0.35))


def _metal(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "pow"), (1, "pow")],
            [(0, "pow"), (8, "pow"), (10, "pow"), (0, "pow")],
            [(0, "pow"), (0, "pow"), (6, "pow"), (5, "pow")],
        ],
    )
    s = _Song(
        rng,
        n,
        _uniform(rng, 95, 210),
        progression,
        beats_per_chord=_choice(rng, [2, 4]),
        jitter_s=0.002,
    )
    fast = s.beat_s < 60 / 160
    style = rng.random()
    if style < 0.55:  # double kick
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5 if fast else 0.25))[0], _kick(rng), 1, 0.05), -8)
        s.add(s.drum(s.grid([1, 3])[0], _snare(rng)), -9)
    elif style < 0.7:  # blast beat
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], _kick(rng), 1, 0.05), -8)
        s.add(s.drum(s.grid(np.arange(0.25, 4, 0.5))[0], _snare(rng)), -10)
    else:
        s.add(s.drum(s.grid([0, 0.5, 2, 2.5, 2.75])[0], _kick(rng), 1, 0.05), -8)
        s.add(s.drum(s.grid([1, 3])[0], _snare(rng)), -9)
    crash = _cymbal(rng, _uniform(rng, 1.0, 2.0), 0.3)
    s.add(s.drum(s.grid([0, 1, 2, 3] if rng.random() < 0.5 else [0])[0], crash), -15)
    # Palm-muted chugs on the low root and open power chords, through a high-gain amp.
    t, b = s.grid(np.arange(0, 4, 0.25 if not fast else 0.5), prob=_uniform(rng, 0.6, 0.95))
    low = _choice(rng, [26, 28, 30])
    guitar = _pluck(_uniform(rng, 0.7, 1.1), _uniform(rng, 1, 3), 1.0, 16, 0.1)
    muted = rng.random(len(t)) < 0.7
    chords = s.comp(t, b, guitar, low + 12, 3, np.where(muted, 0.07, 0.5 * s.beat_s))
    gain = _uniform(rng, 6.0, 25.0)
    amp = _lowpass(_highpass(_drive(chords, gain), 90.0), _uniform(rng, 3500, 6500), order=4)
    s.add(amp, -5)
    bass = _pluck(1.2, 3.0, 2.0, 10)
    s.add(_drive(s.notes(t, 0.2, s.roots(b, low), 1.0, bass), 3.0), -11)
    if rng.random() < 0.3:  # a shred lead
        t, b = s.grid(np.arange(0, 4, 0.25), prob=0.8)
        lead = _pluck(0.9, 2.0, 1.0, 14)
        line = s.notes(
            t, 0.25 * s.beat_s, s.melody(b, _choice(rng, ["minor", "phrygian"]), 64, 88), 1.0, lead
        )
        s.add(_lowpass(_drive(line, gain), 6000.0), -10)
    return _reverb(rng, s.mix, _uniform(rng, 0.4, 1.0), _uniform(rng, 0.05, 0.2))


def _pop(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "maj"), (7, "maj"), (9, "min"), (5, "maj")],
            [(9, "min"), (5, "maj"), (0, "maj"), (7, "maj")],
            [(0, "maj"), (5, "maj"), (9, "min"), (7, "maj")],
        ],
    )
    s = _Song(rng, n, _uniform(rng, 90, 130), progression, jitter_s=0.002)
    kicks = [0, 1, 2, 3] if rng.random() < 0.35 else _choice(rng, [[0, 2], [0, 1.5, 2], [0, 2.5]])
    s.add(s.drum(s.grid(kicks)[0], _kick(rng), 1.0, 0.05), -8)
    s.add(s.drum(s.grid([1, 3])[0], _clap(rng) if rng.random() < 0.6 else _snare(rng)), -11)
    step = _choice(rng, [0.5, 0.25])
    s.add(s.drum(s.grid(np.arange(0, 4, step))[0], _hat(rng, _uniform(rng, 30, 60)), 0.7), -19)
    bass = _saw(_uniform(rng, 1.3, 2.0), 0.002, 0.003, 3.0)
    t, b = s.grid(np.arange(0, 4, 0.5) if rng.random() < 0.5 else [0, 2])
    s.add(_lowpass(s.notes(t, 0.45 * s.beat_s, s.roots(b, 33), 1.0, bass), 900.0), -8)
    pad = _saw(_uniform(rng, 1.2, 1.8), _uniform(rng, 0.003, 0.008), _uniform(rng, 0.02, 0.2), 0.3)
    t, b = s.grid([0])
    pads = _lowpass(s.comp(t, b, pad, 55, 3, 4 * s.beat_s), _uniform(rng, 2500, 6000))
    s.add(pads * s.pump(_uniform(rng, 0.0, 0.5)), -12)
    if rng.random() < 0.65:  # a sung hook
        t, b = s.grid(_choice(rng, [[0, 1, 2, 3], [0, 0.5, 1.5, 2, 3]]), prob=0.8)
        singer = _voice(rng.integers(0, 5, len(t)), _uniform(rng, 0.008, 0.02), 0.15)
        hook = s.notes(t, 0.9 * s.beat_s, s.melody(b, "major_pent", 60, 76, 1.2), 1.0, singer)
        s.add(hook, -7)
    else:  # a plucked synth arpeggio
        t, b = s.grid(np.arange(0, 4, 0.25))
        tones = s.chord_tones(b, 67, 3)
        arp = tones[np.round(b * 4).astype(int) % 3, np.arange(len(b))]
        s.add(s.notes(t, 0.2 * s.beat_s, arp, 0.8, _saw(1.0, 0.004, 0.002, 8.0, 12)), -12)
    mix = np.tanh(_uniform(rng, 1.0, 2.5) * _norm(s.mix))  # radio-loud bus compression
    return _reverb(rng, mix, _uniform(rng, 0.5, 1.2), _uniform(rng, 0.05, 0.2))


def _reggae(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "maj"), (5, "maj")],
            [(0, "min"), (5, "min")],
            [(0, "maj"), (7, "maj"), (9, "min"), (5, "maj")],
        ],
    )
    s = _Song(
        rng,
        n,
        _uniform(rng, 62, 95),
        progression,
        beats_per_chord=_choice(rng, [4, 8]),
        swing=_uniform(rng, 0.5, 0.62),
        jitter_s=0.006,
    )
    if rng.random() < 0.7:  # one drop: kick and rim together on three, nothing on one
        s.add(s.drum(s.grid([2])[0], _kick(rng)), -8)
        snare = s.drum(s.grid([2])[0], _rim(rng))
    else:  # steppers
        s.add(s.drum(s.grid([0, 1, 2, 3])[0], _kick(rng)), -9)
        snare = s.drum(s.grid([1, 3])[0], _rim(rng) if rng.random() < 0.5 else _snare(rng))
    if rng.random() < 0.4:  # dub echo on the snare
        snare = _echo(snare, 0.75 * s.beat_s, _uniform(rng, 0.3, 0.6))
    s.add(snare, -12)
    s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], _hat(rng, _uniform(rng, 30, 60)), 0.6), -20)
    # Deep, round bass with space in it.
    t, b = s.grid([0, 0.75, 1.5, 2.5, 3, 3.5], prob=_uniform(rng, 0.5, 0.85))
    riff = s.roots(b, 28) + rng.choice([0, 0, 7, 12, 10, 5], len(b))
    bass = _pluck(_uniform(rng, 2.2, 3.2), _uniform(rng, 0.8, 2.0), 2.0, 6, 0.45)
    s.add(s.notes(t, 0.7 * s.beat_s, riff, 1.0, bass), -5)
    # The skank: short chords on every off-beat, guitar and often an organ bubble.
    t, b = s.grid([0.5, 1.5, 2.5, 3.5])
    guitar = _pluck(_uniform(rng, 0.6, 1.0), 12.0, 3.0, 16, 0.12)
    s.add(_highpass(s.comp(t, b, guitar, 60, 3, 0.08, strum=0.003), 400.0), -11)
    if rng.random() < 0.6:
        t, b = s.grid([0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75], prob=0.8)
        organ = _organ([0.8, 1, 0.5, 0.6, 0.1, 0.2], _uniform(rng, 0.8, 6.5), 0.2)
        s.add(s.comp(t, b, organ, 55, 3, 0.1), -15)
    if rng.random() < 0.4:
        t, b = s.grid([0, 1, 2, 3], prob=0.7)
        singer = _voice(rng.integers(0, 5, len(t)), 0.012, 0.2)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, "major_pent", 55, 70, 1.1), 1.0, singer), -9)
    return _reverb(rng, s.mix, _uniform(rng, 0.5, 1.2), _uniform(rng, 0.1, 0.3))


def _rock(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = _choice(
        rng,
        [
            [(0, "pow"), (10, "pow"), (5, "pow"), (0, "pow")],
            [(0, "pow"), (5, "pow"), (7, "pow"), (5, "pow")],
            [(0, "maj"), (7, "maj"), (9, "min"), (5, "maj")],
            [(9, "pow"), (5, "pow"), (0, "pow"), (7, "pow")],
        ],
    )
    shuffle = rng.random() < 0.2
    s = _Song(
        rng,
        n,
        _uniform(rng, 95, 165),
        progression,
        swing=_uniform(rng, 0.58, 0.66) if shuffle else 0.5,
        jitter_s=0.005,
    )
    _rock_drums(s, rng, -8, "closed" if rng.random() < 0.7 else "ride")
    if rng.random() < 0.5:
        s.add(s.drum(s.grid([0], every=2)[0], _cymbal(rng, _uniform(rng, 1.0, 2.0), 0.3)), -14)
    t, b = s.grid(np.arange(0, 4, 0.5))
    guitar = _pluck(_uniform(rng, 0.8, 1.2), _uniform(rng, 1, 3), 1.5, 16, 0.12)
    chords = s.comp(t, b, guitar, _choice(rng, [40, 43, 45]), 3, 0.45 * s.beat_s, strum=0.006)
    gain = _uniform(rng, 2.0, 10.0)
    s.add(_lowpass(_highpass(_drive(chords, gain), 80.0), _uniform(rng, 3500, 7500), order=4), -7)
    bass = _pluck(_uniform(rng, 1.3, 2.0), 3.0, 2.5, 10)
    s.add(s.notes(t, 0.45 * s.beat_s, s.roots(b, 28), 1.0, bass), -9)
    lead = rng.random()
    if lead < 0.4:
        t, b = s.grid([0, 1, 2, 2.5, 3], prob=0.75)
        singer = _voice(rng.integers(0, 5, len(t)), 0.01, 0.25)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, "minor_pent", 52, 69), 1.0, singer), -8)
    elif lead < 0.7:
        t, b = s.grid(np.arange(0, 4, 0.5), prob=0.6)
        solo = _pluck(0.9, 2.0, 1.2, 14)
        bends = np.where(rng.random(len(t)) < 0.2, 2.0, 0.0)
        line = s.notes(t, s.beat_s, s.melody(b, "minor_pent", 62, 84), 0.9, solo, bends)
        s.add(_lowpass(_drive(line, gain), 6500.0), -9)
    return _reverb(rng, s.mix, _uniform(rng, 0.5, 1.3), _uniform(rng, 0.08, 0.25))


_RECIPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "blues": _blues,
    "classical": _classical,
    "country": _country,
    "disco": _disco,
    "hiphop": _hiphop,
    "jazz": _jazz,
    "metal": _metal,
    "pop": _pop,
    "reggae": _reggae,
    "rock": _rock,
}
