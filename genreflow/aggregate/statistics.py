"""The report's statistics: fold accuracies' intervals, the Wilson interval, the paired
comparison of two runs, per-genre scores and the confusion matrix.

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

import math

import numpy as np
from scipy import stats

from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.fold_result import SUMMARY, FoldResult

CONFIDENCE_LEVEL = 0.95
TOP_CONFUSED_PAIRS = 5


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


def test_train_ratio_of(
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


def genre_scores(confusion: np.ndarray) -> tuple[list[dict], float]:
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


def confused_pairs(usable: list[FoldResult], confusion: np.ndarray) -> list[dict]:
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


def confusion_matrix(folds: list[FoldResult]) -> np.ndarray:
    """(true genre, predicted genre) counts over the folds' predictions."""
    confusion = np.zeros((len(GENRES), len(GENRES)), dtype=np.int64)
    for fold in folds:
        np.add.at(confusion, (fold.true_index, fold.predicted_index), 1)
    return confusion
