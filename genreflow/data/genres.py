"""GTZAN's genre order and the seed's fold rule: contracts other tools rely on.

Both match qiuqiangkong/panns_transfer_to_gtzan (utils/config.py and utils/features.py),
so label indices and per-fold numbers compare with the seed's published ones.
"""

from __future__ import annotations

from collections.abc import Iterable

GENRES: tuple[str, ...] = (
    "blues",
    "classical",
    "country",
    "disco",
    "hiphop",
    "jazz",
    "metal",
    "pop",
    "reggae",
    "rock",
)
GENRE_INDEX: dict[str, int] = {genre: i for i, genre in enumerate(GENRES)}
FOLDS: tuple[int, ...] = tuple(range(1, 11))


def assign_folds(audio_names: Iterable[str]) -> dict[str, int]:
    """The seed's folds: names sorted, fold = index mod 10 + 1.

    Call it on every clip name found, before decoding, so that a clip skipped later
    never shifts another clip's fold. On the full set, fold K holds 10 clips per genre.
    """
    return {name: i % 10 + 1 for i, name in enumerate(sorted(audio_names))}
