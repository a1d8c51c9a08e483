"""Out-of-fold predictions -> the evaluation report, for either protocol.

Each fold's training step leaves a folder with `predictions.csv` (columns `audio_name`,
`fold`, `genre`, then one probability column per genre, named by the genre) and
`summary.json` (at least `{"fold": K}`). Optional summary keys, carried into the report:
`n_train` (clips the fold's model trained on), `protocol` ("cv10" or "filtered"; absent
means the run did not record it: cv10 unless the caller says otherwise), `selection`
("validation" or "heldout": what chose the checkpoint), `split` (clip counts `train`,
`valid`, `test`, `excluded`, `missing`, and the lists `excluded_names`, `missing_names`),
`valid_accuracy`, `selected_iteration`, `peak_test_accuracy` (shown, labelled optimistic,
never used), `data_sha256`, `split_sha256` and `seeds`.

The two protocols pool differently:

- cv10: the folds partition the data, every clip is predicted exactly once, and the folds
  pool into one out-of-fold confusion matrix;
- filtered: the fold number is a *repetition*: the same train/validation/test lists, the
  seed shifted by fold - 1. Every repetition predicts the same test clips; the pooled
  confusion matrix is the sum over the repetitions.

Two kinds of trouble are told apart on purpose:

- a fold whose files are missing or cannot be read did not finish: it is a *failed fold*,
  named in the report, and the statistics are taken over the usable folds only (down to
  `min_folds`; below that, an error);
- a file that reads but breaks the contract (a clip predicted twice, a fold number that
  disagrees with the folder's summary, an unknown genre, probabilities that do not sum to
  1) is a bug upstream: a `GenreflowError` naming the file and line, never a silent skip.

Fold statistics (cv10): the k fold accuracies are not independent samples, because any two
folds' models share most of their training clips. Beside the naive t interval the report
gives the corrected resampled t interval of Nadeau and Bengio (2003, "Inference for the
Generalization Error", Machine Learning 52:239-281), which inflates the variance of the
mean from s^2/k to s^2 (1/k + n_test/n_train). `paired_comparison` applies the same
correction to the per-fold differences between two runs.

Statistics (filtered): no training sets overlap in that sense (every repetition trains on
the same clips), so there is nothing for Nadeau-Bengio to correct. The t interval over the
repetitions measures training randomness only; the interval to quote is the Wilson score
interval of the test accuracy on n = the test set's size (Wilson 1927).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from genreflow import __version__
from genreflow.atomic import write_atomic, write_text_atomic
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.fold_result import (
    SPLIT_COUNTS,
    SPLIT_NAMES,
    SUMMARY,
    FailedFold,
    FoldResult,
    csv_text,
    read_fold,
)
from genreflow.recipe import RECIPE_VERSION, recipe_label, recipe_version_of
from genreflow.splits import DEFAULT_PROTOCOL, SELECTIONS  # "heldout": the seed's choice

PROTOCOL_LABELS: dict[str, str] = {
    "cv10": "10-fold cross-validation (cv10)",
    "filtered": "fault-filtered split (filtered)",
}
# What a fold is called in the report: cv10 folds partition the data, filtered ones repeat it.
FOLD_NOUN = {"cv10": "fold", "filtered": "repetition"}
CONFIDENCE_LEVEL = 0.95
TOP_CONFUSED_PAIRS = 5

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
FILTERED_INTERVALS_NOTE = (
    "Two 95% intervals, for two different sources of uncertainty. The Wilson score interval "
    "is for the test accuracy: it treats the n test clips as a sample of clips like them, "
    "with p the pooled accuracy (correct predictions over all predictions, which with "
    "repetitions of equal size is the mean repetition accuracy) and n the test set's size, "
    "not n times the repetitions, because repeating the training adds no test clips. It is "
    "the one to quote: it says how far the figure could move on another test set of this "
    "size, and it is defined even for a single repetition. The t interval over the R "
    "repetitions, mean +- t * s / sqrt(R) on R-1 degrees of freedom, measures training "
    "randomness only: every repetition trains on the same clips, chooses its checkpoint on "
    "the same validation clips and predicts the same test clips; only the seed changes. The "
    "Nadeau-Bengio correction of 10-fold cross-validation does not apply here: it accounts "
    "for training sets that overlap from fold to fold, and this protocol does not resample "
    "its training set at all."
)


def selection_label(selection: str | None, protocol: str) -> str | None:
    """How the checkpoint was chosen, in words; None when the run did not record it."""
    if selection is None:
        return None
    if selection == "validation":
        return "checkpoint chosen on the validation split"
    held_out = "held-out fold" if protocol == "cv10" else "held-out test split"
    return f"checkpoint chosen on the {held_out}, as the seed did: optimistic"


# --- statistics --------------------------------------------------------------------------
def _t_quantile(dof: int) -> float:
    return float(stats.t.ppf(0.5 + CONFIDENCE_LEVEL / 2, dof))


def _interval(mean: float, half_width: float) -> dict:
    return {"low": mean - half_width, "high": mean + half_width, "half_width": half_width}


def _t_interval(values: np.ndarray, mean: float, std: float) -> dict:
    """Student's t interval of the mean of `values` (scipy's one-sample t test)."""
    if std == 0:  # no spread: scipy's interval is undefined (nan), the hand one is a point
        return _interval(mean, 0.0)
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE_LEVEL)
    return {"low": float(ci.low), "high": float(ci.high), "half_width": (ci.high - ci.low) / 2}


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
    naive = _t_interval(array, mean, std)
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


def wilson_interval(accuracy: float, n: int) -> dict:
    """The Wilson score 95% interval of a proportion observed on n trials.

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half width =
    z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2), with z the normal quantile. Unlike
    p +- z sqrt(p (1 - p) / n) it stays inside [0, 1] and keeps its coverage near 0 and 1.
    """
    if n < 1:
        raise GenreflowError(f"a Wilson interval needs at least one trial, got n = {n}")
    if not 0.0 <= accuracy <= 1.0:
        raise GenreflowError(f"a Wilson interval needs a proportion in [0, 1], got {accuracy}")
    z = float(stats.norm.ppf(0.5 + CONFIDENCE_LEVEL / 2))
    shrink = 1.0 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / shrink
    half_width = z / shrink * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    interval = _interval(centre, half_width)
    interval.update(
        centre=centre,
        n=n,
        z=z,
        method="Wilson score interval of the test accuracy on n = the test set's size",
    )
    return interval


def _test_train_ratio(
    usable: list[FoldResult], n_expected: int, train_fraction: float | None
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
        return float(np.mean(ratios)), f"fold sizes and n_train from {SUMMARY}"
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


def _confused_pairs(usable: list[FoldResult], confusion: np.ndarray) -> list[dict]:
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
            # a filtered run's repetitions may miss the same clip: name it once
            "clips": sorted(set(clips[(t, p)])),
        }
        for count, t, p in cells[:TOP_CONFUSED_PAIRS]
    ]


# --- writing -----------------------------------------------------------------------------
def confusion_png(confusion: np.ndarray, title: str) -> bytes:
    """A confusion matrix (rows: true genre, columns: predicted) as a PNG image."""
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


def _interval_text(interval: dict | None, noun: str = "fold") -> str:
    if interval is None:
        return f"n/a (needs at least 2 {noun}s)"
    return f"[{interval['low']:.4f}, {interval['high']:.4f}] (+- {interval['half_width']:.4f})"


def flat_metrics(report: dict) -> dict[str, float]:
    """The report's numbers as flat name -> value pairs: what MLflow and the KFP UI show.

    Per metric: each fold's value, mean, standard deviation, min, max and both intervals
    (None-valued entries, e.g. the sd of a single split, are left out). Both protocols use
    the same names, so one MLflow table compares them: `accuracy_ci95_*` is the interval to
    quote (Nadeau-Bengio for cv10, Wilson for filtered), `accuracy_naive_ci95_*` the plain t
    interval over folds or repetitions, `fold_KK_accuracy` fold or repetition KK.
    """
    acc = report["accuracy"]
    # reports written before the filtered protocol had no "reported_ci"
    reported = acc.get("reported_ci", acc.get("corrected_ci"))
    metrics = {
        "accuracy_mean": acc["mean"],
        "accuracy_std": acc["std"],
        "accuracy_min": acc["min"],
        "accuracy_max": acc["max"],
        "pooled_accuracy": report["pooled_accuracy"],
        "macro_f1": report["macro_f1"],
        "folds_usable": len(report["usable_folds"]),
    }
    for name, interval in (("ci95", reported), ("naive_ci95", acc.get("naive_ci"))):
        if interval:
            metrics[f"accuracy_{name}_low"] = interval["low"]
            metrics[f"accuracy_{name}_high"] = interval["high"]
    # what `genreflow compare` needs for the corrected paired test (cv10 only)
    metrics["test_train_ratio"] = acc.get("test_train_ratio")
    for row in report["folds"]:
        metrics[f"fold_{row['fold']:02d}_accuracy"] = row["accuracy"]
    return {k: float(v) for k, v in metrics.items() if v is not None}


def headline(report: dict) -> list[str]:
    """The report's key figures as a few lines of plain text (the command prints them)."""
    acc = report["accuracy"]
    noun = report.get("fold_noun", "fold")
    lines = [
        f"{report['protocol_label']}: {len(report['usable_folds'])} of "
        f"{len(report['expected_folds'])} {noun}s",
    ]
    if report.get("selection_label"):
        lines.append(report["selection_label"])
    if old := old_recipe_note(report):
        lines.append(old)
    if report["partial"]:
        lines.append(
            f"PARTIAL: missing {noun}(s) "
            + ", ".join(str(f) for f in report["missing_folds"])
            + f"; statistics are over the usable {noun}s only"
        )
    else:
        lines.append(f"complete: every expected {noun} is usable")
    lines.append(
        f"accuracy {_fmt(acc['mean'])} +- {_fmt(acc['std'])} (mean +- sd over {acc['k']} "
        f"{noun}s; min {_fmt(acc['min'])}, max {_fmt(acc['max'])})"
    )
    if report.get("protocol") == "filtered":
        lines += [
            f"  95% CI, Wilson (test set of {report['n_clips']} clips): "
            f"{_interval_text(acc['wilson_ci'], noun)}",
            f"  95% CI, t over repetitions (training randomness only): "
            f"{_interval_text(acc['naive_ci'], noun)}",
            f"pooled accuracy {_fmt(report['pooled_accuracy'])} over {report['n_clips']} test "
            f"clips x {acc['k']} repetition(s); macro F1 {_fmt(report['macro_f1'])}",
        ]
    else:
        lines += [
            f"  95% CI, corrected (Nadeau-Bengio): {_interval_text(acc['corrected_ci'])}",
            f"  95% CI, naive (overlap ignored):   {_interval_text(acc['naive_ci'])}",
            f"pooled accuracy {_fmt(report['pooled_accuracy'])} over {report['n_clips']} "
            f"clips; macro F1 {_fmt(report['macro_f1'])}",
        ]
    split = report.get("split")
    if split:  # the names (70 excluded on the real lists) are in report.json and the page
        lines.append(_split_text(split, with_names=False))
    return lines


