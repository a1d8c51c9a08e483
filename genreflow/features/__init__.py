"""Pack a GTZAN tree into one HDF5 file of fixed-length 32 kHz clips, as waveforms or as
the log-mel Cnn14's frozen front end makes of them.

The file is a contract the training and embedding steps read (see read_index):

- datasets: `audio_name` (N,) UTF-8 bytes, the clip's file name (b"blues.00000.au");
  the clips, one row per HDF5 chunk, as the `representation` attribute says: `waveform`
  (N, clip_samples) int16 (the seed's form), or `logmel` (N, frames, 64) float16, the
  front end's output (genreflow.logmel.LogmelFrontEnd) for that very int16 waveform;
  `target` (N, 10) float32 one-hot in GENRES order; `fold` (N,) int32, the seed's rule
  over every clip found; `skipped` (M, 2) UTF-8 strings, [file name, reason] of each clip
  left out (M may be 0).
- attributes: representation ("waveform" or "logmel"; a file without it holds
  waveforms), sample_rate, clip_samples, clip_seconds, genres, source_sha256 ("" when
  unknown), clips_found, genreflow_version, created (ISO 8601, UTC); with log-mel also
  `front_end`, the front end's parameters as JSON (sample_rate, window_size, hop_size,
  mel_bins, fmin, fmax).

The front end is frozen and SpecAugment and mixup act after it (PannsCnn.forward), so
training and embedding on the log-mel compute what they would from the waveform, up to
float16 rounding, with a fifth of the bytes (0.38 MB per 30 s clip instead of 1.9 MB).

Rows are in sorted name order. Folds are assigned before anything is decoded, so a clip
that turns out unreadable leaves a hole in its fold instead of shifting its neighbours'.

The modules: `packing` writes the file, `workers` decodes its clips in worker processes,
`reader` reads and checks it, `hdf5` opens any HDF5 file genreflow reads.
"""

from genreflow.features.packing import ON_ERROR_CHOICES, PackSummary, default_workers, pack
from genreflow.features.reader import (
    REPRESENTATIONS,
    FeaturesFingerprint,
    RowLayout,
    check_fits_model,
    clip_names,
    describe,
    features_fingerprint,
    model_input,
    read_index,
    representation_of,
)

__all__ = [
    "ON_ERROR_CHOICES",
    "REPRESENTATIONS",
    "FeaturesFingerprint",
    "PackSummary",
    "RowLayout",
    "check_fits_model",
    "clip_names",
    "default_workers",
    "describe",
    "features_fingerprint",
    "model_input",
    "pack",
    "read_index",
    "representation_of",
]
