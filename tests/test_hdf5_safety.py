"""HDF5 files that reach beyond themselves, and names that are paths, are refused by both
readers (a packed features file, an embeddings file), and no message quotes what such a
file would have read.

Each crafted file is built for real with h5py: a dataset whose bytes are HDF5 external
storage in a file that holds a fake secret (as /proc/self/environ would), a virtual dataset
mapping another file, a soft link, an external link.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from genreflow.data.genres import GENRES
from genreflow.embedding import read_embeddings
from genreflow.errors import GenreflowError
from genreflow.features import read_index

SECRET = "MLFLOW_TRACKING_PASSWORD=s3cr3t-hunter2"
CLIPS, CLIP_SAMPLES, EMBEDDING_SIZE = 4, 320, 2048
NAMES = [f"{genre}.00000.au" for genre in GENRES[:CLIPS]]


def _contents(kind: str) -> dict[str, np.ndarray]:
    """The datasets of a well-formed file of `kind` ("features" or "embeddings")."""
    target = np.eye(len(GENRES), dtype=np.float32)[:CLIPS]
    data = {
        "audio_name": np.array([n.encode() for n in NAMES]),
        "target": target,
        "fold": np.arange(1, CLIPS + 1, dtype=np.int32),
    }
    if kind == "features":
        data["waveform"] = np.zeros((CLIPS, CLIP_SAMPLES), dtype=np.int16)
    else:
        data["embedding"] = np.ones((CLIPS, EMBEDDING_SIZE), dtype=np.float32)
    return data


def _write(path: Path, kind: str, *, skip: str = "", names=None) -> h5py.File:
    """A well-formed file of `kind`, open for the caller to add `skip` (left out) its own
    way; `names` replaces audio_name's rows."""
    hf = h5py.File(path, "w")
    data = _contents(kind)
    if names is not None:
        data["audio_name"] = np.array(names, dtype=object)
    for name, values in data.items():
        if name == skip:
            continue
        dtype = h5py.string_dtype() if values.dtype == object else None
        hf.create_dataset(name, data=values, dtype=dtype)
    hf.attrs["genres"] = list(GENRES)
    if kind == "features":
        hf.attrs.update(
            representation="waveform",
            sample_rate=32000,
            clip_samples=CLIP_SAMPLES,
            clip_seconds=CLIP_SAMPLES / 32000,
        )
    else:
        hf.attrs["base_sha256"] = "0" * 64
    return hf


READERS = {"features": read_index, "embeddings": read_embeddings}


@pytest.fixture
def secret_file(tmp_path) -> Path:
    """A file of NUL-separated variables, as /proc/self/environ reads."""
    path = tmp_path / "environ"
    path.write_bytes(b"\0".join([b"HOME=/root", SECRET.encode(), b"PATH=/usr/bin"]) * 8)
    return path


@pytest.mark.parametrize("kind", READERS)
def test_a_well_formed_file_reads(tmp_path, kind):
    """The control: the files below differ from this one only in what they craft."""
    path = tmp_path / f"{kind}.h5"
    _write(path, kind).close()
    result = READERS[kind](path)
    names = result[0] if kind == "features" else result.names
    assert list(names) == NAMES


@pytest.mark.parametrize("kind", READERS)
def test_external_storage_is_refused_without_reading_it(tmp_path, kind, secret_file):
    path = tmp_path / f"{kind}.h5"
    with _write(path, kind, skip="audio_name") as hf:
        hf.create_dataset(
            "audio_name",
            shape=(CLIPS,),
            dtype="S40",
            external=[(str(secret_file), 0, h5py.h5f.UNLIMITED)],
        )
    with pytest.raises(GenreflowError) as err:
        READERS[kind](path)
    message = str(err.value)
    assert message == f"{path}: dataset 'audio_name' uses external storage; refused"
    assert "s3cr3t" not in message and "MLFLOW" not in message


@pytest.mark.parametrize("kind", READERS)
def test_external_storage_anywhere_in_the_file_is_refused(tmp_path, kind, secret_file):
    """Not only the datasets a reader reads: any dataset, in any group."""
    path = tmp_path / f"{kind}.h5"
    with _write(path, kind) as hf:
        hf.create_group("extra").create_dataset(
            "notes", shape=(8,), dtype="S40", external=[(str(secret_file), 0, 320)]
        )
    with pytest.raises(GenreflowError, match=r"dataset 'extra/notes' uses external storage"):
        READERS[kind](path)


