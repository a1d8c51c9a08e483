"""What one fold leaves in its folder: the one definition of the files, their names and fields.

Both training paths (genreflow.train, genreflow.head) write a fold folder through this
module; the steps, aggregate and tracking read it through this module. A fold folder
holds:

- `metrics.csv`: one row per evaluation, METRICS_COLUMNS: iteration, train_loss (mean since
  the previous evaluation), valid_accuracy (what chooses the checkpoint), test_accuracy
  (the test rows, watched only), seconds (wall time since the run began).
- `predictions.csv`: the test rows as the selected checkpoint classifies them, one row per
  clip: audio_name, fold (the run's fold), genre, then one probability column per genre in
  GENRES order (8 significant digits).
- `summary.json`: `FoldSummary`, the fold's results and provenance; written last, it marks
  the folder finished.
- the selected checkpoint: `best.pth` (fine-tune) or `head.pth` (frozen base).
- `failed.json` instead, when a fold failed while the pipeline accepts partial results:
  `{"fold": K, "error": "..."}`, a `FailedFold` written down.

Reading is lenient where older runs recorded less (a summary may hold only `{"fold": K}`)
or named things otherwise (`RENAMED`: folders written before the names said what they
measure are read under today's names) and strict where a file breaks the contract: a fold
whose files are missing or unreadable is a `FailedFold`; a file that reads but is wrong
(a clip twice, a fold number that disagrees, an unknown genre, probabilities that do not
sum to 1) is a GenreflowError naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genreflow.atomic import write_text_atomic
from genreflow.data.genres import GENRE_INDEX, GENRES
from genreflow.errors import GenreflowError
from genreflow.storage import redacted_values

METRICS = "metrics.csv"
PREDICTIONS = "predictions.csv"
SUMMARY = "summary.json"
FAILED = "failed.json"
METRICS_COLUMNS = ("iteration", "train_loss", "valid_accuracy", "test_accuracy", "seconds")
# Older names -> today's, in summary.json, metrics.csv and resume states: "heldout" said
# where the rows came from, not that they are the test rows; "best" read like a result, but
# it is the highest test accuracy seen while training, chosen on the test rows themselves.
RENAMED = {
    "heldout_accuracy": "test_accuracy",
    "best_accuracy": "peak_test_accuracy",
    "best_iteration": "peak_test_iteration",
    "n_heldout": "n_test",
}
PREDICTION_COLUMNS = ("audio_name", "fold", "genre", *GENRES)

# The two training paths, as summary.json's "path" names them, and the checkpoint each
# selects (what tracking logs and the ensemble is made of).
FINE_TUNE, FROZEN_BASE = "fine-tune", "frozen-base"
BEST, HEAD = "best.pth", "head.pth"
SELECTED_CHECKPOINT = {FINE_TUNE: BEST, FROZEN_BASE: HEAD}

SPLIT_COUNTS = ("train", "valid", "test", "excluded", "missing")
SPLIT_NAMES = ("excluded_names", "missing_names")
# How far from 1 a row of probabilities may sum. genreflow writes float32 softmax output,
# normalised in float64, as 8 significant digits; the bound is for rows that passed through
# bf16 (8 significant bits: each value within 2**-8 of itself, so the sum within 2**-8 of 1),
# as a fold trained under bf16 autocast before its head was kept in float32 wrote them.
# Accepted rows are renormalised, so every later average is over distributions.
PROBABILITY_SUM_TOLERANCE = 2.0**-8


@dataclass
class FailedFold:
    """A fold without a result, the one shape of a failure: the fold step returns it for a
    failure it tolerates (min_folds) and writes it as failed.json (`write_failure`); the
    aggregate reads it back, or makes one for a folder whose files are missing or
    unreadable (`read_fold`). fold is None where no readable file names it."""

    fold: int | None
    directory: Path
    reason: str


# --- writing -----------------------------------------------------------------------------
@dataclass
class FoldSummary:
    """summary.json: one fold's results. Fields left None are not written (each path has
    its own: precision and features for fine-tune, base_sha256 and pretrained for frozen
    base), so the file keeps the order and names it has always had."""

    fold: int
    path: str  # FINE_TUNE or FROZEN_BASE
    protocol: str
    selection: str
    iterations: int
    final_accuracy: float  # the selected checkpoint on the test rows: the number to report
    valid_accuracy: float  # of the selected checkpoint
    selected_iteration: int
    # The highest test accuracy seen while training: the seed's optimistic figure, never a
    # result (it is chosen on the test rows); kept out of the headline metrics.
    peak_test_accuracy: float
    peak_test_iteration: int
    n_train: int
    n_test: int  # test rows
    split: dict  # genreflow.splits.Split.counts()
    split_sha256: str
    data_sha256: str
    seeds: dict
    clips_per_second: float
    wall_seconds: float
    device: str
    config: dict
    genreflow_version: str
    precision: str | None = None
    base_sha256: str | None = None
    pretrained: str | None = None
    features: dict | None = None

    # The order of summary.json's keys.
    _ORDER = (
        "fold path protocol selection iterations final_accuracy valid_accuracy "
        "selected_iteration peak_test_accuracy peak_test_iteration n_train n_test split "
        "split_sha256 data_sha256 seeds clips_per_second wall_seconds device precision base_sha256 "
        "pretrained config features genreflow_version"
    ).split()

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        # Logged to MLflow as it is: no URI in it keeps a signature or a password.
        return redacted_values({key: fields[key] for key in self._ORDER if fields[key] is not None})


@dataclass
class Progress:
    """Where a run is: what the loop carries from one evaluation to the next."""

    iteration: int = 0
    metrics: list[dict] = field(default_factory=list)  # metrics.csv's rows
    # The selected evaluation (the checkpoint kept): valid_accuracy, iteration and its
    # test_probabilities, which the report reads without a second pass over the test rows.
    best: dict = field(
        default_factory=lambda: {"valid_accuracy": -1.0, "iteration": 0, "test_probabilities": None}
    )
    seconds: float = 0.0  # wall time of the run, resumes included
    train_seconds: float = 0.0  # of training steps only
    clips: int = 0  # clips drawn

    def evaluate(self, split, accuracy_on, *, train_loss: float, seconds: float) -> bool:
        """Evaluate at this iteration and record it (a metrics.csv row); True when it is
        the new selection: the best validation accuracy, ties going to the earlier.

        accuracy_on(rows) -> (accuracy, probabilities). The valid rows choose; the test
        rows are only watched (the seed printed their accuracy), unless selection
        "heldout" makes them the same rows.
        """
        valid_accuracy, valid_probabilities = accuracy_on(split.valid)
        if split.valid_is_test:
            test_accuracy, test_probabilities = valid_accuracy, valid_probabilities
        else:
            test_accuracy, test_probabilities = accuracy_on(split.test)
        self.metrics.append(
            {
                "iteration": self.iteration,
                "train_loss": train_loss,
                "valid_accuracy": valid_accuracy,
                "test_accuracy": test_accuracy,
                "seconds": seconds,
            }
        )
        improved = valid_accuracy > self.best["valid_accuracy"]
        if improved:
            self.best = {
                "valid_accuracy": valid_accuracy,
                "iteration": self.iteration,
                "test_probabilities": test_probabilities,
            }
        return improved


def summarise(*, split, progress: Progress, test_targets: np.ndarray, **fields) -> FoldSummary:
    """The summary of a finished run: `progress` holds every evaluation and the selected
    one, `split` is the run's genreflow.splits.Split; `fields` the rest of FoldSummary."""
    metrics, best = progress.metrics, progress.best
    selected = np.asarray(best["test_probabilities"])
    # The seed's optimistic figure: the highest test accuracy seen (ties: the earlier).
    peak = max(metrics, key=lambda m: m["test_accuracy"])
    return FoldSummary(
        protocol=split.protocol,
        selection=split.selection,
        final_accuracy=float(np.mean(selected.argmax(axis=1) == test_targets)),
        valid_accuracy=best["valid_accuracy"],
        selected_iteration=best["iteration"],
        peak_test_accuracy=peak["test_accuracy"],
        peak_test_iteration=peak["iteration"],
        n_train=int(len(split.train)),
        n_test=int(len(split.test)),
        split=split.counts(),
        **fields,
    )


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_metrics(out: Path, metrics: Iterable[dict]) -> None:
    rows = ([m[c] for c in METRICS_COLUMNS] for m in metrics)
    write_text_atomic(out / METRICS, csv_text(METRICS_COLUMNS, rows))


