"""What the fold folders say, read and checked against each other: the usable folds
(genreflow.fold_result reads each one) and the failed ones, the one protocol, selection
and checksum they share, whether their clips are what their protocol promises, and the
per-fold facts the report shows.

A fold whose files are missing or cannot be read did not finish: it is a *failed fold*,
named in the report. A file that reads but breaks the contract (a clip predicted twice, a
fold number that disagrees with the folder's summary, an unknown genre, probabilities that
do not sum to 1) is a bug upstream: a `GenreflowError` naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.fold_result import SPLIT_COUNTS, SPLIT_NAMES, FailedFold, FoldResult, read_fold
from genreflow.splits import DEFAULT_PROTOCOL, PROTOCOLS


def read_usable(
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


def agreed(folds: list[FoldResult], what: str, value_of) -> object:
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


def resolve_protocol(folds: list[FoldResult], requested: str | None) -> str:
    """The protocol the folds' summaries record (absent = cv10), checked against the caller's.

    When no summary records one (runs from before the key existed), the caller's word is
    taken, and cv10 without it.
    """
    if requested is not None and requested not in PROTOCOLS:
        raise GenreflowError(
            f"unknown protocol {requested!r} (known: {', '.join(sorted(PROTOCOLS))})"
        )
    stated = [f for f in folds if f.choice("protocol", PROTOCOLS) is not None]
    if not stated:
        return requested or DEFAULT_PROTOCOL
    protocol = agreed(
        folds,
        "the protocol",
        lambda f: f.choice("protocol", PROTOCOLS) or DEFAULT_PROTOCOL,
    )
    if requested is not None and requested != protocol:
        raise GenreflowError(
            f"asked to aggregate protocol {requested!r}, but {stated[0].summary_path} "
            f"records protocol {protocol!r}"
        )
    return str(protocol)


def check_cv10_clips(folds: list[FoldResult]) -> None:
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


def check_filtered_clips(folds: list[FoldResult]) -> None:
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


def split_report(folds: list[FoldResult]) -> dict | None:
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


def fold_row(fold: FoldResult) -> dict:
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


def reproducibility(folds) -> str:
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
