"""Caps on what untrusted input may make genreflow decode, extract or write.

A small compressed file can decode or extract to gigabytes, and a server can send more than
it announced. Each cap's default leaves room for GTZAN many times over (the original
archive is 1.2 GB holding 1000 clips of 30 s); an environment variable of the same name
raises it, in a shell or on a pipeline step's container alike. The errors name the variable.
"""

from __future__ import annotations

import os

from genreflow.errors import GenreflowError

GIB = 1 << 30
MIB = 1 << 20

# name -> (default, what it bounds)
DEFAULTS: dict[str, tuple[int, str]] = {
    "GENREFLOW_MAX_AUDIO_SECONDS": (3600, "seconds of audio one file may decode to"),
    # What decoding audio may cost (genreflow.audio, and the served model's requests:
    # genreflow.inference). The defaults keep a 2-core, 4 GiB pod serving the frozen-base
    # ensemble alive under 8 concurrent worst-case requests (README, "The model").
    "GENREFLOW_MAX_DECODED_BYTES": (
        256 * MIB,
        "bytes one file may decode to (frames x channels x 4)",
    ),
    "GENREFLOW_MIN_SAMPLE_RATE": (4000, "Hz, the lowest sample rate decoded"),
    "GENREFLOW_MAX_SAMPLE_RATE": (384_000, "Hz, the highest sample rate decoded"),
    "GENREFLOW_MAX_REQUEST_ROWS": (32, "files (rows) one request may hold"),
    "GENREFLOW_MAX_REQUEST_SECONDS": (
        300,
        "seconds of audio one request may hold, each file counted in whole clips",
    ),
    "GENREFLOW_MAX_ARCHIVE_MEMBERS": (100_000, "members one archive may hold"),
    "GENREFLOW_MAX_EXTRACT_BYTES": (16 * GIB, "bytes one archive may extract to"),
    "GENREFLOW_MAX_COMPRESSION_RATIO": (
        200,
        "times its own size an archive may extract to",
    ),
    "GENREFLOW_MAX_DOWNLOAD_BYTES": (64 * GIB, "bytes one download may write"),
    # tarfile reads a GNU long name or a pax record whole into memory, whatever size its
    # header claims; GTZAN's names are 30 characters.
    "GENREFLOW_MAX_ARCHIVE_HEADER_BYTES": (
        8192,
        "bytes one tar header extension (GNU long name or link, pax record) may hold",
    ),
}


def limit(name: str) -> int:
    """The cap `name` (a key of DEFAULTS): its environment variable if set, else the default."""
    default, what = DEFAULTS[name]
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise GenreflowError(f"{name}={text!r}: expected a positive whole number of {what}")
    return value


def over(name: str, detail: str) -> str:
    """Why something went past the cap `name`, and how to raise it: for an error message."""
    return f"{detail}, over the limit of {limit(name)} {DEFAULTS[name][1]} (set {name} to raise it)"


def exceeded(subject: str, name: str, detail: str) -> GenreflowError:
    """The error for `subject` going past the cap `name`."""
    return GenreflowError(f"{subject}: {over(name, detail)}")
