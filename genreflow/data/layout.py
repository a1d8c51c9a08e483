"""Where the clips are in the layouts users have.

- the original release, genres.tar.gz: genres/<genre>/<genre>.000NN.au (22050 Hz mono,
  16-bit), with stray Marsyas `.mf` list files beside them;
- the common copy: genres_original/<genre>/<genre>.000NN.wav (Data/genres_original in some);
- a folder that holds the ten genre folders itself (the seed's dataset_root).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError

AUDIO_SUFFIXES = frozenset({".au", ".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"})
_CANDIDATES = ("", "genres", "genres_original", "Data/genres_original")


@dataclass(frozen=True)
class Clip:
    name: str  # the file name, e.g. blues.00000.au: the key in features and predictions
    genre: str
    path: Path


def find_dataset_root(path: str | Path) -> Path:
    """The folder that holds the ten genre folders, in any of the known layouts."""
    path = Path(path)
    if not path.is_dir():
        raise GenreflowError(f"{path}: not a folder (expected an extracted GTZAN tree)")
    for candidate in _CANDIDATES:
        root = path / candidate
        if any((root / genre).is_dir() for genre in GENRES):
            return root
    tried = ", ".join(str(path / c) if c else str(path) for c in _CANDIDATES)
    raise GenreflowError(f"{path}: no GTZAN genre folders found (looked in {tried})")


def list_clips(dataset: str | Path) -> list[Clip]:
    """Every audio file of every genre, sorted by name; non-audio files (.mf lists) ignored.

    A missing genre folder or one without audio files is an error: training on nine
    genres while reporting ten would be silently wrong.
    """
    root = find_dataset_root(dataset)
    clips: list[Clip] = []
    for genre in GENRES:
        folder = root / genre
        if not folder.is_dir():
            raise GenreflowError(f"{folder}: genre folder missing (GTZAN has {len(GENRES)})")
        files = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES
        )
        if not files:
            raise GenreflowError(f"{folder}: no audio files in this genre folder")
        clips.extend(Clip(name=f.name, genre=genre, path=f) for f in files)
    return sorted(clips, key=lambda c: c.name)
