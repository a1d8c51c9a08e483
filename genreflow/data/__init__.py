"""GTZAN: genre order, folds, layouts, download and the synthetic set."""
