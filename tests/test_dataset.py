"""The dataset contract: every layout recognised, GTZAN exactly as before, folds, bad input."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from genreflow.data.dataset import (
    DEFAULT_FOLDS,
    GTZAN_FOLDS_SOURCE,
    read_dataset,
    stratified_folds,
)
from genreflow.data.genres import GENRE_INDEX, GENRES, assign_folds
from genreflow.data.layout import list_clips
from genreflow.errors import GenreflowError
from genreflow.splits import filtered_lists, make_split

ESC50_HEADER = "filename,fold,target,category,esc10,src_file,take"
URBANSOUND8K_HEADER = "slice_file_name,fsID,start,end,salience,fold,classID,class"


def write_clip(path: Path, k: int = 0) -> Path:
    """A real, short clip: 50 ms of a tone, as .au, .wav or .flac by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = 8000
    t = np.arange(rate // 20) / rate
    tone = (0.3 * np.sin(2 * np.pi * (220 + 10 * k) * t)).astype(np.float32)
    fmt = {".au": "AU", ".wav": "WAV", ".flac": "FLAC"}[path.suffix]
    soundfile.write(path, tone, rate, format=fmt, subtype="PCM_16")
    return path


def make_gtzan(folder: Path, per_genre: int = 3, suffix: str = ".au") -> Path:
    """GTZAN's names and the release's stray .mf lists (one per genre, input.mf)."""
    for genre in GENRES:
        for k in range(per_genre):
            write_clip(folder / genre / f"{genre}.{k:05d}{suffix}", k)
        (folder / genre / f"{genre[:2]}.mf").write_text(f"{genre}.00000{suffix}\t{genre}\n")
    (folder / "input.mf").write_text("stray list\n")
    return folder


def make_class_folders(root: Path, sizes: dict[str, int]) -> Path:
    for label, n in sizes.items():
        for k in range(n):
            write_clip(root / label / f"{label}-{k:03d}.wav", k)
    return root


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# ESC-50's real targets for three of its classes: the order is the target's, not the names'.
ESC50_CLASSES = {0: "dog", 10: "rain", 20: "crying_baby"}


def make_esc50(root: Path, per_class_and_fold: int = 1) -> Path:
    """ESC-50 as its archive extracts: ESC-50-master/{audio,meta/esc50.csv}, 5 folds."""
    top = root / "ESC-50-master"
    rows = []
    for target, category in ESC50_CLASSES.items():
        for fold in range(1, 6):
            for take in "ABCDEFGH"[:per_class_and_fold]:
                source = 100000 + 1000 * target + fold
                name = f"{fold}-{source}-{take}-{target}.wav"
                write_clip(top / "audio" / name, fold)
                esc10 = "True" if target in (0, 10, 20) else "False"
                rows.append(f"{name},{fold},{target},{category},{esc10},{source},{take}")
    write_csv(top / "meta" / "esc50.csv", ESC50_HEADER, rows)
    (top / "README.md").write_text("ESC-50\n")
    return root


US8K_CLASSES = {1: "car_horn", 3: "dog_bark"}


def make_urbansound8k(root: Path) -> Path:
    """UrbanSound8K as its archive extracts: audio/fold1..fold10 and metadata/, 10 folds."""
    top = root / "UrbanSound8K"
    rows = []
    for class_id, name in US8K_CLASSES.items():
        for fold in range(1, 11):
            fs_id = 7000 + 100 * class_id + fold
            slice_name = f"{fs_id}-{class_id}-0-0.wav"
            write_clip(top / "audio" / f"fold{fold}" / slice_name, fold)
            rows.append(f"{slice_name},{fs_id},0.0,0.05,1,{fold},{class_id},{name}")
    write_csv(top / "metadata" / "UrbanSound8K.csv", URBANSOUND8K_HEADER, rows)
    (top / "audio" / "fold1" / ".DS_Store").write_bytes(b"\0")
    return root


def fold_sizes(labels: dict[str, int], fold_of: dict[str, int], label: int | None = None):
    return Counter(fold_of[n] for n, lab in labels.items() if label is None or lab == label)


# -- GTZAN: exactly as before -------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, suffix",
    [("genres", ".au"), ("genres_original", ".wav"), ("Data/genres_original", ".wav"), ("", ".au")],
)
def test_gtzan_in_every_layout_reads_as_list_clips_and_the_seeds_folds(tmp_path, layout, suffix):
    root = make_gtzan(tmp_path / layout, suffix=suffix)
    dataset = read_dataset(tmp_path)
    assert dataset.kind == "gtzan" and dataset.root == root
    assert dataset.classes == GENRES
    before = list_clips(tmp_path)  # what pack reads today
    assert [(c.name, c.label, c.path) for c in dataset.clips] == [
        (c.name, GENRE_INDEX[c.genre], c.path) for c in before
    ]
    seed_folds = assign_folds(c.name for c in before)
    assert [c.fold for c in dataset.clips] == [seed_folds[c.name] for c in dataset.clips]
    assert dataset.folds == 10 and dataset.folds_source == GTZAN_FOLDS_SOURCE
    assert dataset.ignored == ((".mf", 11),)  # input.mf and one list per genre
    assert "ignored 11 entries that are not clips (.mf 11)" in dataset.summary()
    assert read_dataset(tmp_path, folds=10) == dataset


