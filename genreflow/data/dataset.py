"""One dataset contract for any labelled audio: the ordered classes, and the clips, each with
a label and a fold.

`read_dataset(root)` recognises the layout by trying these in order in `root`, and, where none
matches and `root` holds a single folder and no audio (an archive's top folder, such as
ESC-50-master/), once more inside that folder:

1. gtzan: GTZAN's genre folders in any layout genreflow.data.layout knows (the folder itself,
   genres/, genres_original/, Data/genres_original/) with no other folder of audio beside
   them. Classes in GTZAN's order (blues .. rock), folds by the seed's rule (names sorted,
   fold = index mod 10 + 1): exactly what `genreflow pack` has always read. A folder of class
   folders all named after GTZAN genres is GTZAN, so one without all ten is an error.
2. esc50: meta/esc50.csv and audio/, as ESC-50 comes: a row's clip is audio/<filename>, its
   class <category>, its fold <fold>.
3. urbansound8k: metadata/UrbanSound8K.csv and audio/, as UrbanSound8K comes: a row's clip is
   audio/fold<fold>/<slice_file_name>, its class <class>, its fold <fold>. For both, the
   classes are ordered by their numeric target (target, classID), which must name one class
   each way (ESC-50's targets 0..49 are then its label indices).
4. manifest: one .csv file at the top whose header names a file column (filename, file_name,
   file or path) and a label column (label, class or category), and optionally fold; header
   names match whatever their case and surrounding spaces. A file is a path relative to the
   manifest's folder, / between folders. Classes sorted by name.
5. class-folders: one folder per class (at least two), its clips directly inside; classes
   sorted by name. Folders named .* or __MACOSX are not classes.

Folds: a layout that gives them (esc50, urbansound8k, a manifest's fold column) keeps them as
given: whole numbers 1..K, each used (a gap, a 0 or a non-integer is an error). Otherwise they
are made once: stratified K-fold (`folds`, default 5), each class dealt round-robin over the
folds in a seeded order, continuing where the previous class stopped, so a class's fold sizes
and the folds' sizes each differ by at most one. The order is the sha256 of the seed and the
clip's name rather than a random generator's, because numpy promises a Generator's stream
only on one build and machine; sha256 gives the same folds everywhere.

Names: a clip's name is its file name, the key of features and predictions, so it is unique
in the dataset (a file in two classes or listed twice is an error), UTF-8, and free of the
backslash a packed file's reader refuses.

Labels: they name files (the report's per-class ones) and go into MLflow keys, so they hold
only ASCII letters, digits, "_", "-", "." and spaces, start with a letter or digit, do not end
in "." or a space (Windows drops those from a file name), are at most 100 characters (room
for a prefix within MLflow's 250-character keys), and no two differ only in case (one file on
macOS and Windows). That is MLflow's key alphabet (letters, digits, _ - . space / and, off
Windows, :) less "/" and ":", which separate folders or are refused in Windows file names;
ASCII, because Unicode spells some names two ways (macOS keeps file names decomposed), which
would give the same data two fingerprints.

Every bad input is a GenreflowError, one line naming the file (a manifest with its line) or
the folder, and the problem; nothing is returned half-checked.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from genreflow.data.genres import FOLDS, GENRE_INDEX, GENRES, assign_folds
from genreflow.data.layout import (
    AUDIO_SUFFIXES,
    FOLDER,
    GTZAN_CANDIDATES,
    clips_in,
    list_clips,
    list_folder,
)
from genreflow.errors import GenreflowError

KINDS = ("gtzan", "esc50", "urbansound8k", "manifest", "class-folders")
DEFAULT_FOLDS = 5
GTZAN_FOLDS_SOURCE = "gtzan: the seed's rule (names sorted, index mod 10 + 1)"
ESC50_CSV = "meta/esc50.csv"
URBANSOUND8K_CSV = "metadata/UrbanSound8K.csv"
FILE_COLUMNS = ("filename", "file_name", "file", "path")
LABEL_COLUMNS = ("label", "class", "category")
FOLD_COLUMN = "fold"
MAX_LABEL_LENGTH = 100
LABEL_RULE = (
    "a label holds only ASCII letters, digits, _ - . and spaces, starts with a letter or "
    f"digit, does not end in . or a space, and is at most {MAX_LABEL_LENGTH} characters "
    "(labels name files and MLflow keys)"
)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_. -]*[A-Za-z0-9_-])?")
_WHOLE = re.compile(r"[0-9]+")
_LOOKED_FOR = (
    "GTZAN's genre folders (in ., genres/, genres_original/, Data/genres_original/), "
    f"ESC-50 ({ESC50_CSV} and audio/), UrbanSound8K ({URBANSOUND8K_CSV} and audio/), "
    f"a manifest (a .csv at the top with a file column, {' or '.join(FILE_COLUMNS)}, and a "
    f"label column, {' or '.join(LABEL_COLUMNS)}) and class folders (folders of audio files)"
)


@dataclass(frozen=True)
class LabelledClip:
    name: str  # the file name: the key in features and predictions, unique in its dataset
    label: int  # an index into Dataset.classes
    path: Path
    fold: int  # 1..Dataset.folds


@dataclass(frozen=True)
class Dataset:
    kind: str  # one of KINDS
    root: Path  # the folder read (for gtzan, the one that holds the genre folders)
    classes: tuple[str, ...]  # in label order
    clips: tuple[LabelledClip, ...]  # sorted by name
    folds: int  # K: every clip's fold is one of 1..K, and each holds a clip
    folds_source: str  # e.g. "given by meta/esc50.csv", "stratified 5-fold, seed 0"
    ignored: tuple[tuple[str, int], ...]  # entries beside the clips, not read: (suffix, count)

    @property
    def fingerprint(self) -> str:
        """sha256 of the class list and every clip's name, label and fold: the same for two
        reads of the same data, wherever it lies (paths are left out)."""
        content = {
            "classes": list(self.classes),
            "clips": [[clip.name, clip.label, clip.fold] for clip in self.clips],
        }
        return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()

    def summary(self) -> str:
        """One line for the log: what was read, and what was not."""
        line = (
            f"{self.kind}: {len(self.clips)} clips in {len(self.classes)} classes from "
            f"{self.root}, {self.folds} folds ({self.folds_source})"
        )
        if self.ignored:
            counts = ", ".join(f"{suffix or '(no suffix)'} {n}" for suffix, n in self.ignored)
            total = sum(n for _, n in self.ignored)
            entries = "entry" if total == 1 else "entries"
            line += f"; ignored {total} {entries} that are not clips ({counts})"
        return line


def read_dataset(root: str | Path, *, folds: int | None = None, seed: int = 0) -> Dataset:
    """The labelled clips under `root`, in whichever layout it holds (see the module's
    docstring for the order and rules).

    Args:
        root: an extracted dataset folder.
        folds: K for folds made here (default 5); where the data gives folds, None or their
            number; GTZAN's are the seed's 10.
        seed: orders each class's clips before they are dealt into folds made here.

    Raises:
        GenreflowError: nothing recognised (saying what was looked for), or bad input.
    """
    root = Path(root)
    if not root.is_dir():
        raise GenreflowError(f"{root}: not a folder (expected an extracted dataset)")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise GenreflowError(f"folds must be a whole number of at least 2, got {folds!r}")
    found = _recognise(root)
    looked_in = f"in {root}"
    if found is None:
        listing = list_folder(root)
        inner = [folder for folder in listing.folders if _may_be_class(folder)]
        if len(inner) == 1 and not listing.audio:
            found = _recognise(inner[0])
            looked_in += f" and {inner[0]}"
    if found is None:
        csvs = ", ".join(path.name for path in _top_csvs(root))
        why = f"; {csvs}: no file and label columns in the header" if csvs else ""
        raise GenreflowError(
            f"{root}: no dataset recognised {looked_in}; looked for {_LOOKED_FOR}{why}"
        )
    kind, where, manifest = found
    if kind == "gtzan":
        return _read_gtzan(where, folds)
    if kind == "class-folders":
        return _read_class_folders(where, folds, seed)
    if kind == "esc50":
        table = _Table("filename", "category", "fold", "target", lambda name, _: f"audio/{name}")
    elif kind == "urbansound8k":
        table = _Table(
            "slice_file_name", "class", "fold", "classID", lambda name, k: f"audio/fold{k}/{name}"
        )
    else:
        table = _manifest_table(manifest)
    return _read_table(kind, where, manifest, table, folds, seed)


def stratified_folds(labels: Mapping[str, int], folds: int, seed: int) -> dict[str, int]:
    """Each name's fold in 1..`folds`: every class dealt round-robin over the folds in the
    order of sha256(seed, name), starting where the previous class's clips stopped, so each
    class's fold sizes, and the folds' sizes, differ by at most one."""
    members: dict[int, list[str]] = defaultdict(list)
    for name, label in labels.items():
        members[label].append(name)
    fold_of: dict[str, int] = {}
    start = 0
    for label in sorted(members):
        names = sorted(
            members[label], key=lambda n: hashlib.sha256(f"{seed}\n{n}".encode()).digest()
        )
        for i, name in enumerate(names):
            fold_of[name] = (start + i) % folds + 1
        start = (start + len(names)) % folds
    return fold_of


# -- recognition ----------------------------------------------------------------------------


def _recognise(folder: Path) -> tuple[str, Path, Path | None] | None:
    """(kind, the folder to read, the manifest where there is one), or None."""
    gtzan = _gtzan_root(folder)
    if gtzan is not None:
        return "gtzan", gtzan, None
    if (folder / ESC50_CSV).is_file() and (folder / "audio").is_dir():
        return "esc50", folder, folder / ESC50_CSV
    if (folder / URBANSOUND8K_CSV).is_file() and (folder / "audio").is_dir():
        return "urbansound8k", folder, folder / URBANSOUND8K_CSV
    manifests = [path for path in _top_csvs(folder) if _is_manifest_header(_header(path))]
    if len(manifests) > 1:
        names = ", ".join(path.name for path in manifests)
        raise GenreflowError(f"{folder}: more than one manifest ({names}); keep one")
    if manifests:
        return "manifest", folder, manifests[0]
    if any(_may_be_class(sub) and _holds_audio(sub) for sub in list_folder(folder).folders):
        return "class-folders", folder, None
    return None


def _gtzan_root(folder: Path) -> Path | None:
    for candidate in GTZAN_CANDIDATES:
        root = folder / candidate
        if any((root / genre).is_dir() for genre in GENRES):
            others = [
                sub
                for sub in list_folder(root).folders
                if sub.name not in GENRE_INDEX and _may_be_class(sub) and _holds_audio(sub)
            ]
            return None if others else root
    return None


def _may_be_class(folder: Path) -> bool:
    return not folder.name.startswith(".") and folder.name != "__MACOSX"


def _holds_audio(folder: Path) -> bool:
    return any(
        entry.suffix.lower() in AUDIO_SUFFIXES and entry.is_file() for entry in folder.iterdir()
    )


def _top_csvs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file())


def _header(path: Path) -> list[str]:
    """A CSV file's column names, stripped; empty where it has none or is not UTF-8 CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [name.strip() for name in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error):
        return []