def old_recipe_note(report: dict) -> str:
    """A line saying the folds were trained under an earlier recipe ("" for today's)."""
    version = report.get("recipe_version")
    if version is None or version == RECIPE_VERSION:
        return ""
    return (
        f"OLDER RECIPE: trained under {recipe_label(version)}, not today's "
        f"{recipe_label(RECIPE_VERSION)}"
    )


def _count_text(value) -> str:
    if value is None:
        return "?"
    if isinstance(value, dict):  # differs by fold
        numbers = [v for v in value.values() if v is not None]
        return f"{min(numbers)}-{max(numbers)}" if numbers else "?"
    return str(value)


def _split_text(split: dict, *, with_names: bool = True) -> str:
    text = (
        f"clips: train {_count_text(split['train'])}, validation {_count_text(split['valid'])}, "
        f"test {_count_text(split['test'])}; excluded {_count_text(split['excluded'])}, "
        f"missing {_count_text(split['missing'])}"
    )
    for key, label in (("excluded_names", "excluded"), ("missing_names", "missing")):
        names = split.get(key) if with_names else None
        if isinstance(names, list) and names:
            text += f"; {label}: {', '.join(names)}"
    return text


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


def _intervals_html(report: dict) -> list[str]:
    esc = html.escape
    acc = report["accuracy"]
    noun = report["fold_noun"]
    if report["protocol"] == "filtered":
        return [
            f"<li>95% interval, Wilson (test accuracy, n = {report['n_clips']} test clips): "
            f"<strong>{esc(_interval_text(acc['wilson_ci'], noun))}</strong></li>",
            "<li>95% interval, t over repetitions (training randomness only): "
            f"{esc(_interval_text(acc['naive_ci'], noun))}</li>",
            f"<li>pooled accuracy {_fmt(report['pooled_accuracy'])} over "
            f"{report['n_clips']} test clips &times; {acc['k']} repetition(s); "
            f"macro F1 {_fmt(report['macro_f1'])}</li>",
        ]
    return [
        f"<li>95% interval, corrected (Nadeau and Bengio 2003): "
        f"<strong>{esc(_interval_text(acc['corrected_ci']))}</strong>, "
        f"n_test/n_train = {_fmt(acc['test_train_ratio'])} "
        f"({esc(report['test_train_ratio_source'])})</li>",
        f"<li>95% interval, naive (ignores overlapping training sets): "
        f"{esc(_interval_text(acc['naive_ci']))}</li>",
        f"<li>pooled accuracy {_fmt(report['pooled_accuracy'])} over {report['n_clips']} "
        f"clips; macro F1 {_fmt(report['macro_f1'])}</li>",
    ]


