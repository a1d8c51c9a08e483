"""Which clips train, which choose the checkpoint, which are reported: decided here only.

Two protocols:

- `cv10`, the seed's: the packed file's folds (names sorted, fold = index mod 10 + 1);
  fold K is the test fold. GTZAN repeats artists across folds and holds duplicates and
  mislabelled clips, so these numbers are optimistic; they compare with the seed's.
- `filtered`, the fault-filtered split of Kereliuk, Sturm and Larsen (2015): 443 training,
  197 validation and 290 test clips, artist-disjoint, with the duplicates and mislabels
  left out (70 clips in no list). The lists ship in genreflow/data/filtered_*.txt, as
  published in torchaudio's GTZAN module (pytorch/audio torchaudio/datasets/gtzan.py),
  which took them from jordipons/sklearn-audio-transfer-learning. Here `fold` is the
  repetition number (1, 2, ...): every repetition trains on the same lists, and the
  caller seeds it with seed + fold - 1 (`Split.seed`), so repetitions differ only by seed.

Two ways to choose the checkpoint (model selection):

- `validation` (default): on data that is neither trained on nor reported. cv10 holds
  back a whole training fold, the inner fold `fold % 10 + 1` (folds are stratified by
  genre, so it is too) and trains on the other 8; filtered uses the validation list.
- `heldout`: on the test rows themselves, as the seed did (it watched the held-out fold's
  accuracy while training and kept the best). Optimistic; there to compare with the seed's
  numbers and with papers that chose on the test list.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

from genreflow.data.genres import FOLDS
from genreflow.errors import GenreflowError

PROTOCOLS = ("cv10", "filtered")
SELECTIONS = ("validation", "heldout")
DEFAULT_PROTOCOL, DEFAULT_SELECTION = "cv10", "validation"
FILTERED_PARTS = ("train", "valid", "test")

# sha256 of genreflow/data/filtered_{part}.txt as shipped: a corrupted or edited install
# is refused instead of silently training on another split.
FILTERED_FILE_SHA256 = {
    "train": "a935fa5f41afffccea4c4e29aa00ad02bccde483a5e0b91528ababb8107ddc68",
    "valid": "e1b4cd5f6e53125bf1efeda3c73636eee223c9d8a1a8f3d1794f179b8ab4ce4e",
    "test": "445fc64f0029a228b84878b243aca171c1513f949d8205056207457ad8a35e24",
}
# What identifies the cv10 split: its rule, which runs record instead of a list.
CV10_RULE = "cv10: names sorted, fold = index mod 10 + 1"

_CLIP_ID = re.compile(r"^(?P<id>[a-z]+\.\d{5})(?:\.[A-Za-z0-9]+)?$")


def clip_id(audio_name: str) -> str:
    """The name a split list uses for a clip: folders and extension dropped
    ("genres/jazz/jazz.00054.wav" -> "jazz.00054"); other names are returned as they are."""
    base = str(audio_name).replace("\\", "/").rsplit("/", 1)[-1]
    match = _CLIP_ID.match(base)
    return match["id"] if match else base


def _list_file(part: str):
    return resources.files("genreflow.data").joinpath(f"filtered_{part}.txt")


@functools.cache
def _filtered_bytes(part: str) -> bytes:
    resource = _list_file(part)
    try:
        content = resource.read_bytes()
    except OSError as exc:
        raise GenreflowError(
            f"{resource}: the fault-filtered split's {part} list is missing from the "
            f"installed genreflow ({exc}); reinstall the package"
        ) from None
    digest = hashlib.sha256(content).hexdigest()
    if digest != FILTERED_FILE_SHA256[part]:
        raise GenreflowError(
            f"{resource}: sha256 {digest}, expected {FILTERED_FILE_SHA256[part]}: the "
            "installed split list is corrupted or edited; reinstall genreflow"
        )
    return content


@functools.cache
def filtered_lists() -> dict[str, tuple[str, ...]]:
    """The fault-filtered split: {"train", "valid", "test"} -> clip names ("blues.00012"),
    in the lists' order. The files are checked against their recorded sha256."""
    lists = {}
    for part in FILTERED_PARTS:
        text = _filtered_bytes(part).decode("utf-8")
        names = [line.strip() for line in text.splitlines()]
        lists[part] = tuple(name for name in names if name and not name.startswith("#"))
    return lists


def split_sha256(protocol: str) -> str:
    """What a run records to say which split it used: for `filtered` the sha256 of the
    three list files (train, valid, test, concatenated); for `cv10` the sha256 of its
    rule (CV10_RULE), since its folds come with the packed file."""
    _check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "cv10":
        return hashlib.sha256(CV10_RULE.encode()).hexdigest()
    return hashlib.sha256(b"".join(_filtered_bytes(part) for part in FILTERED_PARTS)).hexdigest()


def inner_fold(fold: int) -> int:
    """The cv10 validation fold of test fold `fold`: the next one (10 -> 1)."""
    return fold % len(FOLDS) + 1


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise GenreflowError(f"--{what} must be one of {', '.join(choices)}, got {value!r}")


def check_protocol(protocol: str, selection: str, fold: int) -> None:
    """The arguments' own checks, before any data is read.

    Raises:
        GenreflowError: an unknown protocol or selection; a cv10 fold outside 1..10; a
            filtered repetition (fold) below 1.
    """
    _check_choice("protocol", protocol, PROTOCOLS)
    _check_choice("selection", selection, SELECTIONS)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)):
        raise GenreflowError(f"--fold must be a whole number, got {fold!r}")
    if protocol == "cv10" and fold not in FOLDS:
        raise GenreflowError(
            f"cv10: --fold must be one of {FOLDS[0]}..{FOLDS[-1]}, got {fold} (it names the "
            "test fold)"
        )
    if protocol == "filtered" and fold < 1:
        raise GenreflowError(f"filtered: --fold is the repetition number (1, 2, ...), got {fold}")