def write_predictions(
    out: Path, names: Sequence[str], targets: Sequence[int], probabilities: np.ndarray, fold: int
) -> None:
    """The test rows' probabilities; `fold` is the run's (for cv10 also the rows' own)."""
    rows = [
        [name, fold, GENRES[target], *(f"{p:.8g}" for p in probs)]
        for name, target, probs in zip(names, targets, probabilities, strict=True)
    ]
    write_text_atomic(out / PREDICTIONS, csv_text(PREDICTION_COLUMNS, rows))


def write_summary(out: Path, summary: FoldSummary) -> dict:
    """Write summary.json, the folder's commit point; returns its content."""
    content = summary.as_dict()
    write_text_atomic(out / SUMMARY, json.dumps(content, indent=2) + "\n")
    return content


def write_failure(failure: FailedFold) -> None:
    """Write failed.json into the failed fold's folder: {"fold": K, "error": "..."}."""
    failure.directory.mkdir(parents=True, exist_ok=True)
    record = {"fold": failure.fold, "error": failure.reason}
    write_text_atomic(failure.directory / FAILED, json.dumps(record) + "\n")


def folds_required(min_folds: int, expected_folds: Sequence[int]) -> int:
    """The fewest usable folds a run accepts: `min_folds`, 0 meaning every expected fold.
    Below all of them, partial results are allowed: a fold that fails for good records why
    (failed.json) instead of failing its step, and so the whole DAG (kubeflow/pipelines#7330)."""
    return min_folds or len(expected_folds)


