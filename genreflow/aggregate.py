"""Out-of-fold predictions -> the cross-validation report.

Each fold's training step leaves a folder with `predictions.csv` (columns `audio_name`,
`fold`, `genre`, then one probability column per genre, named by the genre) and
`summary.json` (at least `{"fold": K}`; an optional integer `n_train` gives the number of
clips the fold's model trained on). In 10-fold cross-validation every clip is predicted
exactly once, so the folds pool into one confusion matrix.

Two kinds of trouble are told apart on purpose:

- a fold whose files are missing or cannot be read did not finish: it is a *failed fold*,
  named in the report, and the statistics are taken over the usable folds only (down to
  `min_folds`; below that, an error);
- a file that reads but breaks the contract (a clip predicted twice, a fold number that
  disagrees with the folder's summary, an unknown genre, probabilities that do not sum to
  1) is a bug upstream: a `GenreflowError` naming the file and line, never a silent skip.

Fold statistics: the k fold accuracies are not independent samples, because any two folds'
models share most of their training clips. Beside the naive t interval the report gives
the corrected resampled t interval of Nadeau and Bengio (2003, "Inference for the
Generalization Error", Machine Learning 52:239-281), which inflates the variance of the
mean from s^2/k to s^2 (1/k + n_test/n_train). `paired_comparison` applies the same
correction to the per-fold differences between two runs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from genreflow import __version__
from genreflow.data.genres import GENRE_INDEX, GENRES
from genreflow.errors import GenreflowError

PROTOCOL_LABELS: dict[str, str] = {
    "cv10": "10-fold cross-validation (cv10)",
    "filtered": "fault-filtered split (filtered)",
}
CONFIDENCE_LEVEL = 0.95
# Probabilities written as text lose a little precision; a softmax that was rounded to six
# decimals per column is still within this of 1.
PROBABILITY_SUM_TOLERANCE = 1e-3
TOP_CONFUSED_PAIRS = 5

PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"
PER_GENRE_CSV = "per_genre.csv"

INTERVALS_NOTE = (
    "Two 95% intervals for the mean fold accuracy, both with Student's t on k-1 degrees of "
    "freedom. The naive interval, mean +- t * s / sqrt(k), treats the k fold accuracies as "
    "independent samples. They are not: in k-fold cross-validation the training sets "
    "overlap (any two folds' models share (k-2)/(k-1) of their training clips), so the fold "
    "scores are positively correlated and the naive interval is too narrow. The corrected "
    "resampled t interval of Nadeau and Bengio (2003) replaces the factor 1/k in the "
    "variance of the mean with "
    "1/k + n_test/n_train, mean +- t * s * sqrt(1/k + n_test/n_train); it is the one to "
    "quote. Both are intervals for the expected accuracy of this training recipe on data "
    "like this, not for any single fold's model; being symmetric t intervals, they are not "
    "clipped to [0, 1]."
)


@dataclass
class _FoldPredictions:
    fold: int
    directory: Path
    audio_names: list[str]
    true_index: np.ndarray  # (n,) genre index of the true genre
    probabilities: np.ndarray  # (n, len(GENRES)), columns in GENRES order
    n_train: int | None

    @property
    def predicted_index(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=1)


@dataclass
class _FailedFold:
    fold: int | None
    directory: Path
    reason: str


# --- reading -----------------------------------------------------------------------------
def _read_summary(directory: Path) -> tuple[dict | None, str | None]:
    """The folder's summary, or (None, why it is unusable) when it is missing or unreadable."""
    path = directory / SUMMARY_FILE
    if not path.is_file():
        return None, f"{path}: missing"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: unreadable ({exc})"
    if not isinstance(summary, dict):
        raise GenreflowError(f"{path}: expected a JSON object, found {type(summary).__name__}")
    return summary, None


def _summary_fold(summary: dict, path: Path) -> int:
    fold = summary.get("fold")
    # bool is an int in Python; a true/false fold is a bug, not fold 1/0
    if not isinstance(fold, int) or isinstance(fold, bool):
        raise GenreflowError(f"{path}: 'fold' must be an integer, found {fold!r}")
    return fold