def _is_manifest_header(header: list[str]) -> bool:
    names = {name.lower() for name in header}
    return bool(names & set(FILE_COLUMNS)) and bool(names & set(LABEL_COLUMNS))


# -- the readers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A clip found, before the checks: its label as text, and where it was declared."""

    name: str
    label: str
    path: Path
    fold: int | None  # given by the data, or None
    origin: str  # for messages: the file, or the manifest and its line
    source: Path  # the class folder or the manifest


@dataclass(frozen=True)
class _Table:
    """How one kind of CSV names its columns (matched whatever their case) and places its
    clips."""

    file: str
    label: str
    fold: str | None
    target: str | None  # a numeric column that orders the classes
    locate: Callable[[str, int | None], str]  # (file cell, fold) -> path relative to the root


def _read_gtzan(root: Path, folds: int | None) -> Dataset:
    if folds not in (None, len(FOLDS)):
        raise GenreflowError(
            f"{root}: GTZAN's folds are the seed's {len(FOLDS)}; folds={folds} would make its "
            "numbers incomparable with the seed's (leave folds unset)"
        )
    ignored: Counter[str] = Counter()
    clips = list_clips(root, ignored=ignored)
    entries = [_Entry(c.name, c.genre, c.path, None, str(c.path), c.path.parent) for c in clips]
    _check_names(entries)
    fold_of = assign_folds(c.name for c in clips)
    return _assemble(
        "gtzan", root, GENRES, entries, fold_of, len(FOLDS), GTZAN_FOLDS_SOURCE, ignored
    )


