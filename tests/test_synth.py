"""The synthetic GTZAN-shaped set: archive layout and format, determinism, and learnability."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile

import numpy as np
import pytest
import soundfile as sf

from genreflow import cli
from genreflow.data import synth
from genreflow.data.genres import GENRES
from genreflow.data.layout import list_clips
from genreflow.data.synth import SAMPLE_RATE, archive, make_synthetic_gtzan, synthesize_clip
from genreflow.errors import GenreflowError

LIST_FILES = {"input.mf", "bextract_single.mf"} | {f"{g[:2]}.mf" for g in GENRES}


def _file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _members(archive) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive, "r:gz") as tar:
        return {
            m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()
        }


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    archive, sha256 = make_synthetic_gtzan(out, clips_per_genre=2, seconds=1.5, seed=3)
    return out, archive, sha256


def test_archive_has_the_original_release_layout(small_set):
    out, archive, sha256 = small_set
    assert archive == out / "genres.tar.gz"
    assert sha256 == _file_sha256(archive)
    assert sorted(p.name for p in out.iterdir()) == ["genres.tar.gz"]  # no temporary left

    members = _members(archive)
    clips = {f"genres/{g}/{g}.{k:05d}.au" for g in GENRES for k in range(2)}
    folders = {"genres"} | {f"genres/{g}" for g in GENRES}
    lists = {f"genres/{name}" for name in LIST_FILES}
    assert set(members) == clips | folders | lists
    assert list(members) == sorted(members)  # written in a fixed, sorted order
    for name, (info, _) in members.items():
        assert info.isdir() == (name in folders)
        assert (info.uid, info.gid, info.mtime) == (0, 0, synth.ARCHIVE_MTIME)


def test_clips_are_22050_hz_mono_16_bit_au_of_the_asked_length(small_set):
    _, archive, _ = small_set
    for name, (_, data) in _members(archive).items():
        if not name.endswith(".au"):
            continue
        info = sf.info(io.BytesIO(data))
        assert (info.format, info.subtype) == ("AU", "PCM_16"), name
        assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 1, 33075), name
        audio, _ = sf.read(io.BytesIO(data), dtype="float32")
        level_db = 20 * np.log10(np.sqrt(np.mean(audio**2)))
        # Every genre in one loudness range (the limiter may take off a little).
        assert synth.LOUDNESS_RANGE_DB[0] - 1.5 < level_db < synth.LOUDNESS_RANGE_DB[1] + 0.1
        assert np.abs(audio).max() < 0.9  # -1 dBFS ceiling, no clipping


def test_extracted_tree_is_what_the_dataset_layout_expects(small_set, tmp_path):
    _, archive, _ = small_set
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    clips = list_clips(tmp_path)  # the .mf lists are not clips
    assert [c.name for c in clips] == sorted(f"{g}.{k:05d}.au" for g in GENRES for k in range(2))
    assert all(c.path.parent.name == c.genre for c in clips)


def test_marsyas_lists_name_every_clip_with_its_label(small_set):
    _, archive, _ = small_set
    members = _members(archive)
    every = [line.split("\t") for line in members["genres/input.mf"][1].decode().splitlines()]
    clip_paths = sorted(name for name in members if name.endswith(".au"))
    assert [path for path, _ in every] == clip_paths
    assert all(path.split("/")[1] == label for path, label in every)
    assert members["genres/bextract_single.mf"][1] == members["genres/input.mf"][1]
    jazz = members["genres/ja.mf"][1].decode().splitlines()
    assert jazz == [f"genres/jazz/jazz.{k:05d}.au\tjazz" for k in range(2)]


def test_gzip_header_carries_no_name_and_no_time(small_set):
    _, archive, _ = small_set
    header = archive.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] & 0x08 == 0  # FNAME flag: no file name stored
    assert header[4:8] == b"\x00\x00\x00\x00"  # MTIME


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_set):
    _, _, sha_seed3 = small_set
    again, sha_again = make_synthetic_gtzan(tmp_path / "a", clips_per_genre=2, seconds=1.5, seed=3)
    assert sha_again == sha_seed3 == _file_sha256(again)
    _, sha_other = make_synthetic_gtzan(tmp_path / "b", clips_per_genre=2, seconds=1.5, seed=4)
    assert sha_other != sha_seed3


def test_worker_processes_write_the_same_bytes(tmp_path, small_set):
    _, _, sha_one_process = small_set
    _, sha_two = make_synthetic_gtzan(tmp_path, clips_per_genre=2, seconds=1.5, seed=3, workers=2)
    assert sha_two == sha_one_process


def test_a_clip_does_not_depend_on_how_many_are_made(small_set):
    _, archive, _ = small_set
    data = _members(archive)["genres/disco/disco.00001.au"][1]
    audio, _ = sf.read(io.BytesIO(data), dtype="int16")
    alone = np.round(synthesize_clip("disco", 1, 1.5, 3) * 32767).astype(np.int16)
    np.testing.assert_array_equal(audio, alone)


def test_names_make_exactly_those_clips(tmp_path, small_set):
    _, full_archive, _ = small_set
    names = ["jazz.00054.au", "blues.00001.au", "rock.00099.au"]
    archive, _ = make_synthetic_gtzan(tmp_path, seconds=1.5, seed=3, names=names)
    members = _members(archive)
    clips = sorted(n for n in members if n.endswith(".au"))
    assert clips == [
        "genres/blues/blues.00001.au",
        "genres/jazz/jazz.00054.au",
        "genres/rock/rock.00099.au",
    ]
    assert {n for n, (m, _) in members.items() if m.isdir()} == {
        "genres",
        "genres/blues",
        "genres/jazz",
        "genres/rock",
    }
    assert members["genres/ja.mf"][1] == b"genres/jazz/jazz.00054.au\tjazz\n"
    assert members["genres/po.mf"][1] == b""
    # blues.00001 is the same clip as in the set made with clips_per_genre.
    same = "genres/blues/blues.00001.au"
    assert members[same][1] == _members(full_archive)[same][1]


@pytest.mark.parametrize(
    "names, problem",
    [
        (["jazz.54.au"], "not of the form"),
        (["polka.00001.au"], "not of the form"),
        (["jazz.00001.wav"], "not of the form"),
        (["genres/jazz/jazz.00001.au"], "not of the form"),
        (["jazz.00001.au", "jazz.00001.au"], "given twice"),
        ([], "empty"),
    ],
)
def test_bad_names_are_refused(tmp_path, names, problem):
    with pytest.raises(GenreflowError, match=problem):
        make_synthetic_gtzan(tmp_path, names=names)
    assert not (tmp_path / "genres.tar.gz").exists()


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"clips_per_genre": 0}, "clips-per-genre"),
        ({"seconds": 0}, "seconds"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, problem):
    with pytest.raises(GenreflowError, match=problem):
        make_synthetic_gtzan(tmp_path, **kwargs)


def test_an_interrupted_run_leaves_no_archive(tmp_path, monkeypatch):
    made = []

    def fail_on_third(clip):
        made.append(clip)
        if len(made) == 3:
            raise KeyboardInterrupt
        return b"\x00"

    monkeypatch.setattr(archive, "_au_bytes", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_gtzan(tmp_path, clips_per_genre=1, seconds=0.2)
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_sha256_of_the_archive(tmp_path, capsys):
    code = cli.main(
        [
            "synth",
            "--out",
            str(tmp_path),
            "--clips-per-genre",
            "1",
            "--seconds",
            "0.5",
            "--seed",
            "7",
        ]
    )
    assert code == 0
    match = re.fullmatch(r"sha256  ([0-9a-f]{64})  (.+)\n", capsys.readouterr().out)
    assert match, "expected one line: sha256  <hex>  <path>"
    assert match[2] == str(tmp_path / "genres.tar.gz")
    assert match[1] == _file_sha256(tmp_path / "genres.tar.gz")


def test_cli_reports_a_bad_argument(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--seconds", "-1"]) == 2
    assert "seconds" in capsys.readouterr().err
    assert not (tmp_path / "genres.tar.gz").exists()


# --- learnable, but not from one number --------------------------------------------------
def _leave_one_out_nearest_centroid(features: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of the nearest class mean, each clip left out of its own class's mean."""
    features = features.reshape(len(labels), -1)
    features = (features - features.mean(0)) / (features.std(0) + 1e-9)
    classes = np.arange(len(GENRES))
    onehot = labels[:, None] == classes[None, :]
    sums, counts = onehot.T @ features, onehot.sum(0)
    # (clip, class, feature): class means, with the clip itself taken out of its own.
    centroids = (sums[None] - onehot[:, :, None] * features[:, None]) / (
        counts[None, :, None] - onehot[:, :, None]
    )
    distances = ((centroids - features[:, None]) ** 2).sum(2)
    return float(np.mean(distances.argmin(1) == labels))


