"""The pack step: decode, resample and pack every clip into one HDF5 file
(genreflow.features)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # h5py and numpy load only when the step runs
    from genreflow.features import PackSummary


def pack(
    dataset: str | Path,
    out: str | Path,
    *,
    clip_seconds: float = 30.0,
    representation: str = "waveform",
    workers: int | None = None,
    on_error: str = "skip",
    source_sha256: str = "",
    progress: bool = True,
) -> PackSummary:
    """Pack the extracted tree `dataset` into `out` (a path or gs://): clips of
    `clip_seconds` as int16 waveforms ("waveform", the seed's form) or Cnn14's float16
    log-mel ("logmel"); an unreadable clip skipped and recorded (on_error "skip") or fatal
    ("fail"); `source_sha256` (the archive's) recorded in the file."""
    from genreflow.features import pack as pack_clips

    return pack_clips(
        dataset,
        out,
        clip_seconds=clip_seconds,
        representation=representation,
        workers=workers,
        on_error=on_error,
        source_sha256=source_sha256 or None,
        progress=progress,
    )
