"""The song grid of a clip: tempo, swing, key, chord progression, and its parts mixed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genreflow.data.synth.dsp import SAMPLE_RATE, norm, swing_time
from genreflow.data.synth.instruments import Tone, note_line

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


class Song:
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
        swung = swing_time(beats, self.swing, self.swing_unit)
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

    def notes(self, times, durs, midis, vels, tone: Tone, bends=None) -> np.ndarray:
        return note_line(self.n, times, durs, midis, vels, tone, bends, self.rng)

    def comp(self, times, beats, tone: Tone, low, voices, dur, vel=1.0, strum=0.0) -> np.ndarray:
        """Chords struck at `times`: one line per chord tone, `strum` seconds apart."""
        tones = self.chord_tones(beats, low, voices)
        return sum(self.notes(times + v * strum, dur, tones[v], vel, tone) for v in range(voices))

    def add(self, part: np.ndarray, level_db: float) -> None:
        self.mix += norm(part) * 10 ** (level_db / 20)

    def pump(self, depth: float) -> np.ndarray:
        """Side-chain ducking on every beat (the dance-floor breathing of disco and pop)."""
        beats = (np.arange(self.n) / SAMPLE_RATE / self.beat_s + self.start_beat) % 1.0
        return 1 - depth * np.exp(-beats * self.beat_s * 12.0)


def uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def pick_one(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]