def partial_allowed(min_folds: int, expected_folds: Sequence[int]) -> bool:
    """Whether a run of these folds accepts partial results: a fold that fails for good
    then leaves failed.json and the run goes on (see `folds_required`)."""
    expected = list(expected_folds)
    return folds_required(min_folds, expected) < len(expected)


# --- reading -----------------------------------------------------------------------------
def current_names(record: dict) -> dict:
    """`record` (a summary, a metrics row) with older keys under today's names (RENAMED)."""
    return {RENAMED.get(key, key): value for key, value in record.items()}


def read_summary(directory: Path) -> dict:
    """summary.json of a finished fold folder, under today's names (no checks: see
    `read_fold`)."""
    return current_names(json.loads((Path(directory) / SUMMARY).read_text()))


def read_metrics(directory: Path) -> list[dict[str, str]]:
    """metrics.csv's rows as text, by column name (today's names)."""
    with open(Path(directory) / METRICS, newline="") as f:
        return [current_names(row) for row in csv.DictReader(f)]


def read_failure(directory: str | Path) -> FailedFold:
    """failed.json, as `write_failure` wrote it."""
    directory = Path(directory)
    record = json.loads((directory / FAILED).read_text())
    return FailedFold(int(record["fold"]), directory, str(record["error"]))


def fold_outcome(result: dict | FailedFold) -> dict:
    """A fold step's result (summary.json's content, or a tolerated FailedFold) in brief, as
    the pipeline shows it: fold, test_accuracy, path and protocol; or fold and why it failed."""
    if isinstance(result, FailedFold):
        return {"fold": result.fold, "failed": result.reason}
    return {
        "fold": result["fold"],
        "test_accuracy": float(result["final_accuracy"]),
        "path": result["path"],
        "protocol": result["protocol"],
    }


@dataclass
class FoldResult:
    """A finished fold folder as read back: its test predictions and its checked summary."""

    fold: int
    directory: Path
    audio_names: list[str]
    true_index: np.ndarray  # (n,) genre index of the true genre
    probabilities: np.ndarray  # (n, len(GENRES)), columns in GENRES order
    n_train: int | None
    summary: dict

    @property
    def predicted_index(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=1)

    @property
    def summary_path(self) -> Path:
        return self.directory / SUMMARY

    @property
    def predictions_path(self) -> Path:
        return self.directory / PREDICTIONS

    def choice(self, key: str, known) -> str | None:
        """summary[key] (protocol, selection) when recorded and known; None when not."""
        value = self.summary.get(key)
        if value is not None and value not in known:
            raise GenreflowError(
                f"{self.summary_path}: unknown {key} {value!r} (known: {', '.join(sorted(known))})"
            )
        return value

    def number(self, key: str) -> float | None:
        """summary[key] when recorded: a finite number, or an error."""
        value = self.summary.get(key)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise GenreflowError(
                f"{self.summary_path}: '{key}' must be a finite number, found {value!r}"
            )
        return value

    def split(self) -> dict | None:
        """The fold's split counts and (optional) name lists, checked; None when not recorded."""
        return _summary_split(self.summary, self.summary_path)


def read_fold(directory: str | Path) -> FoldResult | FailedFold:
    """Read one fold folder: its result, or why it has none.

    Raises:
        GenreflowError: a file that reads but breaks the contract (naming file and line).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return FailedFold(None, directory, f"{directory}: folder does not exist")
    failure = directory / FAILED
    if failure.is_file():  # the fold step failed and said why (genreflow.steps.fold)
        try:
            return read_failure(directory)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return FailedFold(None, directory, f"{failure}: unreadable ({exc})")
    summary, why = _read_summary_checked(directory)
    if summary is None:
        return FailedFold(None, directory, why or "summary unusable")
    summary_path = directory / SUMMARY
    fold = _summary_fold(summary, summary_path)
    n_train = _summary_n_train(summary, summary_path)
    predictions_path = directory / PREDICTIONS
    if not predictions_path.is_file():
        return FailedFold(fold, directory, f"{predictions_path}: missing")
    try:
        names, true_index, probabilities = read_predictions(predictions_path, fold)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return FailedFold(fold, directory, f"{predictions_path}: unreadable ({exc})")
    return FoldResult(fold, directory, names, true_index, probabilities, n_train, summary)


def _read_summary_checked(directory: Path) -> tuple[dict | None, str | None]:
    """The folder's summary, or (None, why it is unusable) when it is missing or unreadable."""
    path = directory / SUMMARY
    if not path.is_file():
        return None, f"{path}: missing"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: unreadable ({exc})"
    if not isinstance(summary, dict):
        raise GenreflowError(f"{path}: expected a JSON object, found {type(summary).__name__}")
    return current_names(summary), None