def _reproducibility(folds) -> str:
    """What a rerun with the same seed will give, by the devices the folds trained on."""
    devices = sorted({str(f.summary.get("device", "cpu")).split(":")[0] for f in folds})
    if devices == ["cpu"]:
        return (
            "trained on CPU: a rerun with the same seed, data and versions gives the same "
            "numbers, bit for bit"
        )
    return (
        f"trained on {', '.join(devices)}: a rerun with the same seed is not bit-identical "
        "(cuDNN chooses convolution algorithms per run and some GPU kernels accumulate in a "
        "nondeterministic order); expect each fold to move by a few clips, which is the "
        "fold-to-fold noise genreflow compare tests differences against"
    )


def _provenance_html(report: dict) -> list[str]:
    esc = html.escape
    items = []
    if report.get("reproducibility"):
        items.append(f"<li>reproducibility: {esc(report['reproducibility'])}</li>")
    if report["split"]:
        items.append(f"<li>{esc(_split_text(report['split']))}</li>")
    for key, label in (("data_sha256", "data SHA-256"), ("split_sha256", "split lists SHA-256")):
        if report[key]:
            items.append(f"<li>{label}: <code>{esc(str(report[key]))}</code></li>")
    if report["seeds"]:
        seeds = "; ".join(f"{fold}: {json.dumps(v)}" for fold, v in report["seeds"].items())
        items.append(f"<li>seeds by {report['fold_noun']}: {esc(seeds)}</li>")
    if not report["selection"]:
        items.append("<li>checkpoint selection: not recorded by the folds</li>")
    if not items:
        return []
    return ["<h2>Data and provenance</h2>", "<ul>", *items, "</ul>"]


