"""`genreflow compare`: two pipeline runs side by side, read back from MLflow.

A pipeline run is a parent MLflow run carrying the flat aggregate metrics (see
`aggregate.flat_metrics`) and, as tags or params, its `protocol` (absent: cv10) and
`selection`; its fold runs are children (tag `mlflow.parentRunId` = the parent, tag `fold`
= the fold number) with one score each (`final_accuracy` unless told otherwise).

What can be said about the difference B - A depends on the protocols:

- both cv10: the folds are the same ten partitions of the data in both runs, so the
  per-fold differences are paired samples, and the paired t-test gets the Nadeau-Bengio
  correction for overlapping training sets (`aggregate.paired_comparison`);
- both filtered: a repetition re-trains on the same clips with another seed and predicts
  the same test clips. Repetition r of A and repetition r of B share nothing but a seed
  offset, so they are not paired samples; Welch's unpaired t-test compares the two sets of
  repetition scores. It measures training randomness only: the test clips are the same in
  every repetition, so it says nothing about how the difference would hold on other test
  clips (the parents' Wilson intervals speak to that);
- different protocols: different test sets and different training sets, so nothing is
  comparable fold by fold; the aggregate figures are shown side by side only.

One file a little past 600 lines: reading the two runs, the test their protocols allow
and the table it prints are one comparison, read top to bottom in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from genreflow.aggregate import (
    CONFIDENCE_LEVEL,
    PROTOCOL_LABELS,
    paired_comparison,
    selection_label,
)
from genreflow.atomic import write_text_atomic
from genreflow.errors import GenreflowError
from genreflow.fold_result import RENAMED, current_names
from genreflow.recipe import RECIPE_VERSION, recipe_label, recipe_version_of
from genreflow.splits import DEFAULT_PROTOCOL
from genreflow.storage import redacted
from genreflow.tracking.names import (
    CHECKSUM_TAGS,
    FOLD_TAG,
    PARENT_TAG,
    PROTOCOL_TAG,
    SELECTION_TAG,
)

DEFAULT_METRIC = "final_accuracy"
# The aggregate metrics first, in the order a reader wants them; any others follow by name.
METRIC_ORDER = (
    "accuracy_mean",
    "accuracy_std",
    "accuracy_ci95_low",
    "accuracy_ci95_high",
    "accuracy_naive_ci95_low",
    "accuracy_naive_ci95_high",
    "accuracy_min",
    "accuracy_max",
    "pooled_accuracy",
    "macro_f1",
    "folds_usable",
)
COUNT_METRICS = ("folds_usable",)
# Per-fold values are in the per-fold table; repeating them in the aggregate one is noise.
PER_FOLD_METRIC_PREFIX = "fold_"


@dataclass
class PipelineRun:
    """A parent run and its fold scores, as read from MLflow."""

    run_id: str
    name: str
    status: str
    protocol: str
    protocol_recorded: bool
    selection: str | None
    metrics: dict[str, float]
    scores: dict[int, float]  # fold -> the compared metric
    unscored: dict[int, str] = field(default_factory=dict)  # fold -> its run's status
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)  # data.sha256, split.sha256
    recipe_versions: set[int] = field(default_factory=set)  # of its scored fold runs

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id})" if self.name else self.run_id


# --- reading -----------------------------------------------------------------------------
def _get_run(client, run_id: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise GenreflowError(f"{tracking_uri}: no MLflow run with id {run_id}") from None
        raise GenreflowError(f"{tracking_uri}: cannot read run {run_id} ({exc})") from exc


def _children(client, parent) -> list:
    run_id = parent.info.run_id
    found: list = []
    token = None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'",
            max_results=1000,
            page_token=token,
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def _recorded(run, key: str) -> str | None:
    """A tag, else a param, of that name; None when the run has neither."""
    return run.data.tags.get(key, run.data.params.get(key))


def read_pipeline_run(
    client, run_id: str, *, metric: str = DEFAULT_METRIC, tracking_uri: str = ""
) -> PipelineRun:
    """The parent run `run_id` with its fold children's `metric`.

    Raises:
        GenreflowError: no such run, a protocol or selection it does not know, or no child
            run with a `fold` tag (naming the run).
    """
    where = tracking_uri or "MLflow"
    # Runs logged before the metrics were renamed (heldout_accuracy, best_accuracy) are
    # compared under today's names, whichever name the caller gives.
    metric = RENAMED.get(metric, metric)
    parent = _get_run(client, run_id, where)
    protocol = _recorded(parent, PROTOCOL_TAG)
    if protocol is not None and protocol not in PROTOCOL_LABELS:
        raise GenreflowError(
            f"{where}: run {run_id} records an unknown protocol {protocol!r} "
            f"(known: {', '.join(sorted(PROTOCOL_LABELS))})"
        )
    folds: dict[int, list] = {}
    for child in _children(client, parent):
        raw = child.data.tags.get(FOLD_TAG)
        if raw is None:
            continue  # a nested run that is no fold (e.g. a platform task run)
        try:
            fold = int(raw)
        except ValueError:
            raise GenreflowError(
                f"{where}: run {child.info.run_id} (a child of {run_id}) has fold tag {raw!r}, "
                "not an integer"
            ) from None
        folds.setdefault(fold, []).append(child)
    if not folds:
        parent_of = parent.data.tags.get(PARENT_TAG)
        hint = f"; it is itself a child of {parent_of}: pass the parent" if parent_of else ""
        raise GenreflowError(
            f"{where}: run {run_id} has no fold child runs (runs tagged "
            f"{PARENT_TAG} = {run_id} with a '{FOLD_TAG}' tag){hint}"
        )
    run = PipelineRun(
        run_id=run_id,
        name=parent.info.run_name or "",
        status=parent.info.status,
        protocol=protocol or DEFAULT_PROTOCOL,
        protocol_recorded=protocol is not None,
        selection=_recorded(parent, SELECTION_TAG),
        metrics=dict(parent.data.metrics),
        scores={},
        checksums={k: parent.data.tags.get(k, "") for k in CHECKSUM_TAGS},
    )
    for fold in sorted(folds):
        # A fold run that did not finish may have logged a metric on its way: not a score.
        scored = [
            c
            for c in folds[fold]
            if metric in current_names(c.data.metrics) and c.info.status == "FINISHED"
        ]
        if not scored:
            run.unscored[fold] = ", ".join(sorted({c.info.status for c in folds[fold]}))
            continue
        # one run per fold is the rule; older trees may hold a retry beside it: the latest
        scored.sort(key=lambda c: c.info.start_time or 0)
        chosen = scored[-1]
        if len(scored) > 1:
            others = ", ".join(c.info.run_id for c in scored[:-1])
            run.notes.append(
                f"run {run_id}: fold {fold} has {len(scored)} scored runs; the latest "
                f"({chosen.info.run_id}) is used, not {others}"
            )
        run.scores[fold] = float(current_names(chosen.data.metrics)[metric])
        # Fold runs log their config as params, with no recipe_version before versions were
        # recorded (recipe 1); a run with no params at all is not genreflow's: unknown.
        if chosen.data.params:
            run.recipe_versions.add(recipe_version_of(chosen.data.params))
    return run


# --- comparing ---------------------------------------------------------------------------
def _checksum_notes(a: PipelineRun, b: PipelineRun) -> list[str]:
    """Say so where the two runs did not see the same data or split (or did not record it)."""
    notes = []
    for tag in CHECKSUM_TAGS:
        value_a, value_b = a.checksums.get(tag, ""), b.checksums.get(tag, "")
        if value_a and value_b and value_a != value_b:
            notes.append(
                f"the runs record different {tag} ({value_a[:12]}... vs {value_b[:12]}...): "
                "fold K of one is not fold K of the other, so the per-fold pairing is suspect"
            )
    return notes


def _recipe_notes(a: PipelineRun, b: PipelineRun) -> list[str]:
    """Say so where a run's folds were trained under another recipe than today's, or the
    two runs' under different ones: their difference then includes the recipe's."""
    notes = []
    for run, key in ((a, "A"), (b, "B")):
        if len(run.recipe_versions) > 1:
            versions = ", ".join(recipe_label(v) for v in sorted(run.recipe_versions))
            notes.append(f"run {key}: its folds were trained under several recipes: {versions}")
        elif run.recipe_versions and run.recipe_versions != {RECIPE_VERSION}:
            notes.append(f"run {key}: trained under {recipe_label(min(run.recipe_versions))}")
    if a.recipe_versions and b.recipe_versions and a.recipe_versions != b.recipe_versions:
        notes.append(
            "A and B were trained under different recipes: the difference includes the "
            "recipe's change, not only what the runs were meant to compare"
        )
    return notes


def _aggregate_rows(a: PipelineRun, b: PipelineRun) -> list[dict]:
    names = set(a.metrics) | set(b.metrics)
    names = {n for n in names if not n.startswith(PER_FOLD_METRIC_PREFIX)}
    ordered = [n for n in METRIC_ORDER if n in names] + sorted(names - set(METRIC_ORDER))
    rows = []
    for name in ordered:
        value_a, value_b = a.metrics.get(name), b.metrics.get(name)
        difference = None if value_a is None or value_b is None else value_b - value_a
        rows.append({"metric": name, "a": value_a, "b": value_b, "difference": difference})
    return rows


def _train_fraction(a: PipelineRun, b: PipelineRun, given: float | None) -> tuple[float, str]:
    """n_train / (n_train + n_test) for the correction, and where it came from."""
    if given is not None:
        return given, "--train-fraction"
    ratios = [r.metrics["test_train_ratio"] for r in (a, b) if "test_train_ratio" in r.metrics]
    if ratios:
        # with two different ratios the larger one corrects more: the cautious choice
        ratio = max(ratios)
        return 1.0 / (1.0 + ratio), "the parents' test_train_ratio metric"
    k = max(max(a.scores), max(b.scores), 2)
    return (k - 1) / k, f"{k} folds, each model trained on the other {k - 1}"


def _welch(a_scores: list[float], b_scores: list[float]) -> dict:
    """Welch's unpaired t-test and 95% interval for mean(B) - mean(A) (scipy's ttest_ind,
    equal_var=False: the Welch-Satterthwaite degrees of freedom)."""
    a = np.asarray(a_scores, dtype=np.float64)
    b = np.asarray(b_scores, dtype=np.float64)
    n_a, n_b = len(a), len(b)
    mean = float(b.mean() - a.mean())
    standard_error = math.sqrt(float(a.var(ddof=1)) / n_a + float(b.var(ddof=1)) / n_b)
    if standard_error > 0:
        result = stats.ttest_ind(b, a, equal_var=False)
        t_statistic, p_value, dof = float(result.statistic), float(result.pvalue), result.df
        interval = result.confidence_interval(CONFIDENCE_LEVEL)
        low, high = float(interval.low), float(interval.high)
    else:  # no spread at all: scipy's t is undefined (nan)
        dof = float(n_a + n_b - 2)
        t_statistic = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p_value = 1.0 if mean == 0 else 0.0
        low = high = mean
    return {
        "test": "Welch's unpaired t-test on the repetition scores, two-sided",
        "mean_difference": mean,
        "spread": math.sqrt(float(a.var(ddof=1)) + float(b.var(ddof=1))),
        "spread_label": "sd of one repetition of B minus one of A",
        "standard_error": standard_error,
        "t_statistic": t_statistic,
        "dof": float(dof),
        "p_value": p_value,
        "ci": {"low": low, "high": high, "half_width": (high - low) / 2},
        "ci_label": "Welch 95% interval",
    }


def _paired(a: PipelineRun, b: PipelineRun, train_fraction: float, source: str) -> dict:
    # B - A, so that a positive difference means B scored higher
    result = paired_comparison(b.scores, a.scores, train_fraction=train_fraction)
    return {
        "test": result["test"],
        "mean_difference": result["mean_difference"],
        "spread": result["std_difference"],
        "spread_label": "sd of the paired differences",
        "standard_error": result["standard_error"],
        "t_statistic": result["t_statistic"],
        "dof": float(result["dof"]),
        "p_value": result["p_value"],
        "ci": result["corrected_ci"],
        "ci_label": "corrected 95% interval",
        "test_train_ratio": result["test_train_ratio"],
        "train_fraction_source": source,
    }


def _verdict(test: dict) -> str:
    mean, spread, ci = test["mean_difference"], test["spread"], test["ci"]
    larger = abs(mean) > spread
    excludes = ci["low"] > 0 or ci["high"] < 0
    if larger and excludes:
        call = "B differs from A"
    elif excludes:
        call = "B differs from A, by less than the spread"
    elif larger:
        call = "inconclusive"
    else:
        call = "no evidence that B differs from A"
    return (
        f"{call}: mean B - A = {mean:+.4f}, |difference| "
        f"{'>' if larger else '<='} the {test['spread_label']} ({spread:.4f}); the "
        f"{test['ci_label']} [{ci['low']:+.4f}, {ci['high']:+.4f}] "
        f"{'excludes' if excludes else 'includes'} 0 (p = {test['p_value']:.3g})"
    )


def compare_runs(
    run_a: str,
    run_b: str,
    *,
    tracking_uri: str | None = None,
    metric: str = DEFAULT_METRIC,
    train_fraction: float | None = None,
) -> dict:
    """Compare two pipeline runs (MLflow parent run ids): B - A throughout.

    Args:
        run_a, run_b: the parent runs' ids.
        tracking_uri: the MLflow tracking URI; None: its default
            (genreflow.tracking.client.default_tracking_uri).
        metric: the fold runs' metric to compare fold by fold.
        train_fraction: cv10 only: n_train / (n_train + n_test) of one fold for the
            correction; None takes the parents' `test_train_ratio` metric (the larger of
            the two), else (k - 1) / k for k folds.

    Returns:
        A dict: both runs, the aggregate metrics side by side, the per-fold scores and
        differences, the test (None where there is none, with `no_test` saying why) and a
        one-line `verdict`.

    Raises:
        GenreflowError: an unknown run id, or a run with no fold children (naming it).
    """
    from genreflow.tracking.client import client, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    metric = RENAMED.get(metric, metric)
    store = client(uri)
    a = read_pipeline_run(store, run_a, metric=metric, tracking_uri=uri)
    b = read_pipeline_run(store, run_b, metric=metric, tracking_uri=uri)

    common = sorted(set(a.scores) & set(b.scores))
    result: dict = {
        "tracking_uri": redacted(uri),  # printed and written for CI comments
        "metric": metric,
        "runs": {"a": _run_dict(a), "b": _run_dict(b)},
        "aggregate": _aggregate_rows(a, b),
        "per_fold": [
            {
                "fold": fold,
                "a": a.scores[fold],
                "b": b.scores[fold],
                "difference": b.scores[fold] - a.scores[fold],
            }
            for fold in common
        ],
        "only_in_a": sorted(set(a.scores) - set(b.scores)),
        "only_in_b": sorted(set(b.scores) - set(a.scores)),
        "notes": a.notes + b.notes + _checksum_notes(a, b) + _recipe_notes(a, b),
        "comparable": a.protocol == b.protocol,
        "test": None,
        "no_test": None,
    }
    for run, key in ((a, "A"), (b, "B")):
        if run.unscored:
            listed = ", ".join(f"{f} ({s})" for f, s in run.unscored.items())
            result["notes"].append(f"run {key}: fold(s) without {metric}: {listed}")

    if a.protocol != b.protocol:
        result["no_test"] = (
            f"A is {PROTOCOL_LABELS[a.protocol]} and B is {PROTOCOL_LABELS[b.protocol]}: "
            "they train and test on different clips, so they are not comparable fold by "
            "fold; only the aggregate figures are shown side by side (accuracy_ci95_* is "
            "the Nadeau-Bengio interval under cv10 and the Wilson interval under filtered)"
        )
        result["verdict"] = "not comparable fold by fold (different protocols)"
        return result

    result["test"], result["no_test"] = _test(a, b, common, train_fraction)
    if result["test"] is None:
        result["verdict"] = f"no test: {result['no_test']}"
    else:
        result["verdict"] = _verdict(result["test"])
    return result


def _test(
    a: PipelineRun, b: PipelineRun, common: list[int], train_fraction: float | None
) -> tuple[dict | None, str | None]:
    """(the test of B - A that the runs' protocol allows, None) or (None, why there is none)."""
    if a.protocol == "cv10":
        if len(common) < 2:
            return None, (
                f"a paired test needs at least 2 folds scored in both runs, found {len(common)}"
            )
        fraction, source = _train_fraction(a, b, train_fraction)
        test = _paired(a, b, fraction, source)
        test["design"] = (
            "paired by fold: both runs split the data into the same folds, so each "
            "fold's difference is one paired sample; the Nadeau-Bengio correction "
            "widens the variance for the training sets the folds share"
        )
        return test, None
    if len(a.scores) < 2 or len(b.scores) < 2:
        return None, (
            "Welch's test needs at least 2 repetitions in each run, found "
            f"{len(a.scores)} in A and {len(b.scores)} in B; the parents' Wilson "
            "intervals are the only uncertainty there is"
        )
    test = _welch([a.scores[f] for f in sorted(a.scores)], [b.scores[f] for f in sorted(b.scores)])
    test["design"] = (
        "unpaired: a filtered run's repetitions retrain on the same clips and predict "
        "the same test clips, so repetition r of A and of B are not paired samples of "
        "a data split; Welch's test over the repetition scores measures training "
        "randomness only, not how the difference would hold on other test clips "
        "(see the parents' Wilson intervals for that)"
    )
    return test, None


def _run_dict(run: PipelineRun) -> dict:
    return {
        "run_id": run.run_id,
        "name": run.name,
        "label": run.label,
        "status": run.status,
        "protocol": run.protocol,
        "protocol_label": PROTOCOL_LABELS[run.protocol]
        + ("" if run.protocol_recorded else " (the run records no protocol: assumed)"),
        "selection": run.selection,
        "selection_label": selection_label(run.selection, run.protocol)
        if run.selection in ("validation", "heldout")
        else run.selection,
        "folds": sorted(run.scores),
        "recipe_versions": sorted(run.recipe_versions),
        "scores": {str(f): v for f, v in run.scores.items()},
        "unscored": {str(f): s for f, s in run.unscored.items()},
    }


# --- rendering ---------------------------------------------------------------------------
def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _cell(row: dict, key: str) -> str:
    """One cell of the aggregate table: counts as integers, the rest to 4 decimals."""
    value = row[key]
    if row["metric"] in COUNT_METRICS and value is not None:
        return f"{int(value):+d}" if key == "difference" else str(int(value))
    return _num(value, signed=key == "difference")


def _fold_noun(result: dict) -> str:
    protocols = {r["protocol"] for r in result["runs"].values()}
    return "repetition" if protocols == {"filtered"} else "fold"


def _describe_runs(result: dict) -> list[str]:
    lines = []
    for key in ("a", "b"):
        run = result["runs"][key]
        text = f"{key.upper()}: {run['label']}, {run['protocol_label']}, status {run['status']}"
        if run["selection_label"]:
            text += f"; {run['selection_label']}"
        lines.append(text)
    return lines


def _test_lines(result: dict) -> list[str]:
    test = result["test"]
    if test is None:
        return [f"No test: {result['no_test']}."]
    lines = [
        f"{test['test']}: t = {_num(test['t_statistic'], True)}, dof = {test['dof']:.3g}, "
        f"p = {test['p_value']:.3g}; mean B - A = {_num(test['mean_difference'], True)}, "
        f"{test['ci_label']} [{_num(test['ci']['low'], True)}, "
        f"{_num(test['ci']['high'], True)}]",
    ]
    if "test_train_ratio" in test:
        lines.append(
            f"n_test/n_train = {test['test_train_ratio']:.4g} "
            f"(from {test['train_fraction_source']})"
        )
    lines.append(f"Design: {test['design']}.")
    return lines


def render_text(result: dict) -> str:
    """The comparison as plain text, for a terminal."""
    noun = _fold_noun(result)
    lines = [f"genreflow compare (B - A), tracking {result['tracking_uri']}"]
    lines += _describe_runs(result)
    if result["no_test"] and not result["comparable"]:
        lines.append(result["no_test"] + ".")
    width = max([len(r["metric"]) for r in result["aggregate"]] + [len("metric")])
    lines += ["", f"{'metric':<{width}}  {'A':>10}  {'B':>10}  {'B - A':>10}"]
    for row in result["aggregate"]:
        lines.append(
            f"{row['metric']:<{width}}  {_cell(row, 'a'):>10}  {_cell(row, 'b'):>10}  "
            f"{_cell(row, 'difference'):>10}"
        )
    if result["comparable"]:
        lines += ["", f"per {noun} ({result['metric']})", f"{noun:<10}  {'A':>8}  {'B':>8}  B - A"]
        for row in result["per_fold"]:
            lines.append(
                f"{row['fold']:<10}  {_num(row['a']):>8}  {_num(row['b']):>8}  "
                f"{_num(row['difference'], True)}"
            )
        lines += _only_lines(result, noun)
        lines += [""] + _test_lines(result)
    lines += [f"note: {note}" for note in result["notes"]]
    lines += ["", f"verdict: {result['verdict']}"]
    return "\n".join(lines) + "\n"


def _only_lines(result: dict, noun: str) -> list[str]:
    lines = []
    for key, run in (("only_in_a", "A"), ("only_in_b", "B")):
        if result[key]:
            lines.append(
                f"{noun}(s) only in {run}: {', '.join(str(f) for f in result[key])} "
                "(left out of the differences)"
            )
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def render_markdown(result: dict) -> str:
    """The comparison as Markdown, fit for a CI comment: heading, tables, verdict."""
    noun = _fold_noun(result)
    a, b = result["runs"]["a"], result["runs"]["b"]
    lines = [
        f"## genreflow compare: {a['name'] or a['run_id']} vs {b['name'] or b['run_id']}",
        "",
    ]
    lines += [f"- **{line[0]}**{line[1:]}" for line in _describe_runs(result)]
    lines.append("")
    if not result["comparable"]:
        lines += [result["no_test"] + ".", ""]
    lines += _md_table(
        ["metric", "A", "B", "B − A"],
        [
            [f"`{r['metric']}`", _cell(r, "a"), _cell(r, "b"), _cell(r, "difference")]
            for r in result["aggregate"]
        ],
    )
    if result["comparable"]:
        lines += ["", f"### Per {noun}: `{result['metric']}`", ""]
        lines += _md_table(
            [noun, "A", "B", "B − A"],
            [
                [str(r["fold"]), _num(r["a"]), _num(r["b"]), _num(r["difference"], True)]
                for r in result["per_fold"]
            ],
        )
        only = _only_lines(result, noun)
        if only:
            lines += ["", *only]
        lines += ["", *_test_lines(result)]
    if result["notes"]:
        lines += ["", *(f"- {note}" for note in result["notes"])]
    lines += ["", f"**Verdict:** {result['verdict']}", ""]
    return "\n".join(lines)


def write_markdown(result: dict, path: str | Path, render=render_markdown) -> Path:
    """Write render(result) (default: render_markdown) to path (atomically); the path."""
    path = Path(path)
    try:
        write_text_atomic(path, render(result))
    except OSError as exc:
        raise GenreflowError(f"{path}: cannot write the Markdown summary ({exc})") from exc
    return path