def test_gtzan_at_full_size_keeps_the_seeds_folds_and_the_published_split(tmp_path):
    make_gtzan(tmp_path / "genres", per_genre=100)
    dataset = read_dataset(tmp_path)
    names = [c.name for c in dataset.clips]
    assert names == sorted(f"{g}.{k:05d}.au" for g in GENRES for k in range(100))
    folds = np.array([c.fold for c in dataset.clips])
    assert folds.tolist() == [i % 10 + 1 for i in range(1000)]
    # fold K holds 10 clips of each genre, as the seed's rule gives on the full set
    for fold in range(1, 11):
        labels = Counter(c.label for c in dataset.clips if c.fold == fold)
        assert labels == {label: 10 for label in range(10)}
    split = make_split(names, folds, protocol="filtered", fold=1, selection="validation")
    lists = filtered_lists()
    assert (len(split.train), len(split.valid), len(split.test)) == (443, 197, 290)
    assert split.missing == () and len(split.excluded) == 70
    assert sorted(names[row][: -len(".au")] for row in split.test) == sorted(lists["test"])
    cv10 = make_split(names, folds, protocol="cv10", fold=4, selection="validation")
    assert set(folds[cv10.test]) == {4} and set(folds[cv10.valid]) == {5}


def test_gtzan_keeps_its_ten_folds_and_its_checks(tmp_path):
    make_gtzan(tmp_path / "genres")
    with pytest.raises(GenreflowError, match=r"GTZAN's folds are the seed's 10; folds=5"):
        read_dataset(tmp_path, folds=5)
    shutil.rmtree(tmp_path / "genres" / "country")
    with pytest.raises(GenreflowError, match="country: genre folder missing"):
        read_dataset(tmp_path)


def test_gtzan_names_in_two_genre_folders_are_refused(tmp_path):
    make_gtzan(tmp_path / "genres")
    twin = write_clip(tmp_path / "genres" / "rock" / "blues.00001.au")
    with pytest.raises(GenreflowError) as caught:
        read_dataset(tmp_path)
    assert str(caught.value) == (
        f"{twin}: blues.00001.au is in two classes, 'blues' "
        f"({tmp_path / 'genres' / 'blues' / 'blues.00001.au'}) and 'rock'"
    )


def test_genre_folders_beside_another_class_folder_are_class_folders(tmp_path):
    make_gtzan(tmp_path, per_genre=5)
    make_class_folders(tmp_path, {"techno": 5})
    dataset = read_dataset(tmp_path)
    assert dataset.kind == "class-folders"
    assert dataset.classes == tuple(sorted((*GENRES, "techno")))
    assert dataset.folds_source == "stratified 5-fold, seed 0"


# -- the other layouts --------------------------------------------------------------------


