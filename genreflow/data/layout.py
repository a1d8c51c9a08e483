"""Folders of class folders: GTZAN's layouts, and what every folder layout shares.

GTZAN in the layouts users have:
- the original release, genres.tar.gz: genres/<genre>/<genre>.000NN.au (22050 Hz mono,
  16-bit), with stray Marsyas `.mf` list files beside them;
- the common copy: genres_original/<genre>/<genre>.000NN.wav (Data/genres_original in some);
- a folder that holds the ten genre folders itself (the seed's dataset_root).

`list_folder` is how every folder layout (GTZAN's here, any class folders in
genreflow.data.dataset) sees a folder: its audio files, its subfolders, and the rest counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError

AUDIO_SUFFIXES = frozenset({".au", ".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"})
GTZAN_CANDIDATES = ("", "genres", "genres_original", "Data/genres_original")
FOLDER = "(folder)"  # how a subfolder that is not read is counted among the ignored entries


@dataclass(frozen=True)
class Clip:
    name: str  # the file name, e.g. blues.00000.au: the key in features and predictions
    genre: str
    path: Path


@dataclass(frozen=True)
class Listing:
    """One folder's entries: audio files and subfolders (each sorted by name), the other
    files counted by suffix (lower case; "" for none)."""

    audio: tuple[Path, ...]
    folders: tuple[Path, ...]
    other: Counter[str]


def list_folder(folder: Path) -> Listing:
    audio, folders, other = [], [], Counter()
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            folders.append(entry)
        elif entry.suffix.lower() in AUDIO_SUFFIXES and entry.is_file():
            audio.append(entry)
        else:
            other[entry.suffix.lower()] += 1
    return Listing(tuple(audio), tuple(folders), other)


def clips_in(folder: Path, ignored: Counter, empty: str) -> tuple[Path, ...]:
    """The audio files directly in a label's folder (GTZAN's genre folders, any class
    folder); what else is there is counted in `ignored`; none at all is an error, `empty`."""
    listing = list_folder(folder)
    if not listing.audio:
        raise GenreflowError(f"{folder}: {empty}")
    ignored.update(listing.other)
    if listing.folders:  # clips sit directly in their label's folder
        ignored[FOLDER] += len(listing.folders)
    return listing.audio


def find_dataset_root(path: str | Path) -> Path:
    """The folder that holds the ten genre folders, in any of the known layouts."""
    path = Path(path)
    if not path.is_dir():
        raise GenreflowError(f"{path}: not a folder (expected an extracted GTZAN tree)")
    for candidate in GTZAN_CANDIDATES:
        root = path / candidate
        if any((root / genre).is_dir() for genre in GENRES):
            return root
    tried = ", ".join(str(path / c) if c else str(path) for c in GTZAN_CANDIDATES)
    raise GenreflowError(f"{path}: no GTZAN genre folders found (looked in {tried})")


def list_clips(dataset: str | Path, *, ignored: Counter[str] | None = None) -> list[Clip]:
    """Every audio file of every genre, sorted by name; non-audio files (.mf lists) ignored,
    and counted by suffix into `ignored` where given (the root's and the genre folders').

    A missing genre folder or one without audio files is an error: training on nine
    genres while reporting ten would be silently wrong.
    """
    root = find_dataset_root(dataset)
    ignored = Counter() if ignored is None else ignored
    ignored.update(list_folder(root).other)
    clips: list[Clip] = []
    for genre in GENRES:
        folder = root / genre
        if not folder.is_dir():
            raise GenreflowError(f"{folder}: genre folder missing (GTZAN has {len(GENRES)})")
        audio = clips_in(folder, ignored, "no audio files in this genre folder")
        clips.extend(Clip(name=f.name, genre=genre, path=f) for f in audio)
    return sorted(clips, key=lambda c: c.name)
