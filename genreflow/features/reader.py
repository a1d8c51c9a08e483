"""Reading a packed file: its index (names, genres, folds, attributes) after checking the
contract (genreflow.features says what the file holds), its rows as the model takes
them, whether a model fits its log-mel, its fingerprint, and a description.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from genreflow.data.genres import FOLDS, GENRES
from genreflow.data.layout import AUDIO_SUFFIXES
from genreflow.errors import GenreflowError
from genreflow.features.hdf5 import (
    is_printable_name,
    open_checked,
    plain,
    plain_attrs,
    require,
    shown,
)
from genreflow.logmel import FRONT_END, FRONT_END_TOLERANCE, LogmelFrontEnd, logmel_frames

# What a packed file holds its clips as; each is also the name of the dataset holding them.
REPRESENTATIONS = ("waveform", "logmel")
# Files packed before log-mel packing existed record nothing, and hold waveforms.
UNRECORDED_REPRESENTATION = "waveform"
REQUIRED_DATASETS = ("audio_name", "target", "fold")  # and the representation's own
REQUIRED_ATTRS = ("sample_rate", "clip_samples", "clip_seconds", "genres")


@dataclass(frozen=True)
class RowLayout:
    """One packed clip as stored: its representation, row shape and dtype."""

    representation: str
    n_samples: int  # the clip's length as a waveform, whatever it is stored as
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, representation: str, n_samples: int, front_end: dict = FRONT_END) -> RowLayout:
        """The layout of clips of `n_samples` samples; a log-mel's as `front_end` makes it."""
        if representation == "waveform":
            return cls(representation, n_samples, (n_samples,), np.dtype(np.int16))
        frames = logmel_frames(n_samples, front_end["hop_size"])
        return cls(representation, n_samples, (frames, front_end["mel_bins"]), np.dtype(np.float16))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def read_index(features_path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Names, genre indices, folds and attributes of a packed file, after checking it.

    Args:
        features_path: a path, file://, http(s):// or gs:// URI (remote: downloaded once
            into the cache).

    Returns:
        (names, targets, folds, attrs): str names (N,), int64 genre indices (N,), int32
        folds (N,), and the attributes as plain Python values plus `skipped`, a list of
        (name, reason); `representation` is always there, and with log-mel `front_end`
        is a dict.

    Raises:
        GenreflowError: the file is missing, not HDF5, or not a complete genreflow file,
            or its clips are not what its `representation` attribute says.
    """
    with open_checked(features_path, "features") as (path, hf):
        representation = representation_of(hf, path)
        require(
            hf,
            path,
            f"a genreflow features file of {representation} clips",
            (*REQUIRED_DATASETS, representation),
            REQUIRED_ATTRS,
        )
        attrs = plain_attrs(hf)
        attrs["representation"] = representation
        if representation == "logmel":
            attrs["front_end"] = _front_end_of(attrs, path)
        names = clip_names(path, hf["audio_name"])
        target = hf["target"][:]
        folds = hf["fold"][:].astype(np.int32)
        clips_shape, clips_dtype = hf[representation].shape, hf[representation].dtype
        if representation == "waveform" and clips_dtype != np.int16:
            # Every reader scales by 1/32767: float clips would arrive near silent.
            raise GenreflowError(
                f"{path}: waveform is {clips_dtype}, expected int16 (clips stored "
                "as the seed stores them; float data would be silently rescaled)"
            )
        skipped = [tuple(row) for row in hf["skipped"].asstr()[:]] if "skipped" in hf else []

    n = len(names)
    if attrs["genres"] != list(GENRES):
        raise GenreflowError(
            f"{path}: genre order {shown(attrs['genres'], 200)} differs from genreflow's "
            f"{list(GENRES)}"
        )
    problems = []
    if target.shape != (n, len(GENRES)):
        problems.append(f"target has shape {target.shape}, expected ({n}, {len(GENRES)})")
    if folds.shape != (n,):
        problems.append(f"fold has shape {folds.shape}, expected ({n},)")
    front_end = attrs.get("front_end", FRONT_END)
    layout = RowLayout.of(representation, int(attrs["clip_samples"]), front_end)
    if clips_shape != (n, *layout.shape) or clips_dtype != layout.dtype:
        problems.append(
            f"{representation} is {clips_dtype} of shape {clips_shape}, expected "
            f"{layout.dtype} of shape {(n, *layout.shape)}"
        )
    one_hot = np.all((target == 0) | (target == 1), axis=1) & (target.sum(axis=1) == 1)
    if not problems and not one_hot.all():
        problems.append("target rows are not one-hot")
    if not problems and not np.isin(folds, FOLDS).all():
        problems.append(f"folds outside {FOLDS[0]}..{FOLDS[-1]}")
    if problems:
        raise GenreflowError(f"{path}: inconsistent features file: {'; '.join(problems)}")
    attrs["skipped"] = skipped
    return names, target.argmax(axis=1), folds, attrs


def representation_of(hf: h5py.File, path: str | Path) -> str:
    """What an open packed file holds its clips as (its `representation` attribute)."""
    representation = plain(hf.attrs.get("representation", UNRECORDED_REPRESENTATION))
    if representation not in REPRESENTATIONS:
        raise GenreflowError(
            f"{path}: holds clips as {shown(representation)}; genreflow reads "
            f"{' or '.join(REPRESENTATIONS)}"
        )
    return representation


def _front_end_of(attrs: dict, path: str | Path) -> dict:
    """The front-end parameters a log-mel file records, checked to be complete."""
    try:
        front_end = json.loads(attrs["front_end"])
    except (KeyError, TypeError, ValueError):
        raise GenreflowError(
            f"{path}: a log-mel file without a readable 'front_end' attribute (the "
            "parameters its log-mel was made with); pack it again"
        ) from None
    if not isinstance(front_end, dict) or set(front_end) != set(FRONT_END):
        raise GenreflowError(
            f"{path}: its 'front_end' attribute names {shown(front_end, 200)}, expected the "
            f"keys {', '.join(FRONT_END)}"
        )
    return front_end


# A clip's name is a file name (it names files in predictions and reports): one path
# component, as file systems take it.
MAX_NAME_BYTES = 255


def clip_names(path: Path, dataset: h5py.Dataset) -> np.ndarray:
    """audio_name (of a packed or an embeddings file) as str, each row checked: UTF-8
    text, a clip's file name (one path component: no `/`, `\\`, leading dot, control
    character or newline), unique. A refused row is named by its number, and shown only
    as a short escaped prefix."""
    if h5py.check_string_dtype(dataset.dtype) is None or dataset.ndim != 1:
        raise GenreflowError(
            f"{path}: audio_name is {dataset.dtype} of shape {dataset.shape}, expected one "
            "UTF-8 string per clip"
        )
    names, rows = [], {}
    for row, raw in enumerate(dataset[:]):
        try:
            name = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise GenreflowError(
                f"{path}: audio_name row {row}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        problem = _name_problem(name)
        if problem:
            raise GenreflowError(
                f"{path}: audio_name row {row}: {shown(name)} {problem} "
                "(expected a clip's file name, e.g. blues.00000.au)"
            )
        if name in rows:
            raise GenreflowError(
                f"{path}: audio_name row {row}: {shown(name)} already names row {rows[name]}"
            )
        rows[name] = row
        names.append(name)
    return np.array(names, dtype=str)


def _name_problem(name: str) -> str:
    """Why `name` is not a clip's file name, or ""."""
    if not name:
        return "is empty"
    if not is_printable_name(name):
        return "holds a control character or line break"
    if "/" in name or "\\" in name or name.startswith("."):
        return "is a path, not a file name"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if Path(name).suffix.lower() not in AUDIO_SUFFIXES:
        return f"does not end in {', '.join(sorted(AUDIO_SUFFIXES))}"
    return ""