def test_class_folders_sorted_stratified_and_non_audio_counted(tmp_path):
    root = make_class_folders(tmp_path / "own", {"snare": 7, "Kick": 11, "hi-hat 2": 5})
    (root / "snare" / "cover.png").write_bytes(b"\x89PNG")
    (root / "Kick" / "notes.csv").write_text("bpm,take\n120,1\n")
    (root / "Kick" / "takes").mkdir()
    (root / "README").write_text("drum hits\n")
    (root / ".git").mkdir()
    (root / "__MACOSX").mkdir()
    dataset = read_dataset(root)
    assert dataset.kind == "class-folders" and dataset.root == root
    assert dataset.classes == ("Kick", "hi-hat 2", "snare")  # sorted by name
    assert dataset.folds == DEFAULT_FOLDS == 5
    assert dataset.folds_source == "stratified 5-fold, seed 0"
    assert len(dataset.clips) == 23 and len({c.name for c in dataset.clips}) == 23
    for clip in dataset.clips:
        assert clip.path == root / dataset.classes[clip.label] / clip.name
    assert dict(dataset.ignored) == {"": 1, ".csv": 1, ".png": 1, "(folder)": 3}
    labels = {c.name: c.label for c in dataset.clips}
    fold_of = {c.name: c.fold for c in dataset.clips}
    for label in range(3):
        sizes = fold_sizes(labels, fold_of, label)
        assert set(sizes) == {1, 2, 3, 4, 5} and max(sizes.values()) - min(sizes.values()) <= 1
    again = read_dataset(root)
    assert again == dataset and again.fingerprint == dataset.fingerprint
    assert read_dataset(root, folds=4).fingerprint != dataset.fingerprint
    assert read_dataset(root, seed=1).fingerprint != dataset.fingerprint
    # the fingerprint is the data's, not its place
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert read_dataset(moved).fingerprint == dataset.fingerprint


def test_manifest_without_folds_anywhere_in_the_tree(tmp_path):
    rows = []
    for label, n in (("speech", 6), ("music", 5)):
        for k in range(n):
            relative = f"clips/{label}/{label}{k}.wav" if k % 2 else f"{label}{k}.flac"
            write_clip(tmp_path / relative, k)
            rows.append(f"{relative}, {label}")
    write_clip(tmp_path / "clips" / "speech" / "unlisted.wav")
    (tmp_path / "clips" / "music" / "cover.jpg").write_bytes(b"\xff\xd8")
    manifest = write_csv(tmp_path / "labels.csv", " File_Name , CLASS ", rows)
    dataset = read_dataset(tmp_path, folds=3, seed=7)
    assert dataset.kind == "manifest" and dataset.root == tmp_path
    assert dataset.classes == ("music", "speech")
    assert dataset.folds == 3 and dataset.folds_source == "stratified 3-fold, seed 7"
    assert {c.name: c.path for c in dataset.clips}["speech1.wav"] == (
        tmp_path / "clips" / "speech" / "speech1.wav"
    )
    assert dict(dataset.ignored) == {".wav": 1, ".jpg": 1}  # the manifest itself is no entry
    assert read_dataset(tmp_path, folds=3, seed=7).fingerprint == dataset.fingerprint
    manifest.write_text(manifest.read_text().replace("music4.flac, music", "music4.flac, speech"))
    assert read_dataset(tmp_path, folds=3, seed=7).fingerprint != dataset.fingerprint


def test_manifest_folds_are_kept_as_given(tmp_path):
    rows = [f"a{k}.wav,{'ab'[k % 2]},{k % 3 + 1}" for k in range(12)]
    for k in range(12):
        write_clip(tmp_path / f"a{k}.wav", k)
    write_csv(tmp_path / "meta.csv", "filename,label,fold", rows)
    dataset = read_dataset(tmp_path)
    assert dataset.folds == 3 and dataset.folds_source == "given by meta.csv"
    assert {c.name: c.fold for c in dataset.clips} == {f"a{k}.wav": k % 3 + 1 for k in range(12)}
    assert read_dataset(tmp_path, folds=3) == dataset
    with pytest.raises(GenreflowError) as caught:
        read_dataset(tmp_path, folds=5)
    assert str(caught.value) == (
        f"{tmp_path / 'meta.csv'}: gives 3 folds; folds=5 asks for another number "
        "(leave it unset to keep the given folds)"
    )


def test_esc50_as_it_comes_ordered_by_target(tmp_path):
    make_esc50(tmp_path, per_class_and_fold=2)
    top = tmp_path / "ESC-50-master"
    dataset = read_dataset(tmp_path)  # through the archive's top folder
    assert dataset.kind == "esc50" and dataset.root == top
    assert dataset.classes == ("dog", "rain", "crying_baby")  # by target 0, 10, 20
    assert dataset.folds == 5 and dataset.folds_source == "given by meta/esc50.csv"
    for clip in dataset.clips:
        fold, _, _, target = clip.name[: -len(".wav")].split("-")
        assert clip.fold == int(fold)
        assert dataset.classes[clip.label] == ESC50_CLASSES[int(target)]
        assert clip.path == top / "audio" / clip.name
    assert len(dataset.clips) == 30 and dataset.ignored == ()
    assert read_dataset(top) == dataset