def _summary_n_train(summary: dict, path: Path) -> int | None:
    n_train = summary.get("n_train")
    if n_train is None:
        return None
    if not isinstance(n_train, int) or isinstance(n_train, bool) or n_train <= 0:
        raise GenreflowError(f"{path}: 'n_train' must be a positive integer, found {n_train!r}")
    return n_train


def _parse_probability(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GenreflowError(f"{where}: column '{column}' is not a number: {text!r}") from None
    if not math.isfinite(value) or value < -1e-6 or value > 1 + 1e-6:
        raise GenreflowError(f"{where}: column '{column}' is not a probability: {text!r}")
    return value


def _read_predictions(path: Path, fold: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows of one fold's predictions.csv, validated against the contract.

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
        required = ["audio_name", "fold", "genre", *GENRES]
        missing = [column for column in required if column not in header]
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
                    f"{where}: fold {row_fold} disagrees with the folder's {SUMMARY_FILE} "
                    f"(fold {fold})"
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
            probabilities.append(probs)
    if not names:
        raise GenreflowError(f"{path}: holds a header but no predictions")
    return (
        names,
        np.asarray(true_index, dtype=np.int64),
        np.asarray(probabilities, dtype=np.float64).reshape(len(names), len(GENRES)),
    )


def _read_fold(directory: Path) -> _FoldPredictions | _FailedFold:
    if not directory.is_dir():
        return _FailedFold(None, directory, f"{directory}: folder does not exist")
    summary, why = _read_summary(directory)
    if summary is None:
        return _FailedFold(None, directory, why or "summary unusable")
    summary_path = directory / SUMMARY_FILE
    fold = _summary_fold(summary, summary_path)
    n_train = _summary_n_train(summary, summary_path)
    predictions_path = directory / PREDICTIONS_FILE
    if not predictions_path.is_file():
        return _FailedFold(fold, directory, f"{predictions_path}: missing")
    try:
        names, true_index, probabilities = _read_predictions(predictions_path, fold)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return _FailedFold(fold, directory, f"{predictions_path}: unreadable ({exc})")
    return _FoldPredictions(fold, directory, names, true_index, probabilities, n_train)


# --- statistics --------------------------------------------------------------------------
def _t_quantile(dof: int) -> float:
    return float(stats.t.ppf(0.5 + CONFIDENCE_LEVEL / 2, dof))


def _interval(mean: float, half_width: float) -> dict:
    return {"low": mean - half_width, "high": mean + half_width, "half_width": half_width}


def fold_statistics(values: list[float], test_train_ratio: float | None) -> dict:
    """Mean, sd (ddof=1), min, max and the naive and corrected 95% t intervals of k values.

    Args:
        values: one score per fold.
        test_train_ratio: n_test / n_train of a fold (about 1/9 for 10-fold CV); None
            leaves out the corrected interval.

    Returns:
        A dict; with a single fold, sd and both intervals are None (no spread to measure).
    """
    k = len(values)
    if k == 0:
        raise GenreflowError("fold statistics need at least one fold")
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean())
    result = {
        "k": k,
        "mean": mean,
        "std": None,
        "min": float(array.min()),
        "max": float(array.max()),
        "confidence_level": CONFIDENCE_LEVEL,
        "t_quantile": None,
        "test_train_ratio": test_train_ratio,
        "naive_ci": None,
        "corrected_ci": None,
    }
    if k < 2:
        return result
    std = float(array.std(ddof=1))
    t_quantile = _t_quantile(k - 1)
    naive = _interval(mean, t_quantile * std / math.sqrt(k))
    naive["method"] = "naive t interval: mean +- t * s / sqrt(k); ignores overlapping training sets"
    corrected = None
    if test_train_ratio is not None:
        corrected = _interval(mean, t_quantile * std * math.sqrt(1.0 / k + test_train_ratio))
        corrected["method"] = (
            "corrected resampled t interval (Nadeau and Bengio 2003): "
            "mean +- t * s * sqrt(1/k + n_test/n_train)"
        )
    result.update(std=std, t_quantile=t_quantile, naive_ci=naive, corrected_ci=corrected)
    return result


def _test_train_ratio(
    usable: list[_FoldPredictions], n_expected: int, train_fraction: float | None
) -> tuple[float | None, str]:
    """n_test / n_train for the correction, and where it came from.

    None for a single expected split (a train/validation/test protocol): no fold-to-fold
    spread exists there to correct, and no fold sizes tell the training set's size.
    """
    if train_fraction is not None:
        return _ratio_from_train_fraction(train_fraction), f"train_fraction={train_fraction}"
    sizes = [len(f.audio_names) for f in usable]
    if all(f.n_train is not None for f in usable):
        ratios = [len(f.audio_names) / f.n_train for f in usable]
        return float(np.mean(ratios)), f"fold sizes and n_train from {SUMMARY_FILE}"
    if n_expected < 2:
        return None, "not derivable from a single split (pass train_fraction)"
    # A fold's model trained on every other expected fold, failed ones included, so the
    # missing folds count at the mean usable fold size.
    n_total = sum(sizes) + (n_expected - len(usable)) * float(np.mean(sizes))
    ratios = [size / (n_total - size) for size in sizes]
    return float(np.mean(ratios)), "fold sizes (n_train = all other folds)"


def _ratio_from_train_fraction(train_fraction: float) -> float:
    if not 0.0 < train_fraction < 1.0:
        raise GenreflowError(
            f"train_fraction must lie strictly between 0 and 1, got {train_fraction}"
        )
    return (1.0 - train_fraction) / train_fraction


def paired_comparison(
    a_fold_acc: dict[int, float], b_fold_acc: dict[int, float], *, train_fraction: float
) -> dict:
    """Paired per-fold comparison of two runs with the Nadeau-Bengio corrected t-test.

    Args:
        a_fold_acc: fold number -> score of run A (keys may be strings, as in report.json).
        b_fold_acc: fold number -> score of run B.
        train_fraction: n_train / (n_train + n_test) of one fold, 0.9 for 10-fold CV; the
            correction uses n_test / n_train = (1 - train_fraction) / train_fraction.

    Returns:
        The common folds, the differences A - B, their mean and sd, the corrected t
        statistic, its two-sided p-value on k-1 degrees of freedom and the corrected 95%
        interval of the mean difference. With zero spread in the differences, t is 0 (p 1)
        when the mean difference is 0 and +-inf (p 0) otherwise.
    """
    ratio = _ratio_from_train_fraction(train_fraction)
    a = {int(fold): float(value) for fold, value in a_fold_acc.items()}
    b = {int(fold): float(value) for fold, value in b_fold_acc.items()}
    common = sorted(set(a) & set(b))
    k = len(common)
    if k < 2:
        raise GenreflowError(
            f"a paired comparison needs at least 2 folds scored in both runs, found {k} "
            f"(run A folds {sorted(a)}, run B folds {sorted(b)})"
        )
    differences = np.asarray([a[fold] - b[fold] for fold in common], dtype=np.float64)
    mean = float(differences.mean())
    std = float(differences.std(ddof=1))
    standard_error = std * math.sqrt(1.0 / k + ratio)
    if standard_error > 0:
        t_statistic = mean / standard_error
        p_value = float(2.0 * stats.t.sf(abs(t_statistic), k - 1))
    elif mean == 0:
        t_statistic, p_value = 0.0, 1.0
    else:
        t_statistic, p_value = math.copysign(math.inf, mean), 0.0
    t_quantile = _t_quantile(k - 1)
    interval = _interval(mean, t_quantile * standard_error)
    interval["method"] = (
        "corrected resampled t interval (Nadeau and Bengio 2003): "
        "mean_d +- t * s_d * sqrt(1/k + n_test/n_train)"
    )
    return {
        "folds": common,
        "only_in_a": sorted(set(a) - set(b)),
        "only_in_b": sorted(set(b) - set(a)),
        "differences": {fold: float(d) for fold, d in zip(common, differences, strict=True)},
        "k": k,
        "mean_difference": mean,
        "std_difference": std,
        "test_train_ratio": ratio,
        "standard_error": standard_error,
        "t_statistic": float(t_statistic),
        "dof": k - 1,
        "p_value": p_value,
        "confidence_level": CONFIDENCE_LEVEL,
        "t_quantile": t_quantile,
        "corrected_ci": interval,
        "test": "Nadeau-Bengio corrected resampled paired t-test, two-sided",
    }


def _per_genre(confusion: np.ndarray) -> tuple[list[dict], float]:
    """Precision, recall, F1 and support per genre, and the macro F1.

    An undefined ratio (no clip predicted as, or none truly of, a genre) counts as 0; the
    macro F1 averages over the genres that occur as truth or as prediction.
    """
    true_counts = confusion.sum(axis=1)
    predicted_counts = confusion.sum(axis=0)
    rows = []
    f1_present = []
    for i, genre in enumerate(GENRES):
        hits = int(confusion[i, i])
        precision = hits / predicted_counts[i] if predicted_counts[i] else 0.0
        recall = hits / true_counts[i] if true_counts[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "genre": genre,
                "precision": float(precision),
                "recall": float(recall),
                "f1": float(f1),
                "support": int(true_counts[i]),
            }
        )
        if true_counts[i] or predicted_counts[i]:
            f1_present.append(f1)
    macro_f1 = float(np.mean(f1_present)) if f1_present else 0.0
    return rows, macro_f1


