"""The synthesiser's instruments: wavetable tones played as monophonic lines of notes
(`Tone`, `note_line`), and drum samples struck at every hit."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from genreflow.data.synth.dsp import (
    SAMPLE_RATE,
    TWO_PI,
    bandpass,
    highpass,
    midi_hz,
    norm,
    phase_of,
    time_axis,
)

# An instrument is a set of harmonic weights. Each note gets one wavetable (one period,
# band-limited to its own pitch so that nothing aliases) and is read out by phase, which
# costs the same whatever the number of harmonics. A plucked or struck sound starts from
# `bright` weights and settles to `dull` ones, the way high partials die first.
_TABLE_SIZE = 2048  # a power of two: the phase wraps with a bit mask


@functools.lru_cache(maxsize=4)
def _sines(n_harm: int) -> np.ndarray:
    k = np.arange(1, n_harm + 1)[:, None]
    return np.sin(TWO_PI * k * np.arange(_TABLE_SIZE)[None, :] / _TABLE_SIZE).astype(np.float32)


WeightsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tone:
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


def pluck(brightness: float, decay: float, damping: float, n_harm: int = 12, where=0.2):
    """A plucked string: `where` along the string it is plucked; high partials die first."""
    k = np.arange(1, n_harm + 1)
    bright = k**-brightness * np.abs(np.sin(np.pi * k * where)) / np.sin(np.pi * where)
    return Tone(bright, bright * np.exp(-1.2 * (k - 1)), settle=damping, decay=decay, release=0.06)


def drawbar_organ(levels: Sequence[float], leslie_hz: float, leslie_depth: float) -> Tone:
    """A drawbar organ: steady partials, the rotating speaker's tremolo."""
    return Tone(
        np.asarray(levels, float),
        attack=0.005,
        release=0.04,
        tremolo_hz=leslie_hz,
        tremolo_depth=leslie_depth,
    )