def test_urbansound8k_as_it_comes(tmp_path):
    make_urbansound8k(tmp_path)
    top = tmp_path / "UrbanSound8K"
    dataset = read_dataset(tmp_path)
    assert dataset.kind == "urbansound8k" and dataset.root == top
    assert dataset.classes == ("car_horn", "dog_bark")  # classID 1, 3
    assert dataset.folds == 10 and dataset.folds_source == "given by metadata/UrbanSound8K.csv"
    for clip in dataset.clips:
        assert clip.path == top / "audio" / f"fold{clip.fold}" / clip.name
        assert dataset.classes[clip.label] == US8K_CLASSES[int(clip.name.split("-")[1])]
    assert dict(dataset.ignored) == {"": 1}  # the .DS_Store in fold1
    with pytest.raises(GenreflowError) as caught:
        read_dataset(top / "audio")  # its fold folders are no classes
    assert str(caught.value) == (
        f"{top / 'audio'}: its folders fold1, fold2, ... are UrbanSound8K's folds, not classes: "
        "give the folder that holds audio/ and metadata/UrbanSound8K.csv"
    )


# -- stratified folds ---------------------------------------------------------------------


def test_stratified_folds_are_balanced_per_class_and_overall():
    labels = {
        f"c{label}-{k:03d}.wav": label for label, n in enumerate((23, 7, 50, 5)) for k in range(n)
    }
    for k in (2, 5, 7):
        fold_of = stratified_folds(labels, k, seed=3)
        assert set(fold_of) == set(labels) and set(fold_of.values()) == set(range(1, k + 1))
        for label in range(4):
            sizes = fold_sizes(labels, fold_of, label)
            counts = [sizes[f] for f in range(1, k + 1)]
            assert max(counts) - min(counts) <= 1, (k, label, counts)
        overall = [fold_sizes(labels, fold_of)[f] for f in range(1, k + 1)]
        assert max(overall) - min(overall) <= 1


def test_stratified_folds_depend_on_the_seed_and_the_names_only():
    labels = {f"clip{k:02d}.wav": k % 2 for k in range(11)}
    fold_of = stratified_folds(labels, 4, seed=0)
    # Pinned (worked out by hand from sha256("0\n" + name)): the same on every machine,
    # Python and numpy. Class 0's six clips take folds 1 2 3 4 1 2 in that order, and
    # class 1's five go on from fold 3: 3 4 1 2 3.
    assert fold_of == {
        "clip00.wav": 2,
        "clip01.wav": 1,
        "clip02.wav": 4,
        "clip03.wav": 2,
        "clip04.wav": 2,
        "clip05.wav": 3,
        "clip06.wav": 3,
        "clip07.wav": 4,
        "clip08.wav": 1,
        "clip09.wav": 3,
        "clip10.wav": 1,
    }
    shuffled = dict(reversed(list(labels.items())))
    assert stratified_folds(shuffled, 4, seed=0) == fold_of
    assert stratified_folds(labels, 4, seed=1) != fold_of


# -- bad input: one line each, naming the file and the problem -----------------------------


def bad_class_folders(root: Path) -> Path:
    return make_class_folders(root, {"dog": 5, "cat": 5})


def bad_manifest(root: Path, rows: list[str], header: str = "filename,label") -> Path:
    for k in range(5):
        write_clip(root / f"dog{k}.wav", k)
        write_clip(root / f"cat{k}.wav", k)
    return write_csv(root / "labels.csv", header, rows)


GOOD_ROWS = [f"{label}{k}.wav,{label}" for label in ("dog", "cat") for k in range(5)]
GOOD_FOLD_ROWS = [
    f"{label}{k}.wav,{label},{k % 2 + 1}" for label in ("dog", "cat") for k in range(5)
]


def one_class(root):
    make_class_folders(root, {"dog": 6})
    return f"{root}: one class only (dog); a classifier needs at least two"


def too_few_clips(root):
    make_class_folders(root, {"dog": 6, "cat": 3})
    return f"{root / 'cat'}: class 'cat' has 3 clips, fewer than the 5 folds"


def missing_file(root):
    manifest = bad_manifest(root, [*GOOD_ROWS, "gone.wav,dog"])
    return f"{manifest}: line 12: 'gone.wav': no such file in {root}"