def test_genres_are_learnable_from_the_mel_image_but_not_from_loudness():
    import librosa

    profiles, loudness, labels = [], [], []
    for label, genre in enumerate(GENRES):
        for k in range(8):
            clip = synthesize_clip(genre, k, seconds=3.0, seed=0)
            mel = librosa.feature.melspectrogram(
                y=clip, sr=SAMPLE_RATE, n_fft=1024, hop_length=512, n_mels=40
            )
            log_mel = np.log(mel + 1e-10)
            # Per band: level relative to the clip's, spread over time, frame-to-frame change.
            profiles.append(
                np.concatenate(
                    [
                        log_mel.mean(1) - log_mel.mean(),
                        log_mel.std(1),
                        np.abs(np.diff(log_mel, axis=1)).mean(1),
                    ]
                )
            )
            loudness.append(np.sqrt(np.mean(clip**2)))
            labels.append(label)
    profiles, loudness, labels = np.array(profiles), np.array(loudness), np.array(labels)

    chance = 1 / len(GENRES)
    full = _leave_one_out_nearest_centroid(profiles, labels)
    by_loudness = _leave_one_out_nearest_centroid(loudness, labels)
    best_single = max(
        _leave_one_out_nearest_centroid(profiles[:, j], labels) for j in range(profiles.shape[1])
    )
    assert full >= 0.6, f"mel profile: {full:.2f}"
    assert by_loudness <= chance + 0.15, f"RMS alone: {by_loudness:.2f}"
    assert best_single <= full - 0.2, f"best single feature {best_single:.2f} vs {full:.2f}"
    assert full < 1.0  # genres overlap: a perfect score would mean a trivial set
