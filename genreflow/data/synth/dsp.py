"""Signal helpers of the synthesiser: levels, filters, saturation, rooms, time and pitch."""

from __future__ import annotations

import functools

import numpy as np
from scipy import signal

SAMPLE_RATE = 22050  # GTZAN's
TWO_PI = 2.0 * np.pi


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def norm(x: np.ndarray) -> np.ndarray:
    """Scale a part to RMS 1 so that the mix levels (dB) mean what they say."""
    level = rms(x)
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


def lowpass(x: np.ndarray, hz: float, order: int = 2) -> np.ndarray:
    return _filter(x, "lowpass", (hz,), order)


def highpass(x: np.ndarray, hz: float, order: int = 2) -> np.ndarray:
    return _filter(x, "highpass", (hz,), order)


def bandpass(x: np.ndarray, lo: float, hi: float, order: int = 2) -> np.ndarray:
    return _filter(x, "bandpass", (lo, hi), order)


def drive(x: np.ndarray, gain: float) -> np.ndarray:
    """Soft clipping: the overdriven amp of blues and rock, the saturated wall of metal."""
    x = norm(x)
    return np.tanh(gain * x) / np.tanh(gain)


def reverb(rng: np.random.Generator, x: np.ndarray, seconds: float, wet: float) -> np.ndarray:
    """A room as decaying noise: enough to smear onsets the way a hall does."""
    # Cut where the tail has fallen by 40 dB: the rest is below the mix.
    tau = time_axis(0.6 * seconds)
    response = lowpass(rng.standard_normal(len(tau)), 5000.0) * np.exp(-6.9 * tau / seconds)
    tail = signal.fftconvolve(x.astype(np.float32), response.astype(np.float32))[: len(x)]
    return (1 - wet) * x + wet * norm(tail) * rms(x)


def echo(x: np.ndarray, delay_s: float, feedback: float, taps: int = 4) -> np.ndarray:
    """Dub delay: repeats of the part, each `feedback` softer."""
    out = x.copy()
    shift = int(delay_s * SAMPLE_RATE)
    for tap in range(1, taps + 1):
        if tap * shift >= len(x):
            break
        out[tap * shift :] += feedback**tap * x[: len(x) - tap * shift]
    return out


def swing_time(beats: np.ndarray, ratio: float, unit: float) -> np.ndarray:
    """Delay the off-beat of every `unit` (in beats) to `ratio` of it: 0.5 straight, 2/3 triplet."""
    position = beats / unit
    whole = np.floor(position)
    frac = position - whole
    warped = np.where(frac < 0.5, frac * 2 * ratio, ratio + (frac - 0.5) * 2 * (1 - ratio))
    return (whole + warped) * unit


def midi_hz(midi: np.ndarray) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=float) - 69.0) / 12.0)


def phase_of(f: np.ndarray) -> np.ndarray:
    return TWO_PI * np.cumsum(f) / SAMPLE_RATE


def time_axis(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * SAMPLE_RATE), dtype=np.float32) / np.float32(SAMPLE_RATE)