@dataclass(frozen=True)
class FeaturesFingerprint:
    """What identifies a packed file without reading its clips. Every step that reads one
    records it (a fine-tuned checkpoint, its summary.json and resume state; embeddings.h5
    and each head.pth), so that a resume, a finished embed or a head can tell whether it
    was made from these very features."""

    # Of the names, genres, folds and every attribute: a repack writes a new `created`, so
    # it gets a new fingerprint.
    sha256: str
    clips: int
    clip_samples: int
    representation: str
    source_sha256: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def as_json(self) -> str:
        """One line of JSON (an HDF5 attribute holds it as text)."""
        return json.dumps(self.as_dict(), sort_keys=True)


def features_fingerprint(
    names: np.ndarray, targets: np.ndarray, folds: np.ndarray, attrs: dict
) -> FeaturesFingerprint:
    """The fingerprint of a packed file, from what `read_index` returns of it."""
    digest = hashlib.sha256()
    digest.update("\0".join(str(n) for n in names).encode("utf-8"))
    digest.update(np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(folds, dtype=np.int32).tobytes())
    digest.update(json.dumps(attrs, sort_keys=True, default=str).encode("utf-8"))
    return FeaturesFingerprint(
        sha256=digest.hexdigest(),
        clips=len(names),
        clip_samples=int(attrs["clip_samples"]),
        representation=str(attrs["representation"]),
        source_sha256=str(attrs.get("source_sha256", "") or ""),
    )


