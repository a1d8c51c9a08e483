"""The frozen-base head fold step: train one fold's genre head on the stored embeddings,
with the fold mechanism of the fine-tune fold (genreflow.steps.fold.tracked_fold): retry,
reuse, failed.json and the fold's MLflow run."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from genreflow.fold_result import FROZEN_BASE, FailedFold, partial_allowed
from genreflow.recipe import HeadConfig
from genreflow.steps.fold import fold_settings, tracked_fold


def head_fold(
    config: HeadConfig,
    *,
    tracking_uri: str = "",
    parent_run_id: str = "",
    reuse: bool = True,
    min_folds: int = 0,
    expected_folds: Iterable[int] | None = None,
) -> dict | FailedFold:
    """Train the head of one fold (genreflow.head.train_head) as `tracked_fold` does.

    Args:
        config: the head's recipe, the embeddings file and the output folder.
        tracking_uri: MLflow ("" = no tracking).
        parent_run_id: the pipeline's parent run, which the fold's run nests under.
        reuse: take an identical fold from MLflow instead of training it again.
        min_folds, expected_folds: with min_folds (0 = all) below the number of expected
            folds (default: this fold alone), a fold that fails for good is recorded in
            config.out/failed.json and returned instead of raised.

    Returns:
        summary.json's content, or the FailedFold of a tolerated failure.
    """
    from genreflow.head import train_head

    return tracked_fold(
        functools.partial(train_head, config),
        out=config.out,
        fold=config.fold,
        inputs=[config.embeddings],
        settings={"path": FROZEN_BASE, **fold_settings(config)},
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        reuse=reuse,
        tolerate_failure=partial_allowed(min_folds, expected_folds or [config.fold]),
    )
