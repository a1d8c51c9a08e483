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

The package: `folds` reads the fold folders and checks them against each other,
`statistics` computes (fold statistics with the Nadeau-Bengio correction for cv10, the
Wilson interval for filtered, per-genre scores, `paired_comparison`), `render` writes the
report's files and its text, and `report` is the step, `aggregate`, that joins them.
"""

from genreflow.aggregate.render import (
    CONFUSION_CSV,
    CONFUSION_PNG,
    PER_GENRE_CSV,
    REPORT_HTML,
    REPORT_JSON,
    confusion_png,
    flat_metrics,
    headline,
)
from genreflow.aggregate.report import (
    FOLD_NOUN,
    PROTOCOL_LABELS,
    aggregate,
    fold_confusion_png,
    selection_label,
)
from genreflow.aggregate.statistics import (
    CONFIDENCE_LEVEL,
    confusion_matrix,
    fold_statistics,
    paired_comparison,
    wilson_interval,
)

__all__ = [
    "CONFIDENCE_LEVEL",
    "CONFUSION_CSV",
    "CONFUSION_PNG",
    "FOLD_NOUN",
    "PER_GENRE_CSV",
    "PROTOCOL_LABELS",
    "REPORT_HTML",
    "REPORT_JSON",
    "aggregate",
    "confusion_matrix",
    "confusion_png",
    "flat_metrics",
    "fold_confusion_png",
    "fold_statistics",
    "headline",
    "paired_comparison",
    "selection_label",
    "wilson_interval",
]