def model_input(representation: str, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Packed rows as the model takes them, on `device`: int16 waveforms -> float32 in
    [-1, 1] (int16 / 32767, as packing stored them); float16 log-mel -> float32
    (batch, 1, frames, mel).

    The stored dtype travels and the device converts: fewer bytes over PCIe, and no
    float copy of a batch of 30 s clips on the host.
    """
    clips = torch.from_numpy(rows).to(device).float()
    if representation == "waveform":
        return clips.div_(32767.0)
    return clips.unsqueeze(1)


def check_fits_model(path: str | Path, attrs: dict, model: torch.nn.Module) -> None:
    """A log-mel file must have been made by `model`'s own front end (a PannsCnn or a
    transfer model): the same parameters, and frozen weights equal within
    FRONT_END_TOLERANCE (a checkpoint brings its own). Waveform files fit any model.

    Args:
        path: the file, for the message.
        attrs: its attributes as read_index returns them.
        model: the model that will read it.
    """
    if attrs["representation"] != "logmel":
        return
    base = getattr(model, "base", model)
    packed = attrs["front_end"]
    if packed != base.front_end_config:
        differ = [k for k in FRONT_END if packed[k] != base.front_end_config[k]]
        raise GenreflowError(
            f"{path}: its log-mel was made with "
            + ", ".join(f"{k} {packed[k]}" for k in differ)
            + ", the model's front end has "
            + ", ".join(f"{k} {base.front_end_config[k]}" for k in differ)
            + "; pack the features again"
        )
    # Building one draws the STFT's initial weights (overwritten) from torch's generator:
    # the caller's random state (SpecAugment and dropout in training) must not move.
    with torch.random.fork_rng(devices=[]):
        reference = LogmelFrontEnd(**packed).state_dict()
    ours = base.state_dict()
    for key, weight in reference.items():
        difference = float((ours[key].detach().cpu() - weight).abs().max() / weight.abs().max())
        if difference > FRONT_END_TOLERANCE:
            raise GenreflowError(
                f"{path}: its log-mel was made by genreflow's front end, but the model's "
                f"(from its checkpoint) differs in {key} (relative difference "
                f"{difference:.1e}); pack waveforms (--representation waveform) for this model"
            )


def _stored_as(attrs: dict) -> str:
    if attrs["representation"] == "waveform":
        return "int16 waveforms"
    front_end = attrs["front_end"]
    return (
        f"float16 log-mel ({front_end['mel_bins']} mel bins, window {front_end['window_size']}, "
        f"hop {front_end['hop_size']}, {front_end['fmin']}-{front_end['fmax']} Hz)"
    )


def describe(features_path: str | Path) -> str:
    """A few lines on what a packed file holds: clips per genre and fold, audio, origin."""
    names, targets, folds, attrs = read_index(features_path)
    per_genre = np.bincount(targets, minlength=len(GENRES))
    per_fold = Counter(folds.tolist())
    skipped = attrs["skipped"]
    lines = [
        f"{features_path}",
        f"  clips    {len(names)} packed of {attrs.get('clips_found', len(names))} found, "
        f"{len(skipped)} skipped",
        f"  audio    {attrs['sample_rate']} Hz mono, {attrs['clip_seconds']:g} s clips "
        f"({attrs['clip_samples']} samples), stored as {_stored_as(attrs)}",
        "  genres   "
        + ", ".join(f"{g} {c}" for g, c in zip(GENRES, per_genre.tolist(), strict=True)),
        "  folds    " + ", ".join(f"{k}: {per_fold.get(k, 0)}" for k in FOLDS),
    ]
    lines += [f"  skipped  {name}: {reason}" for name, reason in skipped]
    lines.append(f"  source   sha256 {attrs.get('source_sha256') or '(not recorded)'}")
    lines.append(
        f"  made by  genreflow {attrs.get('genreflow_version', '?')} at {attrs.get('created', '?')}"
    )
    return "\n".join(lines)