def _read_class_folders(root: Path, folds: int | None, seed: int) -> Dataset:
    listing = list_folder(root)
    ignored = Counter(listing.other)
    ignored.update(path.suffix.lower() for path in listing.audio)  # in no class
    classes = [folder for folder in listing.folders if _may_be_class(folder)]
    if len(classes) < len(listing.folders):
        ignored[FOLDER] += len(listing.folders) - len(classes)
    if classes and all(re.fullmatch(r"fold[0-9]+", folder.name) for folder in classes):
        raise GenreflowError(
            f"{root}: its folders fold1, fold2, ... are UrbanSound8K's folds, not classes: "
            f"give the folder that holds audio/ and {URBANSOUND8K_CSV}"
        )
    entries = []
    for folder in classes:
        _check_label(folder.name, str(folder))
        audio = clips_in(folder, ignored, "an empty class folder (no audio files directly in it)")
        entries.extend(
            _Entry(path.name, folder.name, path, None, str(path), folder) for path in audio
        )
    labels = tuple(folder.name for folder in classes)
    return _own_folds("class-folders", root, root, labels, entries, folds, seed, ignored)


def _manifest_table(manifest: Path) -> _Table:
    header = _header(manifest)
    chosen = {}
    for role, names in (("file", FILE_COLUMNS), ("label", LABEL_COLUMNS)):
        present = [n for n in header if n.lower() in names]
        if len(present) > 1:
            raise GenreflowError(
                f"{manifest}: more than one {role} column ({', '.join(present)}); keep one"
            )
        chosen[role] = present[0]
    fold = next((name for name in header if name.lower() == FOLD_COLUMN), None)
    return _Table(chosen["file"], chosen["label"], fold, None, lambda name, _: name)


