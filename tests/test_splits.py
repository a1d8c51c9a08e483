"""The split lists and make_split: which rows train, choose and are reported."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import numpy as np
import pytest

from genreflow.data.genres import GENRES, assign_folds
from genreflow.errors import GenreflowError
from genreflow.splits import (
    CV10_RULE,
    FILTERED_FILE_SHA256,
    PROTOCOLS,
    SELECTIONS,
    clip_id,
    filtered_lists,
    inner_fold,
    make_split,
    split_sha256,
)

# Every GTZAN clip name, as the original release names them, in the seed's fold order.
ALL = sorted(f"{genre}.{k:05d}.au" for genre in GENRES for k in range(100))
FOLD_OF = assign_folds(ALL)
ALL_FOLDS = np.array([FOLD_OF[name] for name in ALL])


def test_the_shipped_lists_are_the_published_split():
    lists = filtered_lists()
    assert {part: len(names) for part, names in lists.items()} == {
        "train": 443,
        "valid": 197,
        "test": 290,
    }
    pattern = re.compile(rf"^({'|'.join(GENRES)})\.\d{{5}}$")
    for part, names in lists.items():
        assert len(set(names)) == len(names), f"{part} repeats a name"
        bad = [name for name in names if not pattern.match(name)]
        assert not bad, f"{part}: {bad[:3]}"
    train, valid, test = (set(lists[part]) for part in ("train", "valid", "test"))
    assert not (train & valid or train & test or valid & test)
    # 930 of GTZAN's 1000 clips; every genre in every part.
    assert len(train | valid | test) == 930
    for names in lists.values():
        assert {name.split(".")[0] for name in names} == set(GENRES)
    # Spot checks against the published lists (torchaudio's gtzan.py).
    assert lists["test"][:2] == ("blues.00012", "blues.00013")
    assert lists["train"][-1] == "rock.00099" and lists["valid"][-1] == "rock.00085"
    assert "classical.00042" not in train | valid | test  # one of the 70 left out


def test_the_list_files_match_their_recorded_checksums():
    data = resources.files("genreflow.data")
    joined = b""
    for part in ("train", "valid", "test"):
        content = data.joinpath(f"filtered_{part}.txt").read_bytes()
        assert hashlib.sha256(content).hexdigest() == FILTERED_FILE_SHA256[part]
        first = content.decode().splitlines()[0]
        assert first.startswith("#") and "Kereliuk" in first and "torchaudio" in first
        joined += content
    assert split_sha256("filtered") == hashlib.sha256(joined).hexdigest()
    assert split_sha256("cv10") == hashlib.sha256(CV10_RULE.encode()).hexdigest()
    assert split_sha256("cv10") != split_sha256("filtered")
    with pytest.raises(GenreflowError, match="--protocol must be one of cv10, filtered"):
        split_sha256("kfold")


@pytest.mark.parametrize("fold", [1, 4, 10])
def test_cv10_validation_holds_back_the_next_fold(fold):
    split = make_split(ALL, ALL_FOLDS, protocol="cv10", fold=fold, selection="validation")
    inner = inner_fold(fold)
    assert inner == (fold % 10) + 1 and (fold != 10 or inner == 1)
    assert set(ALL_FOLDS[split.test]) == {fold}
    assert set(ALL_FOLDS[split.valid]) == {inner}
    assert set(ALL_FOLDS[split.train]) == set(range(1, 11)) - {fold, inner}
    parts = [set(split.train.tolist()), set(split.valid.tolist()), set(split.test.tolist())]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(range(len(ALL)))
    assert not split.valid_is_test
    for rows in (split.train, split.valid, split.test):
        assert rows.dtype == np.int64 and list(rows) == sorted(rows)
    # The folds are stratified, so the validation fold is too: 10 clips of each genre.
    genres = [ALL[row].split(".")[0] for row in split.valid]
    assert all(genres.count(genre) == 10 for genre in GENRES)
    assert split.counts() == {
        "train": 800,
        "valid": 100,
        "test": 100,
        "excluded": 0,
        "missing": 0,
        "excluded_names": [],
        "missing_names": [],
    }
    assert split.seed(7) == 7  # cv10 keeps the seed's seeding


def test_cv10_heldout_chooses_on_the_test_fold_as_the_seed_did():
    split = make_split(ALL, ALL_FOLDS, protocol="cv10", fold=3, selection="heldout")
    assert split.valid_is_test and split.valid is split.test
    assert set(ALL_FOLDS[split.test]) == {3}
    assert set(ALL_FOLDS[split.train]) == set(range(1, 11)) - {3}
    assert len(split.train) + len(split.test) == len(ALL)


def test_filtered_split_matches_names_without_extension_and_counts_the_rest():
    # A packed file as the common copy gives it: .wav names, one clip skipped as unreadable.
    names = [name.replace(".au", ".wav") for name in ALL if name != "jazz.00054.au"]
    folds = np.ones(len(names), dtype=int)  # the filtered protocol ignores folds
    split = make_split(names, folds, protocol="filtered", fold=2, selection="validation")
    lists = filtered_lists()
    assert [clip_id(names[row]) for row in split.train] == sorted(
        name for name in lists["train"] if name != "jazz.00054"
    )
    assert [clip_id(names[row]) for row in split.valid] == sorted(lists["valid"])
    assert [clip_id(names[row]) for row in split.test] == sorted(lists["test"])
    assert split.missing == ("jazz.00054",)
    assert len(split.excluded) == 70 and "classical.00042.wav" in split.excluded
    counts = split.counts()
    assert [counts[k] for k in ("train", "valid", "test", "excluded", "missing")] == [
        442,
        197,
        290,
        70,
        1,
    ]
    assert counts["missing_names"] == ["jazz.00054"]
    assert split.seed(10) == 11  # repetition 2: seed + fold - 1
    heldout = make_split(names, folds, protocol="filtered", fold=1, selection="heldout")
    assert heldout.valid is heldout.test and len(heldout.test) == 290
    assert heldout.seed(10) == 10


def test_clip_ids_drop_folders_and_extensions_only():
    assert clip_id("jazz.00054.wav") == "jazz.00054"
    assert clip_id("genres/jazz/jazz.00054.au") == "jazz.00054"
    assert clip_id("jazz.00054") == "jazz.00054"
    assert clip_id("jazz.54.wav") == "jazz.54.wav"  # not a GTZAN name: kept, matches nothing


def test_bad_arguments_and_empty_parts_are_named():
    with pytest.raises(GenreflowError, match="--protocol must be one of cv10, filtered"):
        make_split(ALL, ALL_FOLDS, protocol="kfold", fold=1)
    with pytest.raises(GenreflowError, match="--selection must be one of validation, heldout"):
        make_split(ALL, ALL_FOLDS, fold=1, selection="test")
    with pytest.raises(GenreflowError, match=r"cv10: --fold must be one of 1..10.*got 11"):
        make_split(ALL, ALL_FOLDS, fold=11)
    with pytest.raises(GenreflowError, match="filtered: --fold is the repetition.*got 0"):
        make_split(ALL, ALL_FOLDS, protocol="filtered", fold=0)

    two_folds = np.arange(len(ALL)) % 2 + 1
    with pytest.raises(
        GenreflowError, match=r"cv10: fold 5 has no clips in f.h5 \(folds present: 1, 2\)"
    ):
        make_split(ALL, two_folds, fold=5, source="f.h5")
    with pytest.raises(GenreflowError, match="validation fold 3 .*after test fold 2.*heldout"):
        make_split(ALL, two_folds, fold=2, source="f.h5")
    with pytest.raises(GenreflowError, match="every clip of f.h5 is in folds 1 and 2"):
        make_split(ALL, two_folds, fold=1, source="f.h5")
    split = make_split(ALL, two_folds, fold=1, selection="heldout")  # the seed's way works
    assert len(split.train) == len(split.test) == 500

    no_test = [name for name in ALL if clip_id(name) not in set(filtered_lists()["test"])]
    with pytest.raises(
        GenreflowError, match="filtered: none of the 290 test-list clips .* are in f.h5"
    ):
        make_split(no_test, np.ones(len(no_test)), protocol="filtered", fold=1, source="f.h5")
    only_test = [name for name in ALL if clip_id(name) in set(filtered_lists()["test"])]
    with pytest.raises(GenreflowError, match="none of the 443 train-list clips"):
        make_split(only_test, np.ones(len(only_test)), protocol="filtered", fold=1)
    with pytest.raises(GenreflowError, match="holds the clip blues.00012 twice"):
        make_split([*ALL, "blues.00012.wav"], np.ones(len(ALL) + 1), protocol="filtered", fold=1)
    with pytest.raises(GenreflowError, match="3 clip names but a fold column"):
        make_split(ALL[:3], np.ones(2), fold=1)


def test_protocol_and_selection_names_are_the_contract():
    assert PROTOCOLS == ("cv10", "filtered")
    assert SELECTIONS == ("validation", "heldout")