def _confused_pairs(usable: list[_FoldPredictions], confusion: np.ndarray) -> list[dict]:
    clips: dict[tuple[int, int], list[str]] = {}
    for fold in usable:
        for name, true, predicted in zip(
            fold.audio_names, fold.true_index, fold.predicted_index, strict=True
        ):
            if true != predicted:
                clips.setdefault((int(true), int(predicted)), []).append(name)
    cells = [
        (int(confusion[t, p]), t, p)
        for t in range(len(GENRES))
        for p in range(len(GENRES))
        if t != p and confusion[t, p] > 0
    ]
    # most clips first; ties in genre order, so the list is the same on every run
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [
        {
            "true": GENRES[t],
            "predicted": GENRES[p],
            "count": count,
            "clips": sorted(clips[(t, p)]),
        }
        for count, t, p in cells[:TOP_CONFUSED_PAIRS]
    ]


# --- writing -----------------------------------------------------------------------------
def _current_umask() -> int:
    # os.umask can only be read by setting it; put it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new one, never half."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # a temporary file is private (0600); the report gets the mode a plain open() gives
        os.chmod(handle.name, 0o666 & ~_current_umask())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _confusion_png(confusion: np.ndarray, title: str) -> bytes:
    # The object API with an Agg canvas touches no pyplot global state or backend setting.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.5, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(confusion, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, shrink=0.8, label="clips")
    ticks = np.arange(len(GENRES))
    axes.set_xticks(ticks, labels=GENRES, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, labels=GENRES)
    axes.set_xlabel("predicted genre")
    axes.set_ylabel("true genre")
    axes.set_title(title)
    threshold = confusion.max() / 2 if confusion.max() else 1
    for t in range(len(GENRES)):
        for p in range(len(GENRES)):
            count = int(confusion[t, p])
            axes.text(
                p,
                t,
                str(count),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if count > threshold else "black",
            )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval_text(interval: dict | None) -> str:
    if interval is None:
        return "n/a (needs at least 2 folds)"
    return f"[{interval['low']:.4f}, {interval['high']:.4f}] (+- {interval['half_width']:.4f})"