def bowed(brightness: float, attack: float, vibrato: float, voices: int = 2, n_harm: int = 14):
    """Bowed strings: sawtooth-like partials, a slow attack, delayed vibrato, an ensemble."""
    weights = np.arange(1, n_harm + 1) ** -brightness
    return Tone(
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


def fm(ratio: int, index: float, index_decay: float, decay: float) -> Tone:
    """Two-operator FM (the electric piano): the index, and the brightness, fall away."""
    theta = TWO_PI * np.arange(256) / 256
    bright = _spectrum(np.sin(theta + index * np.sin(ratio * theta)), 24)
    dull = _spectrum(np.sin(theta + 0.1 * index * np.sin(ratio * theta)), 24)
    return Tone(bright, dull, settle=index_decay, decay=decay, release=0.15)


def saw(brightness: float, detune: float, attack: float, decay: float, n_harm: int = 16):
    """A synthesiser: two detuned saws (pads, leads, synth bass)."""
    weights = np.arange(1, n_harm + 1) ** -brightness
    return Tone(weights, attack=attack, decay=decay, release=0.12, detune=2 * detune)


def sub_bass(drop: float, decay: float, grit: float) -> Tone:
    """The 808: a sine, saturated by `grit`, falling into its pitch, long."""
    theta = TWO_PI * np.arange(256) / 256
    weights = _spectrum(np.tanh(grit * np.sin(theta)) / np.tanh(grit), 8)
    return Tone(weights, attack=0.004, decay=decay, release=0.1, drop=drop)


# Formants (F1, F2, F3, Hz) of a, e, i, o, u: averages for adult male speakers
# (Peterson & Barney 1952).
_VOWELS = np.array(
    [[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]],
    dtype=float,
)
_FORMANT_GAINS = np.array([1.0, 0.6, 0.3])
_FORMANT_WIDTHS = np.array([90.0, 120.0, 160.0])


def voice(vowels: np.ndarray, vibrato: float, breath: float) -> Tone:
    """A voice: harmonics of the pitch shaped by each note's vowel, vibrato and breath."""

    def shaped(hz: np.ndarray, ids: np.ndarray) -> np.ndarray:
        formants = _VOWELS[vowels[ids % len(vowels)]]  # (notes, 3)
        harmonics = hz[:, None, None] * np.arange(1, 33)[None, :, None]  # (notes, K, 1)
        distance = (harmonics - formants[:, None, :]) / _FORMANT_WIDTHS
        return (_FORMANT_GAINS / (1 + distance**2)).sum(axis=2)

    return Tone(shaped, attack=0.02, decay=0.5, release=0.08, vibrato=vibrato, breath=breath)


_BLOCK = 8192  # samples per step: temporaries stay small (cached, never fresh pages)


def note_line(
    n: int,
    starts: np.ndarray,
    durs: np.ndarray | float,
    midis: np.ndarray,
    vels: np.ndarray | float,
    tone: Tone,
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

    hz = midi_hz(per_note(midis, float))
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
        noise = norm(bandpass(rng.standard_normal(n - first), 2500.0, 7000.0))
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
            f = f * (1 + depth * np.sin(np.float32(TWO_PI * 5.5) * tau))
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
            wobble = np.sin(np.float32(TWO_PI * tone.tremolo_hz) * tau)
            env *= 1 - np.float32(tone.tremolo_depth) * (0.5 + 0.5 * wobble)
        env *= np.minimum((until_s[s] - t) * np.float32(200.0), 1)
        env *= gain[s]
        out[lo:hi] = wave * env
    return out


def kick_drum(rng: np.random.Generator) -> np.ndarray:
    tau = time_axis(0.5)
    low, high = rng.uniform(42, 60), rng.uniform(80, 160)
    f = low + (high - low) * np.exp(-tau * rng.uniform(20, 45))
    body = np.sin(phase_of(f)) * np.exp(-tau * rng.uniform(5, 12))
    click = highpass(rng.standard_normal(len(tau)), 2000.0) * np.exp(-tau * 300.0)
    return body + rng.uniform(0.05, 0.4) * click


def snare_drum(rng: np.random.Generator) -> np.ndarray:
    tau = time_axis(0.4)
    tone = np.sin(TWO_PI * rng.uniform(160, 240) * tau) * np.exp(-tau * 30.0)
    rattle = bandpass(rng.standard_normal(len(tau)), 1000.0, rng.uniform(6000, 9500))
    return 0.5 * tone + rattle * np.exp(-tau * rng.uniform(12, 25))


def hi_hat(rng: np.random.Generator, decay: float) -> np.ndarray:
    tau = time_axis(min(0.8, 6.0 / decay))
    metal = highpass(rng.standard_normal(len(tau)), rng.uniform(6000, 8000), order=4)
    return metal * np.exp(-tau * decay)


def cymbal(rng: np.random.Generator, decay: float, ping: float) -> np.ndarray:
    """Ride or crash: inharmonic partials (the bell) over high noise (the wash)."""
    tau = time_axis(min(3.0, 5.0 / decay))
    partials = rng.uniform(2500, 9000, 6).astype(np.float32)
    bell = np.sin(np.float32(TWO_PI) * partials[:, None] * tau[None, :]).sum(axis=0) / 6
    wash = highpass(rng.standard_normal(len(tau)), 3500.0, order=2)
    return (ping * bell + wash) * np.exp(-tau * decay)


def rim_shot(rng: np.random.Generator) -> np.ndarray:
    tau = time_axis(0.12)
    click = bandpass(rng.standard_normal(len(tau)), 1500.0, 4000.0) * np.exp(-tau * 120.0)
    return click + np.sin(TWO_PI * rng.uniform(400, 600) * tau) * np.exp(-tau * 60.0)


def hand_clap(rng: np.random.Generator) -> np.ndarray:
    tau = time_axis(0.3)
    burst = bandpass(rng.standard_normal(len(tau)), 900.0, 3000.0)
    flutter = sum(np.exp(-np.maximum(tau - d, 0) * 150.0) * (tau >= d) for d in (0, 0.011, 0.022))
    return burst * (flutter + 0.5 * np.exp(-tau * 18.0) * (tau >= 0.03))


def brush(rng: np.random.Generator) -> np.ndarray:
    tau = time_axis(0.35)
    swish = bandpass(rng.standard_normal(len(tau)), 2000.0, 8000.0)
    return swish * -np.expm1(-tau / 0.02) * np.exp(-tau * 9.0)