def in_two_classes_manifest(root):
    manifest = bad_manifest(root, [*GOOD_ROWS, "dog3.wav,cat"])
    return f"{manifest}: line 12: dog3.wav is in two classes, 'dog' ({manifest}: line 5) and 'cat'"


def in_two_classes_folders(root):
    bad_class_folders(root)
    twin = write_clip(root / "dog" / "cat-002.wav")
    return (
        f"{twin}: cat-002.wav is in two classes, 'cat' ({root / 'cat' / 'cat-002.wav'}) and 'dog'"
    )


def listed_twice(root):
    manifest = bad_manifest(root, [*GOOD_ROWS, "cat1.wav,cat"])
    return f"{manifest}: line 12: cat1.wav is listed twice (also at {manifest}: line 8)"


def two_files_one_name(root):
    write_clip(root / "more" / "dog1.wav")
    manifest = bad_manifest(root, [*GOOD_ROWS, "more/dog1.wav,dog"])
    return (
        f"{manifest}: line 12: dog1.wav is the name of two files (also {root / 'dog1.wav'}); "
        "clip names must be unique"
    )


def fold_gap(root):
    rows = [row.replace(",2", ",3") for row in GOOD_FOLD_ROWS]
    manifest = bad_manifest(root, rows, "filename,label,fold")
    return f"{manifest}: folds 1, 3 given: fold 2 has no clip (folds are 1..K with none left out)"


def fold_not_whole(root):
    rows = [*GOOD_FOLD_ROWS[:3], "dog3.wav,dog,1.5", *GOOD_FOLD_ROWS[4:]]
    manifest = bad_manifest(root, rows, "filename,label,fold")
    return f"{manifest}: line 5: fold '1.5' is not a whole number from 1"


def fold_zero(root):
    rows = [row.replace(",2", ",0") for row in GOOD_FOLD_ROWS]
    manifest = bad_manifest(root, rows, "filename,label,fold")
    return f"{manifest}: line 3: fold '0' is not a whole number from 1"


def fold_missing(root):
    rows = [*GOOD_FOLD_ROWS[:9], "cat4.wav,cat,"]
    manifest = bad_manifest(root, rows, "filename,label,fold")
    return f"{manifest}: line 11: fold '' is not a whole number from 1"


def label_with_colon(root):
    manifest = bad_manifest(root, [row.replace(",cat", ",cat:wild") for row in GOOD_ROWS])
    return (
        f"{manifest}: line 7: label 'cat:wild' refused: a label holds only ASCII letters, "
        "digits, _ - . and spaces, starts with a letter or digit, does not end in . or a "
        "space, and is at most 100 characters (labels name files and MLflow keys)"
    )


def label_with_slash(root):
    manifest = bad_manifest(root, [row.replace(",dog", ",dog/puppy") for row in GOOD_ROWS])
    return f"{manifest}: line 2: label 'dog/puppy' refused: a label holds only"


def folder_label_unsafe(root):
    make_class_folders(root, {"dog": 5, "über": 5})
    return f"{root / 'über'}: label 'über' refused: a label holds only"


def labels_differ_in_case(root):
    make_class_folders(root, {"dog": 5, "Dog": 5})
    return f"{root}: the labels 'Dog' and 'dog' differ only in case"


def empty_class_folder(root):
    bad_class_folders(root)
    (root / "bird").mkdir()
    (root / "bird" / "photo.png").write_bytes(b"\x89PNG")
    return f"{root / 'bird'}: an empty class folder (no audio files directly in it)"


def escaping_path(root):
    write_clip(root.parent / "outside.wav")
    manifest = bad_manifest(root, [*GOOD_ROWS, "../outside.wav,dog"])
    return f"{manifest}: line 12: '../outside.wav' is not a path inside {root}"


