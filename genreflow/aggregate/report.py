"""The step: fold folders in, the evaluation report out (`aggregate`), for either protocol.

How the two protocols pool, and which interval each quotes: genreflow.aggregate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from genreflow import __version__
from genreflow.aggregate.folds import (
    agreed,
    check_cv10_clips,
    check_filtered_clips,
    fold_row,
    read_usable,
    reproducibility,
    resolve_protocol,
    split_report,
)
from genreflow.aggregate.render import (
    CONFUSION_CSV,
    CONFUSION_PNG,
    PER_GENRE_CSV,
    REPORT_HTML,
    REPORT_JSON,
    confusion_png,
    write_report,
)
from genreflow.aggregate.statistics import (
    confused_pairs,
    confusion_matrix,
    fold_statistics,
    genre_scores,
    test_train_ratio_of,
    wilson_interval,
)
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.fold_result import FailedFold, FoldResult, read_fold
from genreflow.recipe import recipe_label, recipe_version_of
from genreflow.splits import DEFAULT_PROTOCOL, SELECTIONS  # "heldout": the seed's choice

PROTOCOL_LABELS: dict[str, str] = {
    "cv10": "10-fold cross-validation (cv10)",
    "filtered": "fault-filtered split (filtered)",
}
# What a fold is called in the report: cv10 folds partition the data, filtered ones repeat it.
FOLD_NOUN = {"cv10": "fold", "filtered": "repetition"}

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
    usable, failed = read_usable(fold_dirs, expected)
    # The clip check comes first: a clip predicted twice is a bug even when folds are missing.
    given_order = list(usable.values())
    if given_order:
        protocol = resolve_protocol(given_order, protocol)
        if protocol == "cv10":
            check_cv10_clips(given_order)
        else:
            check_filtered_clips(sorted(given_order, key=lambda f: f.fold))
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
    write_report(Path(out), report)
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
        ratio, ratio_source = test_train_ratio_of(folds, n_expected, train_fraction)
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
    selection = agreed(
        folds, "the checkpoint selection", lambda f: f.choice("selection", SELECTIONS)
    )
    data_sha256 = agreed(folds, "the data checksum", lambda f: f.summary.get("data_sha256"))
    split_sha256 = agreed(folds, "the split checksum", lambda f: f.summary.get("split_sha256"))
    # None where the summaries record no config at all (hand-made folders): not labelled.
    recipe_version = agreed(
        folds,
        "the recipe version",
        lambda f: recipe_version_of(f.summary["config"]) if f.summary.get("config") else None,
    )
    fold_rows = [fold_row(fold) for fold in folds]
    confusion = confusion_matrix(folds)
    per_genre, macro_f1 = genre_scores(confusion)
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
        "split": split_report(folds),
        "data_sha256": data_sha256,
        "split_sha256": split_sha256,
        "seeds": {str(f.fold): f.summary["seeds"] for f in folds if "seeds" in f.summary},
        "reproducibility": reproducibility(folds),
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
        "confused_pairs": confused_pairs(folds, confusion),
        "outputs": [REPORT_JSON, REPORT_HTML, CONFUSION_CSV, CONFUSION_PNG, PER_GENRE_CSV],
    }