def _folds_html(report: dict) -> list[str]:
    """The per-fold table, and the failed or missing folds."""
    esc = html.escape
    noun = report["fold_noun"]
    parts = []
    header = [noun, "clips", "correct", "accuracy"]
    with_valid = any(f["valid_accuracy"] is not None for f in report["folds"])
    with_iteration = any(f["selected_iteration"] is not None for f in report["folds"])
    with_peak = any(f.get("peak_test_accuracy") is not None for f in report["folds"])
    header += ["validation accuracy"] * with_valid + ["selected iteration"] * with_iteration
    header += ["peak test accuracy (optimistic)"] * with_peak
    rows = []
    for f in report["folds"]:
        row = [f["fold"], f["n_clips"], f["n_correct"], _fmt(f["accuracy"])]
        if with_valid:
            row.append(_fmt(f["valid_accuracy"]))
        if with_iteration:
            row.append("n/a" if f["selected_iteration"] is None else f["selected_iteration"])
        if with_peak:
            row.append(_fmt(f.get("peak_test_accuracy")))
        rows.append([*row, f["dir"]])
    parts.append(_table([*header, "folder"], rows))
    if with_peak:
        parts.append(
            "<p>Peak test accuracy: the highest accuracy on the test rows at any evaluation "
            "while training. Picking it means choosing on the test rows, so it is optimistic: "
            "it is not the result and takes no part in any figure above.</p>"
        )
    parts.append(f"<h2>Failed or missing {noun}s</h2>")
    if report["missing_folds"] or report["failed_folds"]:
        parts.append(
            "<p>Missing: "
            + esc(", ".join(str(f) for f in report["missing_folds"]) or "none")
            + "</p>"
        )
        if report["failed_folds"]:
            parts.append(
                _table(
                    [noun, "folder", "reason"],
                    [
                        ["?" if f["fold"] is None else f["fold"], f["dir"], f["reason"]]
                        for f in report["failed_folds"]
                    ],
                )
            )
    else:
        parts.append(f"<p>None: every expected {noun} is usable.</p>")
    return parts