def not_audio_listed(root):
    (root / "notes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("x")
    manifest = bad_manifest(root, [*GOOD_ROWS, "notes.txt,dog"])
    return f"{manifest}: line 12: 'notes.txt' is not an audio file (expected .aif, .aiff, .au"


def esc50_target_two_classes(root):
    make_esc50(root)
    csv_path = root / "ESC-50-master" / "meta" / "esc50.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = lines[2].replace(",0,dog,", ",0,puppy,")
    csv_path.write_text("\n".join(lines) + "\n")
    return (
        f"{csv_path}: line 3: target 0 is 'puppy' here and 'dog' at line 2 "
        "(target and category must match one to one)"
    )


def esc50_class_two_targets(root):
    make_esc50(root)
    csv_path = root / "ESC-50-master" / "meta" / "esc50.csv"
    lines = csv_path.read_text().splitlines()
    lines[-1] = lines[-1].replace(",20,crying_baby,", ",21,crying_baby,")
    csv_path.write_text("\n".join(lines) + "\n")
    return (
        f"{csv_path}: line 16: 'crying_baby' has target 21 here and 20 at line 12 "
        "(target and category must match one to one)"
    )


def urbansound8k_missing_clip(root):
    make_urbansound8k(root)
    top = root / "UrbanSound8K"
    (top / "audio" / "fold4" / "7304-3-0-0.wav").unlink()
    return (
        f"{top / 'metadata' / 'UrbanSound8K.csv'}: line 15: 'audio/fold4/7304-3-0-0.wav': "
        f"no such file in {top}"
    )


def manifest_short_row(root):
    manifest = bad_manifest(root, [*GOOD_ROWS[:4], "dog4.wav", *GOOD_ROWS[5:]])
    return f"{manifest}: line 6: 1 field where the header has 2"


def two_manifests(root):
    bad_manifest(root, GOOD_ROWS)
    write_csv(root / "more.csv", "file,class", GOOD_ROWS)
    return f"{root}: more than one manifest (labels.csv, more.csv); keep one"


def urbansound8k_without_class_ids(root):
    make_urbansound8k(root)
    csv_path = root / "UrbanSound8K" / "metadata" / "UrbanSound8K.csv"
    csv_path.write_text(csv_path.read_text().replace(",classID,", ",class_id,"))
    return (
        f"{csv_path}: no 'classID' column (its header: slice_file_name, fsID, start, end, "
        "salience, fold, class_id, class)"
    )


def repeated_column(root):
    manifest = bad_manifest(root, [f"{row},x" for row in GOOD_ROWS], "filename,label,Label")
    return f"{manifest}: more than one label column (label, Label); keep one"


BAD_INPUTS = [
    one_class,
    too_few_clips,
    missing_file,
    in_two_classes_manifest,
    in_two_classes_folders,
    listed_twice,
    two_files_one_name,
    fold_gap,
    fold_not_whole,
    fold_zero,
    fold_missing,
    label_with_colon,
    label_with_slash,
    folder_label_unsafe,
    labels_differ_in_case,
    empty_class_folder,
    escaping_path,
    not_audio_listed,
    esc50_target_two_classes,
    esc50_class_two_targets,
    urbansound8k_missing_clip,
    manifest_short_row,
    two_manifests,
    urbansound8k_without_class_ids,
    repeated_column,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda make: make.__name__)
def test_bad_input_is_one_line_naming_the_file_and_the_problem(tmp_path, make):
    root = tmp_path / "data"
    root.mkdir()
    expected = make(root)
    with pytest.raises(GenreflowError) as caught:
        read_dataset(root)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_nothing_recognised_says_what_was_looked_for(tmp_path):
    top = tmp_path / "export"
    write_clip(top / "takes" / "day1" / "loose.wav")  # clips two folders down are no classes
    write_csv(tmp_path / "notes.csv", "bpm,key", ["120,A"])
    with pytest.raises(GenreflowError) as caught:
        read_dataset(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}: no dataset recognised in {tmp_path} and {top}; looked for GTZAN's genre "
        "folders (in ., genres/, genres_original/, Data/genres_original/), ESC-50 "
        "(meta/esc50.csv and audio/), UrbanSound8K (metadata/UrbanSound8K.csv and audio/), a "
        "manifest (a .csv at the top with a file column, filename or file_name or file or "
        "path, and a label column, label or class or category) and class folders (folders of audio "
        "files); notes.csv: no file and label columns in the header"
    )


def test_folds_setting_is_checked(tmp_path):
    bad_class_folders(tmp_path)
    for folds in (1, 0, 2.5, True, "5"):
        with pytest.raises(GenreflowError, match=re.escape(f"got {folds!r}")):
            read_dataset(tmp_path, folds=folds)
    assert read_dataset(tmp_path, folds=2).folds == 2


def test_a_path_that_is_no_folder(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(GenreflowError, match=re.escape(f"{archive}: not a folder")):
        read_dataset(archive)