def _summary_fold(summary: dict, path: Path) -> int:
    fold = summary.get("fold")
    # bool is an int in Python; a true/false fold is a bug, not fold 1/0
    if not isinstance(fold, int) or isinstance(fold, bool):
        raise GenreflowError(f"{path}: 'fold' must be an integer, found {fold!r}")
    return fold


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _summary_n_train(summary: dict, path: Path) -> int | None:
    """The clips the fold's model trained on: `n_train`, else the split's `train` count."""
    n_train = summary.get("n_train")
    if n_train is None:
        split = _summary_split(summary, path)
        n_train = split.get("train") if split else None
        if n_train is None:
            return None
        if n_train == 0:
            raise GenreflowError(f"{path}: 'split' says the fold trained on 0 clips")
        return n_train
    if not _is_count(n_train) or n_train == 0:
        raise GenreflowError(f"{path}: 'n_train' must be a positive integer, found {n_train!r}")
    return n_train


def _summary_split(summary: dict, path: Path) -> dict | None:
    split = summary.get("split")
    if split is None:
        return None
    if not isinstance(split, dict):
        raise GenreflowError(f"{path}: 'split' must be an object, found {type(split).__name__}")
    for key in SPLIT_COUNTS:
        if key in split and not _is_count(split[key]):
            raise GenreflowError(
                f"{path}: split count '{key}' must be a non-negative integer, found {split[key]!r}"
            )
    for key in SPLIT_NAMES:
        names = split.get(key)
        if names is not None and not (
            isinstance(names, list) and all(isinstance(n, str) for n in names)
        ):
            raise GenreflowError(f"{path}: split '{key}' must be a list of clip names")
    return split


def _parse_probability(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GenreflowError(f"{where}: column '{column}' is not a number: {text!r}") from None
    if not math.isfinite(value) or value < -1e-6 or value > 1 + 1e-6:
        raise GenreflowError(f"{where}: column '{column}' is not a probability: {text!r}")
    return value


def read_predictions(path: Path, fold: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows of one fold's predictions.csv, validated against the contract: names, true
    genre indices, and probabilities (rows renormalised to sum to 1, GENRES order).

    Raises:
        OSError, UnicodeDecodeError, csv.Error: the file cannot be read (a failed fold).
        GenreflowError: the file reads but breaks the contract.
    """
    names: list[str] = []
    true_index: list[int] = []
    probabilities: list[list[float]] = []
    seen_at: dict[str, int] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise csv.Error("the file is empty")
        missing = [column for column in PREDICTION_COLUMNS if column not in header]
        if missing:
            raise GenreflowError(f"{path}: header lacks column(s) {', '.join(missing)}")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if None in row or any(value is None for value in row.values()):
                raise GenreflowError(f"{where}: {len(header)} fields expected")
            name = row["audio_name"].strip()
            if not name:
                raise GenreflowError(f"{where}: empty audio_name")
            if name in seen_at:
                raise GenreflowError(
                    f"{where}: clip {name} predicted twice (first at line {seen_at[name]})"
                )
            seen_at[name] = reader.line_num
            try:
                row_fold = int(row["fold"])
            except ValueError:
                raise GenreflowError(f"{where}: fold {row['fold']!r} is not an integer") from None
            if row_fold != fold:
                raise GenreflowError(
                    f"{where}: fold {row_fold} disagrees with the folder's {SUMMARY} (fold {fold})"
                )
            genre = row["genre"].strip()
            if genre not in GENRE_INDEX:
                raise GenreflowError(
                    f"{where}: unknown genre {genre!r} (expected one of {', '.join(GENRES)})"
                )
            probs = [_parse_probability(row[g], g, where) for g in GENRES]
            total = math.fsum(probs)
            if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
                raise GenreflowError(f"{where}: probabilities sum to {total:.6g}, not 1")
            names.append(name)
            true_index.append(GENRE_INDEX[genre])
            probabilities.append([p / total for p in probs])
    if not names:
        raise GenreflowError(f"{path}: holds a header but no predictions")
    return (
        names,
        np.asarray(true_index, dtype=np.int64),
        np.asarray(probabilities, dtype=np.float64).reshape(len(names), len(GENRES)),
    )
