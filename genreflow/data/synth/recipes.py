"""The ten genres' recipes, and one clip made from its genre's recipe (`synthesize_clip`).

The genres differ in tempo and rhythm pattern, instrument timbre, harmony and register,
noise and distortion; every clip draws its own tempo, key, instrument mix and levels, and
neighbouring genres share parts of their recipes (rock sits between blues and metal, pop
and disco share four-on-the-floor and synth pads). Every clip is normalised to a loudness
drawn from one range shared by all genres, so loudness alone says nothing about the genre.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from genreflow.data.genres import GENRE_INDEX, GENRES
from genreflow.data.synth.dsp import (
    SAMPLE_RATE,
    TWO_PI,
    bandpass,
    drive,
    echo,
    highpass,
    lowpass,
    norm,
    reverb,
    rms,
)
from genreflow.data.synth.instruments import (
    bowed,
    brush,
    cymbal,
    drawbar_organ,
    fm,
    hand_clap,
    hi_hat,
    kick_drum,
    pluck,
    rim_shot,
    saw,
    snare_drum,
    sub_bass,
    voice,
)
from genreflow.data.synth.song import Song, pick_one, uniform
from genreflow.errors import GenreflowError

# Loudness of every clip, whatever its genre: RMS drawn uniformly in this range (dBFS).
LOUDNESS_RANGE_DB = (-26.0, -16.0)


def synthesize_clip(genre: str, number: int, seconds: float = 5.0, seed: int = 0) -> np.ndarray:
    """Clip `number` of `genre`: float32 mono at 22050 Hz, in [-1, 1].

    The same (genre, number, seconds, seed) always gives the same samples; its random
    stream is its own, so other clips never change it.
    """
    if genre not in GENRE_INDEX:
        raise GenreflowError(f"synth: '{genre}' is not a GTZAN genre ({', '.join(GENRES)})")
    rng = np.random.default_rng([seed, GENRE_INDEX[genre], number])
    n = max(1, int(round(seconds * SAMPLE_RATE)))
    mix = RECIPES[genre](rng, n)
    return _master(rng, mix)


def _master(rng: np.random.Generator, mix: np.ndarray) -> np.ndarray:
    """Recording bandwidth, hiss, then one loudness range for all genres and a soft limiter."""
    mix = lowpass(mix, rng.uniform(7000.0, 10500.0), order=2)
    hiss = highpass(rng.standard_normal(len(mix)), 1500.0)
    mix = mix + hiss * rms(mix) * 10 ** (rng.uniform(-60.0, -40.0) / 20)
    target = 10 ** (rng.uniform(*LOUDNESS_RANGE_DB) / 20)
    mix = mix * (target / max(rms(mix), 1e-9))
    # A limiter, not a clip: a soft knee from -7 dBFS that never passes -1 dBFS.
    ceiling = 10 ** (-1.0 / 20)
    loud = np.abs(mix) > 0.5 * ceiling
    mix[loud] = np.sign(mix[loud]) * (
        0.5 * ceiling
        + 0.5 * ceiling * np.tanh((np.abs(mix[loud]) - 0.5 * ceiling) / (0.5 * ceiling))
    )
    return mix.astype(np.float32)


def _rock_drums(s: Song, rng: np.random.Generator, level: float, hats: str = "closed") -> None:
    s.add(
        s.drum(s.grid([0, 2])[0], kick_drum(rng))
        + s.drum(s.grid([2.5], 0.4)[0], kick_drum(rng), 0.7),
        level,
    )
    s.add(s.drum(s.grid([1, 3])[0], snare_drum(rng)), level - 2)
    hat = hi_hat(rng, 45) if hats == "closed" else cymbal(rng, uniform(rng, 2, 4), 0.6)
    s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], hat, 0.8, 0.2), level - uniform(rng, 6, 10))


def _blues(rng: np.random.Generator, n: int) -> np.ndarray:
    twelve_bar = [(0, "dom7")] * 4 + [(5, "dom7")] * 2 + [(0, "dom7")] * 2
    twelve_bar += [(7, "dom7"), (5, "dom7"), (0, "dom7"), (7, "dom7")]
    s = Song(
        rng, n, uniform(rng, 60, 115), twelve_bar, swing=uniform(rng, 0.6, 0.68), jitter_s=0.008
    )
    if rng.random() < 0.85:
        s.add(s.drum(s.grid([0, 2])[0], kick_drum(rng)), -10)
        s.add(s.drum(s.grid([1, 3])[0], snare_drum(rng) if rng.random() < 0.7 else brush(rng)), -12)
        ride = cymbal(rng, uniform(rng, 3, 6), 0.5) if rng.random() < 0.5 else hi_hat(rng, 40)
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], ride, 0.8, 0.25), -19)
    # The shuffle bass: root, root, fifth, fifth, sixth, sixth, flat seventh, sixth.
    t, b = s.grid(np.arange(0, 4, 0.5))
    walk = np.array([0, 0, 7, 7, 9, 9, 10, 9])[np.round((b % 4) * 2).astype(int)]
    bass = pluck(uniform(rng, 1.4, 2.2), uniform(rng, 2, 4), 3.0, 8)
    s.add(s.notes(t, 0.8 * s.beat_s / 2, s.roots(b, 28) + walk, 1.0, bass), -8)
    # The shuffle guitar rocks between fifth and sixth over the root.
    guitar = pluck(uniform(rng, 0.8, 1.3), uniform(rng, 2, 5), 2.0, 14)
    low = s.roots(b, 40)
    upper = low + np.where(np.round(b * 2).astype(int) % 4 >= 2, 9, 7)
    rhythm = s.notes(t, 0.45 * s.beat_s, low, 1.0, guitar)
    rhythm = rhythm + s.notes(t + 0.008, 0.45 * s.beat_s, upper, 0.9, guitar)
    s.add(drive(rhythm, uniform(rng, 1.0, 4.0)), -10)
    if rng.random() < 0.75:
        t, b = s.grid(np.arange(0, 4, 0.5), prob=0.55)
        lead = pluck(uniform(rng, 0.8, 1.2), uniform(rng, 1, 3), 1.5, 14)
        pitches = s.melody(b, "blues", 60, 79)
        bends = np.where(rng.random(len(t)) < 0.3, rng.choice([1.0, 2.0], len(t)), 0.0)
        line = s.notes(t, 0.9 * s.beat_s, pitches, rng.uniform(0.6, 1.0, len(t)), lead, bends)
        s.add(drive(line, uniform(rng, 1.5, 5.0)), -9)
    if rng.random() < 0.3:
        t, b = s.grid([0, 2])
        organ = drawbar_organ([1, 0.8, 0.5, 0.4, 0.2, 0.1], uniform(rng, 0.8, 6.5), 0.3)
        s.add(s.comp(t, b, organ, 52, 3, 1.8 * s.beat_s), -16)
    return reverb(rng, s.mix, uniform(rng, 0.6, 1.5), uniform(rng, 0.1, 0.3))


def _classical(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
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
    s = Song(
        rng,
        n,
        uniform(rng, 50, 130),
        progression,
        beats_per_chord=pick_one(rng, [2.0, 4.0]),
        jitter_s=0.015,
    )
    scale = "minor" if progression[0][1] == "min" else "major"
    strings = bowed(
        uniform(rng, 1.0, 1.6), uniform(rng, 0.08, 0.3), uniform(rng, 0.002, 0.006), voices=2
    )
    t, b = s.grid([0, 2] if s.beats_per_chord == 2 else [0])
    s.add(s.comp(t, b, strings, pick_one(rng, [48, 52, 55]), 4, s.beats_per_chord * s.beat_s), -8)
    cello = bowed(uniform(rng, 1.1, 1.5), 0.12, 0.004, voices=1)
    s.add(s.notes(t, s.beats_per_chord * s.beat_s, s.roots(b, 36), 1.0, cello), -11)
    texture = rng.random()
    if texture < 0.45:
        # Arpeggios on a piano-like string (harp or piano).
        step = pick_one(rng, [0.5, 0.25])
        t, b = s.grid(np.arange(0, 4, step))
        tones = s.chord_tones(b, pick_one(rng, [55, 60]), 4)
        order = (np.round(b / step).astype(int)) % 4
        piano = pluck(uniform(rng, 1.2, 1.8), uniform(rng, 1.0, 2.5), 1.2, 12, 0.12)
        s.add(s.notes(t, 2 * s.beat_s, tones[order, np.arange(len(b))], 0.8, piano), -9)
    elif texture < 0.8:
        t, b = s.grid(np.arange(0, 4, 1.0), prob=0.8)
        violin = bowed(uniform(rng, 1.0, 1.4), 0.06, 0.007, voices=1)
        line = s.notes(t, 1.1 * s.beat_s, s.melody(b, scale, 67, 88, 1.3), 0.9, violin)
        s.add(line, -9)
    else:
        t, b = s.grid(np.arange(0, 4, 1.0), prob=0.7)
        flute = bowed(2.6, 0.05, 0.006, voices=1, n_harm=4)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, scale, 72, 91, 1.2), 0.9, flute), -10)
    # Phrasing: a slow swell over the excerpt.
    swell = 1 + uniform(rng, 0.2, 0.7) * np.sin(
        TWO_PI * uniform(rng, 0.05, 0.2) * np.arange(n) / SAMPLE_RATE + uniform(rng, 0, 6.3)
    )
    return reverb(rng, s.mix * swell, uniform(rng, 1.5, 3.0), uniform(rng, 0.3, 0.55))


def _country(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(0, "maj"), (5, "maj"), (7, "maj"), (0, "maj")],
            [(0, "maj"), (0, "maj"), (7, "maj"), (0, "maj")],
            [(0, "maj"), (5, "maj"), (0, "maj"), (7, "maj")],
        ],
    )
    s = Song(rng, n, uniform(rng, 88, 150), progression, swing=uniform(rng, 0.5, 0.57))
    s.add(s.drum(s.grid([0, 2])[0], kick_drum(rng)), -12)
    back = (
        snare_drum(rng)
        if rng.random() < 0.5
        else (rim_shot(rng) if rng.random() < 0.5 else brush(rng))
    )
    s.add(s.drum(s.grid([1, 3])[0], back), -13)
    if rng.random() < 0.3:  # the train beat: soft snare sixteenths
        s.add(s.drum(s.grid(np.arange(0, 4, 0.25))[0], brush(rng), 0.5, 0.3), -22)
    else:
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], hi_hat(rng, 50), 0.7, 0.2), -21)
    # Boom-chick: root on one, fifth on three; the guitar strums the off beats.
    t, b = s.grid([0, 2])
    fifths = np.where(np.round(b % 4) == 2, 7, 0)
    bass = pluck(uniform(rng, 1.5, 2.2), uniform(rng, 2, 5), 3.0, 8)
    s.add(s.notes(t, 0.9 * s.beat_s, s.roots(b, 33) + fifths, 1.0, bass), -8)
    acoustic = pluck(uniform(rng, 0.6, 1.0), uniform(rng, 3, 6), 2.5, 16, 0.15)
    t, b = s.grid(pick_one(rng, [[1, 3], [0.5, 1, 1.5, 2.5, 3, 3.5], [1, 1.5, 3, 3.5]]))
    s.add(s.comp(t, b, acoustic, 52, 4, 0.5 * s.beat_s, strum=uniform(rng, 0.008, 0.02)), -10)
    lead_kind = rng.random()
    t, b = s.grid(np.arange(0, 4, 0.5), prob=0.5)
    if lead_kind < 0.45:  # twangy picked lead with bends
        twang = pluck(uniform(rng, 0.5, 0.9), uniform(rng, 2, 4), 1.5, 16, 0.08)
        bends = np.where(rng.random(len(t)) < 0.25, 2.0, 0.0)
        s.add(s.notes(t, s.beat_s, s.melody(b, "major_pent", 62, 81), 0.9, twang, bends), -10)
    elif lead_kind < 0.75:  # fiddle
        fiddle = bowed(uniform(rng, 0.9, 1.2), 0.04, 0.008, voices=1)
        s.add(s.notes(t, s.beat_s, s.melody(b, "major_pent", 64, 86), 0.9, fiddle), -11)
    else:  # a singer
        t, b = s.grid([0, 1, 2, 3], prob=0.8)
        singer = voice(rng.integers(0, 5, len(t)), 0.01, 0.2)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, "major_pent", 52, 67, 1.2), 1.0, singer), -9)
    return reverb(rng, s.mix, uniform(rng, 0.6, 1.4), uniform(rng, 0.1, 0.25))


def _disco(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(0, "min7"), (5, "min7")],
            [(0, "min7"), (10, "maj"), (8, "maj7"), (10, "maj")],
            [(0, "maj7"), (2, "min7")],
        ],
    )
    s = Song(
        rng,
        n,
        uniform(rng, 110, 134),
        progression,
        beats_per_chord=pick_one(rng, [2, 4]),
        jitter_s=0.002,
    )
    s.add(s.drum(s.grid([0, 1, 2, 3])[0], kick_drum(rng), 1.0, 0.05), -8)
    s.add(s.drum(s.grid([1, 3])[0], hand_clap(rng) if rng.random() < 0.5 else snare_drum(rng)), -12)
    s.add(s.drum(s.grid([0.5, 1.5, 2.5, 3.5])[0], hi_hat(rng, uniform(rng, 7, 12))), -15)
    s.add(s.drum(s.grid(np.arange(0, 4, 0.25))[0], hi_hat(rng, 60), 0.5, 0.3), -24)
    # The octave bass: root low, root high, in eighths.
    t, b = s.grid(np.arange(0, 4, 0.5))
    octave = 12 * (np.round(b * 2).astype(int) % 2)
    bass = (
        pluck(uniform(rng, 1.0, 1.6), uniform(rng, 4, 8), 3.0, 10)
        if rng.random() < 0.6
        else saw(uniform(rng, 1.4, 2.0), 0.003, 0.003, 6.0)
    )
    s.add(s.notes(t, 0.4 * s.beat_s, s.roots(b, 33) + octave, 1.0, bass), -7)
    t, b = s.grid([0])
    strings = bowed(uniform(rng, 0.9, 1.3), uniform(rng, 0.05, 0.15), 0.004, voices=3)
    s.add(s.comp(t, b, strings, 60, 4, 4 * s.beat_s) * s.pump(uniform(rng, 0.0, 0.3)), -12)
    if rng.random() < 0.65:  # the muted "chicken scratch" guitar in sixteenths
        t, b = s.grid(np.arange(0, 4, 0.25), prob=0.7)
        scratch = pluck(uniform(rng, 0.6, 0.9), 25.0, 4.0, 16, 0.1)
        s.add(highpass(s.comp(t, b, scratch, 64, 3, 0.06, strum=0.004), 500.0), -15)
    if rng.random() < 0.4:
        t, b = s.grid([0, 1.5, 2, 3], prob=0.8)
        singer = voice(rng.integers(0, 5, len(t)), 0.012, 0.15)
        s.add(s.notes(t, 1.2 * s.beat_s, s.melody(b, "dorian", 60, 76), 1.0, singer), -11)
    return reverb(rng, s.mix, uniform(rng, 0.5, 1.2), uniform(rng, 0.05, 0.2))


def _hiphop(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(0, "min7"), (8, "maj7")],
            [(0, "min9"), (5, "min7")],
            [(0, "min7"), (3, "maj7"), (8, "maj7"), (7, "min7")],
        ],
    )
    half_time = rng.random() < 0.4
    bpm = uniform(rng, 130, 160) if half_time else uniform(rng, 78, 100)
    s = Song(
        rng,
        n,
        bpm,
        progression,
        beats_per_chord=pick_one(rng, [4, 8]),
        swing=uniform(rng, 0.5, 0.62),
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
    s.add(s.drum(kick_times, kick_drum(rng), 1.0, 0.1), -7)
    s.add(s.drum(s.grid(snares)[0], snare_drum(rng) if rng.random() < 0.6 else hand_clap(rng)), -9)
    s.add(s.drum(hat_times, hi_hat(rng, uniform(rng, 35, 70)), 0.7, 0.3), -18)
    # The 808 follows the kick with the chord root, long and low.
    sub = sub_bass(uniform(rng, 0.3, 1.0), uniform(rng, 0.8, 2.5), uniform(rng, 1.0, 3.0))
    s.add(s.notes(kick_times, 1.5 * s.beat_s, s.roots(kick_beats, 24), 1.0, sub), -6)
    # A sampled loop: an electric piano, dulled as if lifted off a record.
    t, b = s.grid([0] if rng.random() < 0.6 else [0, 2.5])
    keys = fm(1.0, uniform(rng, 1.0, 3.0), uniform(rng, 3, 8), uniform(rng, 0.5, 1.5))
    loop = lowpass(s.comp(t, b, keys, 55, 4, 2 * s.beat_s), uniform(rng, 1500, 4000))
    s.add(loop, -13)
    if rng.random() < 0.8:  # a rapper: short syllables on the sixteenth grid, spoken pitch
        t, b = s.grid(np.arange(0, 4, 0.25), prob=uniform(rng, 0.4, 0.7))
        rapper = voice(rng.integers(0, 5, len(t)), 0.0, uniform(rng, 0.4, 0.9))
        pitch = 45 + rng.integers(0, 5, len(t))
        s.add(s.notes(t, 0.12, pitch, rng.uniform(0.6, 1.0, len(t)), rapper), -8)
    # Vinyl: crackle (sparse clicks) and surface noise.
    clicks = (rng.random(n) < uniform(rng, 10, 60) / SAMPLE_RATE) * rng.standard_normal(n)
    s.add(highpass(clicks, 1000.0), -30)
    return s.mix


def _jazz(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(2, "min7"), (7, "dom9"), (0, "maj7"), (0, "maj7")],
            [(0, "maj7"), (9, "dom7"), (2, "min7"), (7, "dom7")],
            [(2, "min9"), (7, "dom9"), (0, "maj9"), (9, "dom7")],
        ],
    )
    s = Song(
        rng,
        n,
        uniform(rng, 95, 220),
        progression,
        beats_per_chord=pick_one(rng, [2, 4]),
        swing=uniform(rng, 0.6, 0.7),
        jitter_s=0.01,
    )
    if rng.random() < 0.7:  # the ride: ding, ding-da, ding, ding-da
        ride = cymbal(rng, uniform(rng, 1.5, 3.0), uniform(rng, 0.8, 1.5))
        s.add(s.drum(s.grid([0, 1, 1.5, 2, 3, 3.5])[0], ride, 0.8, 0.2), -16)
    else:  # brushes
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], brush(rng), 0.7, 0.3), -14)
    s.add(s.drum(s.grid([1, 3])[0], hi_hat(rng, 30), 0.6), -20)
    s.add(s.drum(s.grid([0, 1, 2, 3])[0], kick_drum(rng), 0.3, 0.3), -24)  # feathered
    s.add(s.drum(s.grid(np.arange(0, 4, 0.5), prob=0.15)[0], snare_drum(rng), 0.4, 0.4), -22)
    # Walking bass: a chord tone on every beat, passing tones between.
    t, b = s.grid([0, 1, 2, 3])
    tones = s.chord_tones(b, 31, 4)
    choice = rng.integers(0, 4, len(b))
    choice[np.round(b % s.beats_per_chord) == 0] = 0  # the root when the chord changes
    walk = tones[choice, np.arange(len(b))] + rng.choice([0, 0, 0, 2, -1], len(b))
    upright = pluck(uniform(rng, 1.8, 2.6), uniform(rng, 2, 4), 4.0, 8, 0.3)
    s.add(s.notes(t, 0.95 * s.beat_s, walk, rng.uniform(0.7, 1.0, len(t)), upright), -8)
    # Piano comping on syncopated hits (the Charleston and its cousins).
    t, b = s.grid(pick_one(rng, [[0, 1.5], [1.5, 3.5], [0.5, 2, 3.5]]), prob=0.8)
    piano = (
        pluck(uniform(rng, 1.3, 1.9), uniform(rng, 1.5, 3.0), 1.5, 12, 0.12)
        if rng.random() < 0.6
        else fm(1.0, uniform(rng, 1.5, 3.5), 6.0, 1.5)
    )
    s.add(s.comp(t, b, piano, pick_one(rng, [50, 53]), 4, 0.7 * s.beat_s, strum=0.004), -12)
    if rng.random() < 0.55:  # a horn: a reedy voice with a little breath
        t, b = s.grid(np.arange(0, 4, 0.5), prob=0.6)
        horn = bowed(uniform(rng, 0.7, 1.0), 0.03, 0.005, voices=1, n_harm=16)
        line = s.notes(t, 0.45 * s.beat_s, s.melody(b, "dorian", 58, 79), 0.9, horn)
        s.add(bandpass(line, 300.0, 4000.0), -10)
    return reverb(rng, s.mix, uniform(rng, 0.8, 1.8), uniform(rng, 0.15, 0.35))


def _metal(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(0, "pow"), (1, "pow")],
            [(0, "pow"), (8, "pow"), (10, "pow"), (0, "pow")],
            [(0, "pow"), (0, "pow"), (6, "pow"), (5, "pow")],
        ],
    )
    s = Song(
        rng,
        n,
        uniform(rng, 95, 210),
        progression,
        beats_per_chord=pick_one(rng, [2, 4]),
        jitter_s=0.002,
    )
    fast = s.beat_s < 60 / 160
    style = rng.random()
    if style < 0.55:  # double kick
        s.add(
            s.drum(s.grid(np.arange(0, 4, 0.5 if fast else 0.25))[0], kick_drum(rng), 1, 0.05), -8
        )
        s.add(s.drum(s.grid([1, 3])[0], snare_drum(rng)), -9)
    elif style < 0.7:  # blast beat
        s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], kick_drum(rng), 1, 0.05), -8)
        s.add(s.drum(s.grid(np.arange(0.25, 4, 0.5))[0], snare_drum(rng)), -10)
    else:
        s.add(s.drum(s.grid([0, 0.5, 2, 2.5, 2.75])[0], kick_drum(rng), 1, 0.05), -8)
        s.add(s.drum(s.grid([1, 3])[0], snare_drum(rng)), -9)
    crash = cymbal(rng, uniform(rng, 1.0, 2.0), 0.3)
    s.add(s.drum(s.grid([0, 1, 2, 3] if rng.random() < 0.5 else [0])[0], crash), -15)
    # Palm-muted chugs on the low root and open power chords, through a high-gain amp.
    t, b = s.grid(np.arange(0, 4, 0.25 if not fast else 0.5), prob=uniform(rng, 0.6, 0.95))
    low = pick_one(rng, [26, 28, 30])
    guitar = pluck(uniform(rng, 0.7, 1.1), uniform(rng, 1, 3), 1.0, 16, 0.1)
    muted = rng.random(len(t)) < 0.7
    chords = s.comp(t, b, guitar, low + 12, 3, np.where(muted, 0.07, 0.5 * s.beat_s))
    gain = uniform(rng, 6.0, 25.0)
    amp = lowpass(highpass(drive(chords, gain), 90.0), uniform(rng, 3500, 6500), order=4)
    s.add(amp, -5)
    bass = pluck(1.2, 3.0, 2.0, 10)
    s.add(drive(s.notes(t, 0.2, s.roots(b, low), 1.0, bass), 3.0), -11)
    if rng.random() < 0.3:  # a shred lead
        t, b = s.grid(np.arange(0, 4, 0.25), prob=0.8)
        lead = pluck(0.9, 2.0, 1.0, 14)
        line = s.notes(
            t, 0.25 * s.beat_s, s.melody(b, pick_one(rng, ["minor", "phrygian"]), 64, 88), 1.0, lead
        )
        s.add(lowpass(drive(line, gain), 6000.0), -10)
    return reverb(rng, s.mix, uniform(rng, 0.4, 1.0), uniform(rng, 0.05, 0.2))


def _pop(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(0, "maj"), (7, "maj"), (9, "min"), (5, "maj")],
            [(9, "min"), (5, "maj"), (0, "maj"), (7, "maj")],
            [(0, "maj"), (5, "maj"), (9, "min"), (7, "maj")],
        ],
    )
    s = Song(rng, n, uniform(rng, 90, 130), progression, jitter_s=0.002)
    kicks = [0, 1, 2, 3] if rng.random() < 0.35 else pick_one(rng, [[0, 2], [0, 1.5, 2], [0, 2.5]])
    s.add(s.drum(s.grid(kicks)[0], kick_drum(rng), 1.0, 0.05), -8)
    s.add(s.drum(s.grid([1, 3])[0], hand_clap(rng) if rng.random() < 0.6 else snare_drum(rng)), -11)
    step = pick_one(rng, [0.5, 0.25])
    s.add(s.drum(s.grid(np.arange(0, 4, step))[0], hi_hat(rng, uniform(rng, 30, 60)), 0.7), -19)
    bass = saw(uniform(rng, 1.3, 2.0), 0.002, 0.003, 3.0)
    t, b = s.grid(np.arange(0, 4, 0.5) if rng.random() < 0.5 else [0, 2])
    s.add(lowpass(s.notes(t, 0.45 * s.beat_s, s.roots(b, 33), 1.0, bass), 900.0), -8)
    pad = saw(uniform(rng, 1.2, 1.8), uniform(rng, 0.003, 0.008), uniform(rng, 0.02, 0.2), 0.3)
    t, b = s.grid([0])
    pads = lowpass(s.comp(t, b, pad, 55, 3, 4 * s.beat_s), uniform(rng, 2500, 6000))
    s.add(pads * s.pump(uniform(rng, 0.0, 0.5)), -12)
    if rng.random() < 0.65:  # a sung hook
        t, b = s.grid(pick_one(rng, [[0, 1, 2, 3], [0, 0.5, 1.5, 2, 3]]), prob=0.8)
        singer = voice(rng.integers(0, 5, len(t)), uniform(rng, 0.008, 0.02), 0.15)
        hook = s.notes(t, 0.9 * s.beat_s, s.melody(b, "major_pent", 60, 76, 1.2), 1.0, singer)
        s.add(hook, -7)
    else:  # a plucked synth arpeggio
        t, b = s.grid(np.arange(0, 4, 0.25))
        tones = s.chord_tones(b, 67, 3)
        arp = tones[np.round(b * 4).astype(int) % 3, np.arange(len(b))]
        s.add(s.notes(t, 0.2 * s.beat_s, arp, 0.8, saw(1.0, 0.004, 0.002, 8.0, 12)), -12)
    mix = np.tanh(uniform(rng, 1.0, 2.5) * norm(s.mix))  # radio-loud bus compression
    return reverb(rng, mix, uniform(rng, 0.5, 1.2), uniform(rng, 0.05, 0.2))


def _reggae(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(0, "maj"), (5, "maj")],
            [(0, "min"), (5, "min")],
            [(0, "maj"), (7, "maj"), (9, "min"), (5, "maj")],
        ],
    )
    s = Song(
        rng,
        n,
        uniform(rng, 62, 95),
        progression,
        beats_per_chord=pick_one(rng, [4, 8]),
        swing=uniform(rng, 0.5, 0.62),
        jitter_s=0.006,
    )
    if rng.random() < 0.7:  # one drop: kick and rim together on three, nothing on one
        s.add(s.drum(s.grid([2])[0], kick_drum(rng)), -8)
        snare = s.drum(s.grid([2])[0], rim_shot(rng))
    else:  # steppers
        s.add(s.drum(s.grid([0, 1, 2, 3])[0], kick_drum(rng)), -9)
        snare = s.drum(s.grid([1, 3])[0], rim_shot(rng) if rng.random() < 0.5 else snare_drum(rng))
    if rng.random() < 0.4:  # dub echo on the snare
        snare = echo(snare, 0.75 * s.beat_s, uniform(rng, 0.3, 0.6))
    s.add(snare, -12)
    s.add(s.drum(s.grid(np.arange(0, 4, 0.5))[0], hi_hat(rng, uniform(rng, 30, 60)), 0.6), -20)
    # Deep, round bass with space in it.
    t, b = s.grid([0, 0.75, 1.5, 2.5, 3, 3.5], prob=uniform(rng, 0.5, 0.85))
    riff = s.roots(b, 28) + rng.choice([0, 0, 7, 12, 10, 5], len(b))
    bass = pluck(uniform(rng, 2.2, 3.2), uniform(rng, 0.8, 2.0), 2.0, 6, 0.45)
    s.add(s.notes(t, 0.7 * s.beat_s, riff, 1.0, bass), -5)
    # The skank: short chords on every off-beat, guitar and often an organ bubble.
    t, b = s.grid([0.5, 1.5, 2.5, 3.5])
    guitar = pluck(uniform(rng, 0.6, 1.0), 12.0, 3.0, 16, 0.12)
    s.add(highpass(s.comp(t, b, guitar, 60, 3, 0.08, strum=0.003), 400.0), -11)
    if rng.random() < 0.6:
        t, b = s.grid([0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75], prob=0.8)
        organ = drawbar_organ([0.8, 1, 0.5, 0.6, 0.1, 0.2], uniform(rng, 0.8, 6.5), 0.2)
        s.add(s.comp(t, b, organ, 55, 3, 0.1), -15)
    if rng.random() < 0.4:
        t, b = s.grid([0, 1, 2, 3], prob=0.7)
        singer = voice(rng.integers(0, 5, len(t)), 0.012, 0.2)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, "major_pent", 55, 70, 1.1), 1.0, singer), -9)
    return reverb(rng, s.mix, uniform(rng, 0.5, 1.2), uniform(rng, 0.1, 0.3))


def _rock(rng: np.random.Generator, n: int) -> np.ndarray:
    progression = pick_one(
        rng,
        [
            [(0, "pow"), (10, "pow"), (5, "pow"), (0, "pow")],
            [(0, "pow"), (5, "pow"), (7, "pow"), (5, "pow")],
            [(0, "maj"), (7, "maj"), (9, "min"), (5, "maj")],
            [(9, "pow"), (5, "pow"), (0, "pow"), (7, "pow")],
        ],
    )
    shuffle = rng.random() < 0.2
    s = Song(
        rng,
        n,
        uniform(rng, 95, 165),
        progression,
        swing=uniform(rng, 0.58, 0.66) if shuffle else 0.5,
        jitter_s=0.005,
    )
    _rock_drums(s, rng, -8, "closed" if rng.random() < 0.7 else "ride")
    if rng.random() < 0.5:
        s.add(s.drum(s.grid([0], every=2)[0], cymbal(rng, uniform(rng, 1.0, 2.0), 0.3)), -14)
    t, b = s.grid(np.arange(0, 4, 0.5))
    guitar = pluck(uniform(rng, 0.8, 1.2), uniform(rng, 1, 3), 1.5, 16, 0.12)
    chords = s.comp(t, b, guitar, pick_one(rng, [40, 43, 45]), 3, 0.45 * s.beat_s, strum=0.006)
    gain = uniform(rng, 2.0, 10.0)
    s.add(lowpass(highpass(drive(chords, gain), 80.0), uniform(rng, 3500, 7500), order=4), -7)
    bass = pluck(uniform(rng, 1.3, 2.0), 3.0, 2.5, 10)
    s.add(s.notes(t, 0.45 * s.beat_s, s.roots(b, 28), 1.0, bass), -9)
    lead = rng.random()
    if lead < 0.4:
        t, b = s.grid([0, 1, 2, 2.5, 3], prob=0.75)
        singer = voice(rng.integers(0, 5, len(t)), 0.01, 0.25)
        s.add(s.notes(t, 0.9 * s.beat_s, s.melody(b, "minor_pent", 52, 69), 1.0, singer), -8)
    elif lead < 0.7:
        t, b = s.grid(np.arange(0, 4, 0.5), prob=0.6)
        solo = pluck(0.9, 2.0, 1.2, 14)
        bends = np.where(rng.random(len(t)) < 0.2, 2.0, 0.0)
        line = s.notes(t, s.beat_s, s.melody(b, "minor_pent", 62, 84), 0.9, solo, bends)
        s.add(lowpass(drive(line, gain), 6500.0), -9)
    return reverb(rng, s.mix, uniform(rng, 0.5, 1.3), uniform(rng, 0.08, 0.25))


RECIPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
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