def _read_table(
    kind: str, root: Path, manifest: Path, table: _Table, folds: int | None, seed: int
) -> Dataset:
    header, rows = _csv_rows(manifest)
    lowered = [name.lower() for name in header]
    columns = {}
    for column in (table.file, table.label, table.fold, table.target):
        if column is not None:
            if column.lower() not in lowered:
                raise GenreflowError(
                    f"{manifest}: no {column!r} column (its header: {', '.join(header)})"
                )
            columns[column] = lowered.index(column.lower())
    entries: list[_Entry] = []
    # the numeric target <-> the class name, each with the line it was first seen on
    label_of_target: dict[int, tuple[str, int]] = {}
    target_of_label: dict[str, tuple[int, int]] = {}
    for line, row in rows:
        origin = f"{manifest}: line {line}"
        if len(row) != len(header):
            raise GenreflowError(
                f"{origin}: {len(row)} field{'s' if len(row) != 1 else ''} where the header "
                f"has {len(header)}"
            )
        fold = None if table.fold is None else _whole(row[columns[table.fold]], origin, "fold", 1)
        label = row[columns[table.label]].strip()
        _check_label(label, origin)
        if table.target is not None:
            target = _whole(row[columns[table.target]], origin, table.target, 0)
            seen_label, label_line = label_of_target.setdefault(target, (label, line))
            seen_target, target_line = target_of_label.setdefault(label, (target, line))
            one_to_one = f"({table.target} and {table.label} must match one to one)"
            if seen_label != label:
                raise GenreflowError(
                    f"{origin}: {table.target} {target} is {label!r} here and {seen_label!r} "
                    f"at line {label_line} {one_to_one}"
                )
            if seen_target != target:
                raise GenreflowError(
                    f"{origin}: {label!r} has {table.target} {target} here and {seen_target} "
                    f"at line {target_line} {one_to_one}"
                )
        path = _clip_path(root, table.locate(row[columns[table.file]].strip(), fold), origin)
        entries.append(_Entry(path.name, label, path, fold, origin, manifest))
    if not entries:
        raise GenreflowError(f"{manifest}: lists no clips")
    if table.target is None:
        labels = tuple(sorted({entry.label for entry in entries}))
    else:
        labels = tuple(label_of_target[target][0] for target in sorted(label_of_target))
    listed = {entry.path for entry in entries}
    ignored: Counter[str] = Counter()
    for folder in sorted({path.parent for path in listed}):
        ignored.update(
            p.suffix.lower()
            for p in folder.iterdir()
            if p not in listed and p != manifest and not p.is_dir()
        )
    return _own_folds(kind, root, manifest, labels, entries, folds, seed, ignored)


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (names stripped) and the non-blank rows with their line numbers."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, skipinitialspace=True)
            header = [name.strip() for name in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as exc:
        raise GenreflowError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise GenreflowError(f"{path}: line {reader.line_num}: not CSV ({exc})") from None
    counts = Counter(name.lower() for name in header)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise GenreflowError(f"{path}: its header names {', '.join(repeated)} more than once")
    return header, rows


def _whole(cell: str, origin: str, column: str, least: int) -> int:
    value = cell.strip()
    if not _WHOLE.fullmatch(value) or int(value) < least:
        raise GenreflowError(f"{origin}: {column} {value!r} is not a whole number from {least}")
    return int(value)


def _clip_path(root: Path, relative: str, origin: str) -> Path:
    if not relative:
        raise GenreflowError(f"{origin}: no file named")
    if "\\" in relative:
        raise GenreflowError(f"{origin}: {relative!r}: separate folders with /, not \\")
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts:
        raise GenreflowError(f"{origin}: {relative!r} is not a path inside {root}")
    if parts.suffix.lower() not in AUDIO_SUFFIXES:
        raise GenreflowError(
            f"{origin}: {relative!r} is not an audio file (expected "
            f"{', '.join(sorted(AUDIO_SUFFIXES))})"
        )
    path = root.joinpath(*parts.parts)
    if not path.is_file():
        raise GenreflowError(f"{origin}: {relative!r}: no such file in {root}")
    return path


# -- the checks every layout shares -------------------------------------------------------


def _check_label(label: str, origin: str) -> None:
    if len(label) > MAX_LABEL_LENGTH or not _LABEL.fullmatch(label):
        raise GenreflowError(f"{origin}: label {label!r} refused: {LABEL_RULE}")


def _check_names(entries: Iterable[_Entry]) -> None:
    """Names unique across the dataset, UTF-8, without a backslash."""
    first: dict[str, _Entry] = {}
    for entry in entries:
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            raise GenreflowError(f"{entry.origin}: the file name is not UTF-8") from None
        if "\\" in entry.name:
            raise GenreflowError(f"{entry.origin}: a backslash in the file name {entry.name!r}")
        seen = first.setdefault(entry.name, entry)
        if seen is entry:
            continue
        if seen.label != entry.label:
            problem = f"in two classes, {seen.label!r} ({seen.origin}) and {entry.label!r}"
        elif seen.path == entry.path:
            problem = f"listed twice (also at {seen.origin})"
        else:
            problem = f"the name of two files (also {seen.path}); clip names must be unique"
        raise GenreflowError(f"{entry.origin}: {entry.name} is {problem}")


def _own_folds(
    kind: str,
    root: Path,
    where: Path,
    classes: tuple[str, ...],
    entries: list[_Entry],
    folds: int | None,
    seed: int,
    ignored: Counter[str],
) -> Dataset:
    """A dataset other than GTZAN: its classes and names checked, its folds as given or
    made here. `where` names it in messages (the root or the manifest)."""
    if len(classes) < 2:
        raise GenreflowError(
            f"{where}: one class only ({classes[0]}); a classifier needs at least two"
        )
    folded = {}
    for label in classes:
        other = folded.setdefault(label.lower(), label)
        if other != label:
            raise GenreflowError(
                f"{where}: the labels {other!r} and {label!r} differ only in case "
                "(one file name on macOS and Windows)"
            )
    _check_names(entries)
    given = sorted({entry.fold for entry in entries if entry.fold is not None})
    if given:
        k = given[-1]
        missing = sorted(set(range(1, k + 1)) - set(given))
        if missing:
            raise GenreflowError(
                f"{where}: folds {', '.join(map(str, given))} given: fold {missing[0]} has no "
                "clip (folds are 1..K with none left out)"
            )
        if k < 2:
            raise GenreflowError(f"{where}: one fold only; cross-validation needs at least two")
        if folds not in (None, k):
            raise GenreflowError(
                f"{where}: gives {k} folds; folds={folds} asks for another number "
                "(leave it unset to keep the given folds)"
            )
        fold_of = {entry.name: entry.fold for entry in entries}
        source = f"given by {where.relative_to(root).as_posix()}"
    else:
        k = DEFAULT_FOLDS if folds is None else folds
        index = {label: i for i, label in enumerate(classes)}
        fold_of = stratified_folds({e.name: index[e.label] for e in entries}, k, seed)
        source = f"stratified {k}-fold, seed {seed}"
    sizes = Counter(entry.label for entry in entries)
    for label in classes:
        if sizes[label] < k:
            folder = next(e.source for e in entries if e.label == label)
            raise GenreflowError(
                f"{folder}: class {label!r} has {sizes[label]} clip"
                f"{'s' if sizes[label] != 1 else ''}, fewer than the {k} folds"
            )
    return _assemble(kind, root, classes, entries, fold_of, k, source, ignored)


def _assemble(
    kind: str,
    root: Path,
    classes: tuple[str, ...],
    entries: list[_Entry],
    fold_of: Mapping[str, int],
    k: int,
    source: str,
    ignored: Counter[str],
) -> Dataset:
    index = {label: i for i, label in enumerate(classes)}
    clips = tuple(
        LabelledClip(entry.name, index[entry.label], entry.path, fold_of[entry.name])
        for entry in sorted(entries, key=lambda entry: entry.name)
    )
    return Dataset(
        kind=kind,
        root=root,
        classes=tuple(classes),
        clips=clips,
        folds=k,
        folds_source=source,
        ignored=tuple(sorted((suffix, n) for suffix, n in ignored.items() if n)),
    )
