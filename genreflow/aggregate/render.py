"""The report as people and tools read it: report.json, report.html (with the pooled
confusion matrix as a PNG), confusion.csv and per_genre.csv; the few lines the command
prints (`headline`); the flat metrics MLflow and the KFP UI show (`flat_metrics`).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from genreflow.atomic import write_atomic, write_text_atomic
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.fold_result import csv_text
from genreflow.recipe import RECIPE_VERSION, recipe_label

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion.png"
PER_GENRE_CSV = "per_genre.csv"


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


def report_html(report: dict, png: bytes) -> str:
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


def write_report(out_dir: Path, report: dict) -> None:
    """The report's files, each replaced atomically; report.json last."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GenreflowError(f"{out_dir}: cannot create the output folder ({exc})") from exc
    protocol, usable = report["protocol"], report["usable_folds"]
    title = f"Pooled confusion, {report['protocol_label']}"
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
    write_text_atomic(out_dir / REPORT_HTML, report_html(report, png))
    # report.json last: its presence means the whole report is there
    write_text_atomic(out_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