def flat_metrics(report: dict) -> dict[str, float]:
    """The report's numbers as flat name -> value pairs: what MLflow and the KFP UI show.

    Per metric: each fold's value, mean, standard deviation, min, max and both intervals
    (None-valued entries, e.g. the sd of a single split, are left out).
    """
    acc = report["accuracy"]
    metrics = {
        "accuracy_mean": acc["mean"],
        "accuracy_std": acc["std"],
        "accuracy_min": acc["min"],
        "accuracy_max": acc["max"],
        "pooled_accuracy": report["pooled_accuracy"],
        "macro_f1": report["macro_f1"],
        "folds_usable": len(report["usable_folds"]),
    }
    for name, key in (("ci95", "corrected_ci"), ("naive_ci95", "naive_ci")):
        if acc.get(key):
            metrics[f"accuracy_{name}_low"] = acc[key]["low"]
            metrics[f"accuracy_{name}_high"] = acc[key]["high"]
    for row in report["folds"]:
        metrics[f"fold_{row['fold']:02d}_accuracy"] = row["accuracy"]
    return {k: float(v) for k, v in metrics.items() if v is not None}


def headline(report: dict) -> list[str]:
    """The report's key figures as a few lines of plain text (the command prints them)."""
    acc = report["accuracy"]
    lines = [
        f"{report['protocol_label']}: {len(report['usable_folds'])} of "
        f"{len(report['expected_folds'])} folds",
    ]
    if report["partial"]:
        lines.append(
            "PARTIAL: missing fold(s) "
            + ", ".join(str(f) for f in report["missing_folds"])
            + "; statistics are over the usable folds only"
        )
    else:
        lines.append("complete: every expected fold is usable")
    lines += [
        f"accuracy {_fmt(acc['mean'])} +- {_fmt(acc['std'])} (mean +- sd over {acc['k']} "
        f"folds; min {_fmt(acc['min'])}, max {_fmt(acc['max'])})",
        f"  95% CI, corrected (Nadeau-Bengio): {_interval_text(acc['corrected_ci'])}",
        f"  95% CI, naive (overlap ignored):   {_interval_text(acc['naive_ci'])}",
        f"pooled accuracy {_fmt(report['pooled_accuracy'])} over {report['n_clips']} clips; "
        f"macro F1 {_fmt(report['macro_f1'])}",
    ]
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.3rem; }
.partial { background: #fff3cd; border: 1px solid #e0a800; padding: 0.6rem; }
.headline { font-size: 1.15rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { color: #555; font-size: 0.9rem; }
img { max-width: 100%; }
"""


def _report_html(report: dict, png: bytes) -> str:
    esc = html.escape
    acc = report["accuracy"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(report['protocol_label'])}: genreflow report</title>",
        f"<style>{_CSS}</style></head><body>",
        # The first line a reader sees names the protocol that produced the numbers.
        f"<h1>{esc(report['protocol_label'])}</h1>",
    ]
    if report["partial"]:
        missing = ", ".join(str(f) for f in report["missing_folds"])
        parts.append(
            f'<p class="partial"><strong>Partial result:</strong> {len(report["usable_folds"])} '
            f"of {len(report['expected_folds'])} folds usable; fold(s) {esc(missing)} missing. "
            "Every statistic below is over the usable folds only.</p>"
        )
    parts += [
        f'<p class="note">genre classification report, genreflow {esc(report["version"])}</p>',
        '<p class="headline">Accuracy '
        f"<strong>{_fmt(acc['mean'])} &plusmn; {_fmt(acc['std'])}</strong> "
        f"(mean &plusmn; sd over {acc['k']} folds; min {_fmt(acc['min'])}, "
        f"max {_fmt(acc['max'])})</p>",
        "<ul>",
        f"<li>95% interval, corrected (Nadeau and Bengio 2003): "
        f"<strong>{esc(_interval_text(acc['corrected_ci']))}</strong>, "
        f"n_test/n_train = {_fmt(acc['test_train_ratio'])} "
        f"({esc(report['test_train_ratio_source'])})</li>",
        f"<li>95% interval, naive (ignores overlapping training sets): "
        f"{esc(_interval_text(acc['naive_ci']))}</li>",
        f"<li>pooled accuracy {_fmt(report['pooled_accuracy'])} over {report['n_clips']} "
        f"clips; macro F1 {_fmt(report['macro_f1'])}</li>",
        "</ul>",
        f'<p class="note">{esc(report["intervals_note"])}</p>',
        "<h2>Per fold</h2>",
        _table(
            ["fold", "clips", "correct", "accuracy", "folder"],
            [
                [f["fold"], f["n_clips"], f["n_correct"], _fmt(f["accuracy"]), f["dir"]]
                for f in report["folds"]
            ],
        ),
        "<h2>Failed or missing folds</h2>",
    ]
    if report["missing_folds"] or report["failed_folds"]:
        parts.append(
            "<p>Missing: "
            + esc(", ".join(str(f) for f in report["missing_folds"]) or "none")
            + "</p>"
        )
        if report["failed_folds"]:
            parts.append(
                _table(
                    ["fold", "folder", "reason"],
                    [
                        ["?" if f["fold"] is None else f["fold"], f["dir"], f["reason"]]
                        for f in report["failed_folds"]
                    ],
                )
            )
    else:
        parts.append("<p>None: every expected fold is usable.</p>")
    parts += [
        "<h2>Per genre</h2>",
        _table(
            ["genre", "precision", "recall", "F1", "support"],
            [
                [g["genre"], _fmt(g["precision"], 3), _fmt(g["recall"], 3), _fmt(g["f1"], 3)]
                + [g["support"]]
                for g in report["per_genre"]
            ],
        ),
        f"<p>macro F1 {_fmt(report['macro_f1'])}</p>",
        "<h2>Pooled confusion matrix</h2>",
        '<p class="note">Rows: true genre; columns: predicted genre.</p>',
        f'<img alt="pooled confusion matrix" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}">',
        _table(
            ["true \\ predicted", *GENRES],
            [
                [genre, *row]
                for genre, row in zip(GENRES, report["confusion"]["matrix"], strict=True)
            ],
        ),
        "<h2>Most confused genre pairs</h2>",
    ]
    if report["confused_pairs"]:
        parts.append(
            _table(
                ["true", "predicted as", "clips", "clip names"],
                [
                    [p["true"], p["predicted"], p["count"], ", ".join(p["clips"])]
                    for p in report["confused_pairs"]
                ],
            )
        )
    else:
        parts.append("<p>None: every clip was classified correctly.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --- the step ----------------------------------------------------------------------------
def aggregate(
    fold_dirs: list[str | Path],
    out: str | Path,
    *,
    expected_folds: list[int] = list(range(1, 11)),  # noqa: B006 (never mutated)
    min_folds: int = 10,
    protocol: str = "cv10",
    train_fraction: float | None = None,
) -> dict:
    """Pool the folds' held-out predictions into the cross-validation report.

    Args:
        fold_dirs: one folder per fold, as the training step leaves it.
        out: folder for report.json, report.html, confusion.csv, confusion.png and
            per_genre.csv (created if needed; each file replaced atomically).
        expected_folds: the folds the run was meant to have.
        min_folds: the fewest usable folds that still give a (partial) result.
        protocol: the evaluation protocol that produced the folds (see PROTOCOL_LABELS).
        train_fraction: n_train / (n_train + n_test) of a fold for the interval correction;
            None derives n_test / n_train from the fold sizes (or from `n_train` in each
            summary.json when every usable fold has it).

    Returns:
        The report, as written to report.json.

    Raises:
        GenreflowError: fewer than `min_folds` usable folds (naming the missing ones), or a
            fold whose files break the contract (naming the file and line).
    """
    if protocol not in PROTOCOL_LABELS:
        raise GenreflowError(
            f"unknown protocol {protocol!r} (known: {', '.join(sorted(PROTOCOL_LABELS))})"
        )
    expected = sorted(set(int(f) for f in expected_folds))
    if not expected:
        raise GenreflowError("expected_folds is empty")
    if not 1 <= min_folds <= len(expected):
        raise GenreflowError(
            f"min_folds must lie between 1 and the {len(expected)} expected folds, got {min_folds}"
        )
    if not fold_dirs:
        raise GenreflowError("no fold folders given")

    usable: dict[int, _FoldPredictions] = {}
    failed: list[_FailedFold] = []
    clip_home: dict[str, tuple[Path, int]] = {}
    for raw in fold_dirs:
        result = _read_fold(Path(raw))
        if isinstance(result, _FailedFold):
            failed.append(result)
            continue
        if result.fold not in expected:
            raise GenreflowError(
                f"{result.directory / SUMMARY_FILE}: fold {result.fold} is not one of the "
                f"expected folds {expected}"
            )
        if result.fold in usable:
            raise GenreflowError(
                f"fold {result.fold} given twice: {usable[result.fold].directory} and "
                f"{result.directory}"
            )
        for name in result.audio_names:
            if name in clip_home:
                other_dir, other_fold = clip_home[name]
                raise GenreflowError(
                    f"{result.directory / PREDICTIONS_FILE}: clip {name} is also predicted in "
                    f"{other_dir / PREDICTIONS_FILE} (fold {other_fold}); cross-validation "
                    "predicts each clip exactly once"
                )
            clip_home[name] = (result.directory, result.fold)
        usable[result.fold] = result

    missing = [fold for fold in expected if fold not in usable]
    if len(usable) < min_folds:
        reasons = "; ".join(f.reason for f in failed) or "no other reason recorded"
        raise GenreflowError(
            f"only {len(usable)} of {len(expected)} folds usable, {min_folds} needed: "
            f"missing fold(s) {', '.join(str(f) for f in missing)} ({reasons})"
        )

    folds = [usable[fold] for fold in sorted(usable)]
    ratio, ratio_source = _test_train_ratio(folds, len(expected), train_fraction)
    fold_rows = []
    for fold in folds:
        n_correct = int(np.sum(fold.predicted_index == fold.true_index))
        fold_rows.append(
            {
                "fold": fold.fold,
                "n_clips": len(fold.audio_names),
                "n_correct": n_correct,
                "accuracy": n_correct / len(fold.audio_names),
                "dir": str(fold.directory),
            }
        )
    accuracy = fold_statistics([row["accuracy"] for row in fold_rows], ratio)

    confusion = np.zeros((len(GENRES), len(GENRES)), dtype=np.int64)
    for fold in folds:
        np.add.at(confusion, (fold.true_index, fold.predicted_index), 1)
    per_genre, macro_f1 = _per_genre(confusion)
    n_clips = int(confusion.sum())

    report = {
        "protocol": protocol,
        "protocol_label": PROTOCOL_LABELS[protocol],
        "version": __version__,
        "partial": bool(missing),
        "expected_folds": expected,
        "usable_folds": sorted(usable),
        "missing_folds": missing,
        "failed_folds": [
            {"fold": f.fold, "dir": str(f.directory), "reason": f.reason} for f in failed
        ],
        "min_folds": min_folds,
        "n_clips": n_clips,
        "genres": list(GENRES),
        "folds": fold_rows,
        "fold_accuracy": {str(row["fold"]): row["accuracy"] for row in fold_rows},
        "accuracy": accuracy,
        "test_train_ratio_source": ratio_source,
        "intervals_note": INTERVALS_NOTE,
        "pooled_accuracy": float(np.trace(confusion)) / n_clips,
        "per_genre": per_genre,
        "macro_f1": macro_f1,
        "confusion": {
            "rows": "true genre",
            "columns": "predicted genre",
            "labels": list(GENRES),
            "matrix": confusion.tolist(),
        },
        "confused_pairs": _confused_pairs(folds, confusion),
        "outputs": [REPORT_JSON, REPORT_HTML, CONFUSION_CSV, CONFUSION_PNG, PER_GENRE_CSV],
    }

    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenreflowError(f"{out_dir}: cannot create the output folder ({exc})") from exc
    png = _confusion_png(
        confusion,
        f"Pooled confusion, {PROTOCOL_LABELS[protocol]}"
        + (f" (partial: {len(usable)}/{len(expected)} folds)" if missing else ""),
    )
    _write_atomic(
        out_dir / CONFUSION_CSV,
        _csv_text(
            [["true", *GENRES]]
            + [[genre, *row] for genre, row in zip(GENRES, confusion.tolist(), strict=True)]
        ),
    )
    _write_atomic(
        out_dir / PER_GENRE_CSV,
        _csv_text(
            [["genre", "precision", "recall", "f1", "support"]]
            + [[g["genre"], g["precision"], g["recall"], g["f1"], g["support"]] for g in per_genre]
        ),
    )
    _write_atomic(out_dir / CONFUSION_PNG, png)
    _write_atomic(out_dir / REPORT_HTML, _report_html(report, png))
    # report.json last: its presence means the whole report is there
    _write_atomic(out_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    return report