@pytest.mark.parametrize("kind", READERS)
def test_a_virtual_dataset_is_refused(tmp_path, kind):
    """audio_name mapped from another file: well-formed rows, yet not in this file."""
    elsewhere = tmp_path / "elsewhere.h5"
    with h5py.File(elsewhere, "w") as other:
        other.create_dataset("names", data=np.array([n.encode() for n in NAMES]))
    path = tmp_path / f"{kind}.h5"
    with _write(path, kind, skip="audio_name") as hf:
        layout = h5py.VirtualLayout(shape=(CLIPS,), dtype="S14")
        layout[:] = h5py.VirtualSource(str(elsewhere), "names", shape=(CLIPS,))
        hf.create_virtual_dataset("audio_name", layout)
    with pytest.raises(GenreflowError) as err:
        READERS[kind](path)
    assert str(err.value) == (
        f"{path}: dataset 'audio_name' is virtual (its data is in other files); refused"
    )


@pytest.mark.parametrize("kind", READERS)
def test_a_soft_link_is_refused(tmp_path, kind):
    path = tmp_path / f"{kind}.h5"
    with _write(path, kind) as hf:
        hf["fold"].attrs["note"] = "the link below points here"
        hf.move("fold", "hidden_fold")
        hf["fold"] = h5py.SoftLink("/hidden_fold")
    with pytest.raises(GenreflowError) as err:
        READERS[kind](path)
    assert str(err.value) == f"{path}: 'fold' is a soft link; refused"


@pytest.mark.parametrize("kind", READERS)
def test_an_external_link_is_refused(tmp_path, kind):
    elsewhere = tmp_path / "elsewhere.h5"
    with h5py.File(elsewhere, "w") as other:
        other.create_dataset("fold", data=np.arange(1, CLIPS + 1, dtype=np.int32))
    path = tmp_path / f"{kind}.h5"
    with _write(path, kind, skip="fold") as hf:
        hf["fold"] = h5py.ExternalLink(str(elsewhere), "/fold")
    with pytest.raises(GenreflowError) as err:
        READERS[kind](path)
    assert str(err.value) == f"{path}: 'fold' is an external link to another file; refused"


@pytest.mark.parametrize("kind", READERS)
@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../../etc/passwd", "is a path, not a file name"),
        ("../../etc/passwd.au", "is a path, not a file name"),
        ("..\\blues.00001.au", "is a path, not a file name"),
        (".hidden.au", "is a path, not a file name"),
        ("blues.00001.au\nfold 3: reused", "holds a control character or line break"),
        ("blues\u202e.00001.au", "holds a control character or line break"),
        ("blues\u2028.00001.au", "holds a control character or line break"),
        ("", "is empty"),
    ],
)
def test_a_name_that_is_no_clip_file_name_is_refused(tmp_path, kind, name, problem):
    path = tmp_path / f"{kind}.h5"
    _write(path, kind, names=[*NAMES[:2], name, NAMES[3]]).close()
    with pytest.raises(GenreflowError) as err:
        READERS[kind](path)
    message = str(err.value)
    assert message.startswith(f"{path}: audio_name row 2: ")
    assert problem in message
    assert "\n" not in message and "\u202e" not in message and "\u2028" not in message


@pytest.mark.parametrize("kind", READERS)
def test_a_refused_row_is_shown_only_as_a_short_escaped_prefix(tmp_path, kind):
    """A row is named by its number; of its bytes at most a prefix, escaped (a terminal's
    escape sequence arrives as text)."""
    row = "blues\x1b[2J" + "x" * 60 + SECRET + "y" * 10_000 + ".au"
    path = tmp_path / f"{kind}.h5"
    _write(path, kind, names=[NAMES[0], row, *NAMES[2:]]).close()
    with pytest.raises(GenreflowError) as err:
        READERS[kind](path)
    message = str(err.value)
    assert message.startswith(f"{path}: audio_name row 1: ")
    assert "\x1b" not in message and "\\x1b[2J" in message
    assert "s3cr3t" not in message and len(message) < len(str(path)) + 200