def _report_html(report: dict, png: bytes) -> str:
    esc = html.escape
    acc = report["accuracy"]
    noun = report["fold_noun"]
    # The first line a reader sees names the protocol that produced the numbers, and what
    # chose the checkpoints when the folds recorded it.
    first_line = report["protocol_label"]
    if report["selection_label"]:
        first_line += f"; {report['selection_label']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(report['protocol_label'])}: genreflow report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(first_line)}</h1>",
    ]
    if report["partial"]:
        missing = ", ".join(str(f) for f in report["missing_folds"])
        parts.append(
            f'<p class="partial"><strong>Partial result:</strong> {len(report["usable_folds"])} '
            f"of {len(report['expected_folds'])} {noun}s usable; {noun}(s) {esc(missing)} "
            f"missing. Every statistic below is over the usable {noun}s only.</p>"
        )
    if old := old_recipe_note(report):
        parts.append(f'<p class="partial">{esc(old)}</p>')
    parts += [
        f'<p class="note">genre classification report, genreflow {esc(report["version"])}</p>',
        '<p class="headline">Accuracy '
        f"<strong>{_fmt(acc['mean'])} &plusmn; {_fmt(acc['std'])}</strong> "
        f"(mean &plusmn; sd over {acc['k']} {noun}s; min {_fmt(acc['min'])}, "
        f"max {_fmt(acc['max'])})</p>",
        "<ul>",
        *_intervals_html(report),
        "</ul>",
        f'<p class="note">{esc(report["intervals_note"])}</p>',
        *_provenance_html(report),
        f"<h2>Per {noun}</h2>",
    ]
    parts += _folds_html(report)
    parts += [
        "<h2>Per genre</h2>",
        (
            f'<p class="note">Support counts predictions: each test clip once per '
            f"repetition ({report['accuracy']['k']}).</p>"
            if report["protocol"] == "filtered"
            else ""
        ),
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
        f'<p class="note">Rows: true genre; columns: predicted genre. Pooled over '
        f"{esc(report['confusion']['pooled_over'])}.</p>",
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
def _read_usable(
    fold_dirs: list[str | Path], expected: list[int]
) -> tuple[dict[int, FoldResult], list[FailedFold]]:
    usable: dict[int, FoldResult] = {}
    failed: list[FailedFold] = []
    for raw in fold_dirs:
        result = read_fold(Path(raw))
        if isinstance(result, FailedFold):
            failed.append(result)
            continue
        if result.fold not in expected:
            raise GenreflowError(
                f"{result.summary_path}: fold {result.fold} is not one of the "
                f"expected folds {expected}"
            )
        if result.fold in usable:
            raise GenreflowError(
                f"fold {result.fold} given twice: {usable[result.fold].directory} and "
                f"{result.directory}"
            )
        usable[result.fold] = result
    return usable, failed


def _agreed(folds: list[FoldResult], what: str, value_of) -> object:
    """The one value every fold gives for `what`; an error naming two folders that differ."""
    first = folds[0]
    first_value = value_of(first)
    for fold in folds[1:]:
        value = value_of(fold)
        if value != first_value:
            raise GenreflowError(
                f"the folds disagree on {what}: {first.summary_path} says {first_value!r}, "
                f"{fold.summary_path} says {value!r}; the folds of one run must share it"
            )
    return first_value


def _resolve_protocol(folds: list[FoldResult], requested: str | None) -> str:
    """The protocol the folds' summaries record (absent = cv10), checked against the caller's.

    When no summary records one (runs from before the key existed), the caller's word is
    taken, and cv10 without it.
    """
    if requested is not None and requested not in PROTOCOL_LABELS:
        raise GenreflowError(
            f"unknown protocol {requested!r} (known: {', '.join(sorted(PROTOCOL_LABELS))})"
        )
    stated = [f for f in folds if f.choice("protocol", PROTOCOL_LABELS) is not None]
    if not stated:
        return requested or DEFAULT_PROTOCOL
    protocol = _agreed(
        folds,
        "the protocol",
        lambda f: f.choice("protocol", PROTOCOL_LABELS) or DEFAULT_PROTOCOL,
    )
    if requested is not None and requested != protocol:
        raise GenreflowError(
            f"asked to aggregate protocol {requested!r}, but {stated[0].summary_path} "
            f"records protocol {protocol!r}"
        )
    return str(protocol)


def _check_cv10_clips(folds: list[FoldResult]) -> None:
    """Cross-validation predicts each clip exactly once across the folds."""
    clip_home: dict[str, FoldResult] = {}
    for fold in folds:
        for name in fold.audio_names:
            other = clip_home.get(name)
            if other is not None:
                raise GenreflowError(
                    f"{fold.predictions_path}: clip {name} is also predicted in "
                    f"{other.predictions_path} (fold {other.fold}); "
                    "cross-validation predicts each clip exactly once"
                )
            clip_home[name] = fold


def _check_filtered_clips(folds: list[FoldResult]) -> None:
    """Every repetition predicts the same test clips, with the same true genre."""
    reference = folds[0]
    truth = dict(zip(reference.audio_names, reference.true_index.tolist(), strict=True))
    for fold in folds[1:]:
        names = set(fold.audio_names)
        extra = sorted(names - truth.keys())
        lacking = sorted(truth.keys() - names)
        if extra or lacking:
            raise GenreflowError(
                f"{fold.predictions_path}: repetition {fold.fold} predicts a "
                f"different set of clips than repetition {reference.fold} "
                f"({reference.predictions_path}): {len(extra)} extra "
                f"{_some(extra)}, {len(lacking)} lacking {_some(lacking)}; every repetition "
                "of the filtered protocol predicts the same test list"
            )
        for name, true in zip(fold.audio_names, fold.true_index.tolist(), strict=True):
            if truth[name] != true:
                raise GenreflowError(
                    f"{fold.predictions_path}: clip {name} is {GENRES[true]} in "
                    f"repetition {fold.fold} but {GENRES[truth[name]]} in repetition "
                    f"{reference.fold}"
                )


def _some(names: list[str], shown: int = 3) -> str:
    if not names:
        return "(none)"
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return "(" + ", ".join(names[:shown]) + more + ")"


def _split_report(folds: list[FoldResult]) -> dict | None:
    """The split's counts and names: one value where the folds agree, else per fold.

    None when no fold recorded its split.
    """
    splits = {f.fold: f.split() for f in folds}
    if all(split is None for split in splits.values()):
        return None
    result: dict = {}
    for key in (*SPLIT_COUNTS, *SPLIT_NAMES):
        values = {fold: (split or {}).get(key) for fold, split in splits.items()}
        distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
        # cv10 folds train on different clips, so their counts may differ: keep each fold's
        result[key] = (
            next(iter(values.values()))
            if len(distinct) == 1
            else {str(fold): value for fold, value in values.items()}
        )
    return result


def aggregate(
    fold_dirs: list[str | Path],
    out: str | Path,
    *,
    expected_folds: list[int] = list(range(1, 11)),  # noqa: B006 (never mutated)
    min_folds: int = 10,
    protocol: str | None = None,
    train_fraction: float | None = None,
) -> dict:
    """Pool the folds' (or repetitions') test predictions into the evaluation report.

    Args:
        fold_dirs: one folder per fold, as the training step leaves it.
        out: folder for report.json, report.html, confusion.csv, confusion.png and
            per_genre.csv (created if needed; each file replaced atomically).
        expected_folds: the folds (repetitions, under "filtered") the run was meant to have.
        min_folds: the fewest usable folds that still give a (partial) result.
        protocol: the evaluation protocol (see PROTOCOL_LABELS); None takes it from the
            folds' summary.json, where a summary without one counts as cv10. Given, it must
            agree with what the summaries record.
        train_fraction: cv10 only: n_train / (n_train + n_test) of a fold for the interval
            correction; None derives n_test / n_train from the fold sizes (or from `n_train`
            or the split's `train` count in each summary.json when every usable fold has it).

    Returns:
        The report, as written to report.json.

    Raises:
        GenreflowError: fewer than `min_folds` usable folds (naming the missing ones), folds
            that disagree on the protocol, the selection or the data and split checksums
            (naming two of their folders), or a fold whose files break the contract (naming
            the file and line).
    """
    expected = _expected_folds(fold_dirs, expected_folds, min_folds, protocol)
    usable, failed = _read_usable(fold_dirs, expected)
    # The clip check comes first: a clip predicted twice is a bug even when folds are missing.
    given_order = list(usable.values())
    if given_order:
        protocol = _resolve_protocol(given_order, protocol)
        if protocol == "cv10":
            _check_cv10_clips(given_order)
        else:
            _check_filtered_clips(sorted(given_order, key=lambda f: f.fold))
    protocol = protocol or DEFAULT_PROTOCOL

    missing = [fold for fold in expected if fold not in usable]
    if len(usable) < min_folds:
        reasons = "; ".join(f.reason for f in failed) or "no other reason recorded"
        raise GenreflowError(
            f"only {len(usable)} of {len(expected)} folds usable, {min_folds} needed: "
            f"missing fold(s) {', '.join(str(f) for f in missing)} ({reasons})"
        )
    folds = [usable[fold] for fold in sorted(usable)]
    report = _report(folds, failed, protocol, expected, min_folds, train_fraction)
    _write_report(Path(out), report)
    return report


def _expected_folds(fold_dirs, expected_folds, min_folds: int, protocol: str | None) -> list[int]:
    """The expected folds, sorted, once the arguments are checked."""
    if protocol is not None and protocol not in PROTOCOL_LABELS:
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
    return expected


def confusion_matrix(folds: list[FoldResult]) -> np.ndarray:
    """(true genre, predicted genre) counts over the folds' predictions."""
    confusion = np.zeros((len(GENRES), len(GENRES)), dtype=np.int64)
    for fold in folds:
        np.add.at(confusion, (fold.true_index, fold.predicted_index), 1)
    return confusion


def fold_confusion_png(fold_dir: str | Path) -> bytes:
    """One fold's own confusion matrix as a PNG image (what its tracking run shows).

    Raises:
        GenreflowError: the folder holds no usable fold, or its files break the contract.
    """
    fold = read_fold(fold_dir)
    if isinstance(fold, FailedFold):
        raise GenreflowError(f"no confusion matrix to draw: {fold.reason}")
    protocol = fold.choice("protocol", PROTOCOL_LABELS) or DEFAULT_PROTOCOL
    title = f"Confusion, {FOLD_NOUN[protocol]} {fold.fold}, {PROTOCOL_LABELS[protocol]}"
    return confusion_png(confusion_matrix([fold]), title)


def _fold_row(fold: FoldResult) -> dict:
    n_correct = int(np.sum(fold.predicted_index == fold.true_index))
    return {
        "fold": fold.fold,
        "n_clips": len(fold.audio_names),
        "n_correct": n_correct,
        "accuracy": n_correct / len(fold.audio_names),
        "n_train": fold.n_train,
        "valid_accuracy": fold.number("valid_accuracy"),
        "selected_iteration": fold.number("selected_iteration"),
        # The highest test accuracy seen while training: chosen on the test rows, so shown
        # only beside the result, labelled optimistic, never averaged into it.
        "peak_test_accuracy": fold.number("peak_test_accuracy"),
        "dir": str(fold.directory),
    }


def _accuracy(
    protocol: str,
    folds: list[FoldResult],
    values: list[float],
    pooled_accuracy: float,
    n_expected: int,
    train_fraction: float | None,
) -> dict:
    """The accuracy statistics the protocol calls for, and how the report explains them:
    accuracy (fold_statistics plus wilson_ci and reported_ci), test_train_ratio_source,
    intervals_note, n_clips and pooled_over."""
    if protocol == "cv10":
        ratio, ratio_source = _test_train_ratio(folds, n_expected, train_fraction)
        accuracy = fold_statistics(values, ratio)
        accuracy["wilson_ci"] = None
        accuracy["reported_ci"] = accuracy["corrected_ci"]
        return {
            "accuracy": accuracy,
            "test_train_ratio_source": ratio_source,
            "intervals_note": INTERVALS_NOTE,
            "n_clips": sum(len(f.audio_names) for f in folds),
            "pooled_over": "each clip once: the folds' out-of-fold predictions",
        }
    if train_fraction is not None:
        raise GenreflowError(
            "train_fraction applies to cv10 only: the filtered protocol trains every "
            "repetition on the same clips, so there is no overlap to correct for"
        )
    accuracy = fold_statistics(values, None)
    if accuracy["naive_ci"] is not None:
        accuracy["naive_ci"]["method"] = (
            "t interval over repetitions: mean +- t * s / sqrt(R); measures training "
            "randomness only (every repetition trains and tests on the same clips)"
        )
    n_clips = len(folds[0].audio_names)
    # the pooled proportion, but on the test set's size: repetitions add no test clips
    accuracy["wilson_ci"] = wilson_interval(pooled_accuracy, n_clips)
    accuracy["reported_ci"] = accuracy["wilson_ci"]
    return {
        "accuracy": accuracy,
        "test_train_ratio_source": (
            "not used: every repetition trains on the same clips, no overlap to correct for"
        ),
        "intervals_note": FILTERED_INTERVALS_NOTE,
        "n_clips": n_clips,
        "pooled_over": (
            f"the sum over {len(folds)} repetition(s): each of the {n_clips} test clips is "
            f"counted once per repetition"
        ),
    }


def _report(
    folds: list[FoldResult],
    failed: list[FailedFold],
    protocol: str,
    expected: list[int],
    min_folds: int,
    train_fraction: float | None,
) -> dict:
    """report.json's content, from the usable folds (in fold order) and the failed ones."""
    selection = _agreed(
        folds, "the checkpoint selection", lambda f: f.choice("selection", SELECTIONS)
    )
    data_sha256 = _agreed(folds, "the data checksum", lambda f: f.summary.get("data_sha256"))
    split_sha256 = _agreed(folds, "the split checksum", lambda f: f.summary.get("split_sha256"))
    # None where the summaries record no config at all (hand-made folders): not labelled.
    recipe_version = _agreed(
        folds,
        "the recipe version",
        lambda f: recipe_version_of(f.summary["config"]) if f.summary.get("config") else None,
    )
    fold_rows = [_fold_row(fold) for fold in folds]
    confusion = confusion_matrix(folds)
    per_genre, macro_f1 = _per_genre(confusion)
    n_predictions = int(confusion.sum())
    pooled_accuracy = float(np.trace(confusion)) / n_predictions
    values = [row["accuracy"] for row in fold_rows]
    statistics = _accuracy(protocol, folds, values, pooled_accuracy, len(expected), train_fraction)
    usable = [f.fold for f in folds]
    return {
        "protocol": protocol,
        "protocol_label": PROTOCOL_LABELS[protocol],
        "fold_noun": FOLD_NOUN[protocol],
        "selection": selection,
        "selection_label": selection_label(selection, protocol),
        "version": __version__,
        "recipe_version": recipe_version,
        "recipe": recipe_label(recipe_version) if recipe_version is not None else None,
        "partial": len(usable) < len(expected),
        "expected_folds": expected,
        "usable_folds": usable,
        "missing_folds": [fold for fold in expected if fold not in usable],
        "failed_folds": [
            {"fold": f.fold, "dir": str(f.directory), "reason": f.reason} for f in failed
        ],
        "min_folds": min_folds,
        "n_clips": statistics["n_clips"],
        "n_predictions": n_predictions,
        "split": _split_report(folds),
        "data_sha256": data_sha256,
        "split_sha256": split_sha256,
        "seeds": {str(f.fold): f.summary["seeds"] for f in folds if "seeds" in f.summary},
        "reproducibility": _reproducibility(folds),
        "genres": list(GENRES),
        "folds": fold_rows,
        "fold_accuracy": {str(row["fold"]): row["accuracy"] for row in fold_rows},
        "accuracy": statistics["accuracy"],
        "test_train_ratio_source": statistics["test_train_ratio_source"],
        "intervals_note": statistics["intervals_note"],
        "pooled_accuracy": pooled_accuracy,
        "per_genre": per_genre,
        "macro_f1": macro_f1,
        "confusion": {
            "rows": "true genre",
            "columns": "predicted genre",
            "labels": list(GENRES),
            "pooled_over": statistics["pooled_over"],
            "matrix": confusion.tolist(),
        },
        "confused_pairs": _confused_pairs(folds, confusion),
        "outputs": [REPORT_JSON, REPORT_HTML, CONFUSION_CSV, CONFUSION_PNG, PER_GENRE_CSV],
    }


def _write_report(out_dir: Path, report: dict) -> None:
    """The report's files, each replaced atomically; report.json last."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenreflowError(f"{out_dir}: cannot create the output folder ({exc})") from exc
    protocol, usable = report["protocol"], report["usable_folds"]
    title = f"Pooled confusion, {PROTOCOL_LABELS[protocol]}"
    if protocol == "filtered" and len(usable) > 1:
        title += f" (sum of {len(usable)} repetitions)"
    if report["partial"]:
        title += f" (partial: {len(usable)}/{len(report['expected_folds'])} {report['fold_noun']}s)"
    matrix = report["confusion"]["matrix"]
    png = confusion_png(np.asarray(matrix, dtype=np.int64), title)
    confusion_rows = [[genre, *row] for genre, row in zip(GENRES, matrix, strict=True)]
    write_text_atomic(out_dir / CONFUSION_CSV, csv_text(["true", *GENRES], confusion_rows))
    per_genre = [
        [g["genre"], g["precision"], g["recall"], g["f1"], g["support"]]
        for g in report["per_genre"]
    ]
    header = ["genre", "precision", "recall", "f1", "support"]
    write_text_atomic(out_dir / PER_GENRE_CSV, csv_text(header, per_genre))
    write_atomic(out_dir / CONFUSION_PNG, lambda f: f.write(png))
    write_text_atomic(out_dir / REPORT_HTML, _report_html(report, png))
    # report.json last: its presence means the whole report is there
    write_text_atomic(out_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