def _rows(array: Iterable[int]) -> np.ndarray:
    return np.array(sorted(array), dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Split:
    """Row indices (sorted int64 arrays) into the data the split was made from.

    train: rows the model learns from. valid: rows that choose the checkpoint (the same
    array as test when selection is "heldout"). test: rows that are reported.
    excluded: names in the data that no list names (cv10: none). missing: list names the
    data lacks (e.g. a clip the pack step skipped as unreadable).
    """

    protocol: str
    selection: str
    fold: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    excluded: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def valid_is_test(self) -> bool:
        """Whether the checkpoint is chosen on the reported rows (selection "heldout")."""
        return self.valid is self.test

    def seed(self, seed: int) -> int:
        """The seed a run of this split uses: `seed` for cv10 (as the seed did), and
        seed + fold - 1 for filtered, whose repetitions differ by nothing else."""
        return seed + self.fold - 1 if self.protocol == "filtered" else seed

    def counts(self) -> dict:
        """For summary.json: how many rows each part has, and which names are left out."""
        return {
            "train": int(len(self.train)),
            "valid": int(len(self.valid)),
            "test": int(len(self.test)),
            "excluded": len(self.excluded),
            "missing": len(self.missing),
            "excluded_names": list(self.excluded),
            "missing_names": list(self.missing),
        }


def make_split(
    audio_names: Sequence[str],
    folds: Sequence[int] | np.ndarray,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    fold: int,
    selection: str = DEFAULT_SELECTION,
    source: str = "the data",
) -> Split:
    """Split the rows of a packed (or embedded) file for one run.

    Args:
        audio_names: the file's `audio_name`s, one per row; matched to the lists without
            folder or extension ("jazz.00054.wav" matches "jazz.00054").
        folds: the file's `fold` column (cv10 only reads it).
        protocol: "cv10" or "filtered".
        fold: cv10: the test fold, 1..10. filtered: the repetition number, >= 1.
        selection: "validation" or "heldout" (see the module's docstring).
        source: what the rows come from, for error messages (the file's path).

    Raises:
        GenreflowError: bad arguments, or a part that would be empty, saying which and why.
    """
    check_protocol(protocol, selection, fold)
    names = [str(name) for name in audio_names]
    folds = np.asarray(folds, dtype=np.int64)
    if folds.shape != (len(names),):
        raise GenreflowError(
            f"{source}: {len(names)} clip names but a fold column of shape {folds.shape}"
        )
    if protocol == "cv10":
        return _cv10(names, folds, fold, selection, source)
    return _filtered(names, fold, selection, source)


def _cv10(names: list[str], folds: np.ndarray, fold: int, selection: str, source: str) -> Split:
    present = ", ".join(map(str, sorted(set(folds.tolist())))) or "none"
    test = _rows(np.flatnonzero(folds == fold))
    if not len(test):
        raise GenreflowError(
            f"cv10: fold {fold} has no clips in {source} (folds present: {present})"
        )
    if selection == "heldout":
        valid = test
        train = _rows(np.flatnonzero(folds != fold))
        held_back = f"fold {fold}"
    else:
        inner = inner_fold(fold)
        valid = _rows(np.flatnonzero(folds == inner))
        if not len(valid):
            raise GenreflowError(
                f"cv10: the validation fold {inner} (the one after test fold {fold}) has no "
                f"clips in {source} (folds present: {present}); choose with --selection "
                "heldout on data with fewer folds"
            )
        train = _rows(np.flatnonzero((folds != fold) & (folds != inner)))
        held_back = f"folds {fold} and {inner}"
    if not len(train):
        raise GenreflowError(
            f"cv10: every clip of {source} is in {held_back} (folds present: {present}); "
            "none is left to train on"
        )
    return Split("cv10", selection, int(fold), train, valid, test)


def _filtered(names: list[str], fold: int, selection: str, source: str) -> Split:
    lists = filtered_lists()
    ids = [clip_id(name) for name in names]
    seen: dict[str, int] = {}
    for row, name in enumerate(ids):
        if name in seen:
            # Two files of one clip (say .au and .wav) could land in train and test at once.
            raise GenreflowError(
                f"filtered: {source} holds the clip {name} twice "
                f"({names[seen[name]]} and {names[row]}); pack it once"
            )
        seen[name] = row
    part_of = {name: part for part in FILTERED_PARTS for name in lists[part]}
    rows = {part: _rows(seen[name] for name in lists[part] if name in seen) for part in lists}
    for part in FILTERED_PARTS:
        if part == "valid" and selection == "heldout":
            continue
        if not len(rows[part]):
            raise GenreflowError(
                f"filtered: none of the {len(lists[part])} {part}-list clips "
                f"(e.g. {lists[part][0]}) are in {source}"
            )
    excluded = tuple(names[row] for row, name in enumerate(ids) if name not in part_of)
    missing = tuple(sorted(name for name in part_of if name not in seen))
    valid = rows["test"] if selection == "heldout" else rows["valid"]
    return Split(
        "filtered", selection, int(fold), rows["train"], valid, rows["test"], excluded, missing
    )
