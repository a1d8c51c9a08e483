"""`genreflow aggregate`: fold folders written here with known predictions, checked by hand."""

from __future__ import annotations

import csv
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy import special

from genreflow.aggregate import (
    aggregate,
    flat_metrics,
    fold_statistics,
    headline,
    paired_comparison,
    wilson_interval,
)
from genreflow.cli import main
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.fold_result import PROBABILITY_SUM_TOLERANCE, read_predictions
from genreflow.recipe import RECIPE_VERSION

# Student's t quantiles t_{0.975, dof}, from printed tables
T975 = {1: 12.706205, 6: 2.446912, 9: 2.262157}

# Per fold: the (true, predicted) pairs that go wrong; every other clip is right.
MISTAKES: dict[int, list[tuple[str, str]]] = {
    1: [],
    2: [("rock", "metal")],
    3: [("rock", "metal"), ("disco", "pop")],
    4: [("rock", "metal"), ("disco", "pop"), ("country", "blues")],
    5: [],
    6: [("rock", "metal")],
    7: [("rock", "metal"), ("disco", "pop")],
    8: [("rock", "metal"), ("disco", "pop"), ("country", "blues")],
    9: [("jazz", "classical")],
    10: [("rock", "metal")],
}
# 10 clips per fold, one per genre, so a fold's accuracy is (10 - mistakes) / 10
ACCURACY = {fold: (10 - len(m)) / 10 for fold, m in MISTAKES.items()}


def clip_name(genre: str, fold: int) -> str:
    return f"{genre}.{fold - 1:05d}.wav"


def probabilities(predicted: str) -> list[float]:
    """0.7 on the predicted genre, the rest spread evenly: sums to 1."""
    return [0.7 if g == predicted else 0.3 / 9 for g in GENRES]


def write_fold(root: Path, fold: int, rows: list[tuple[str, str, str]], **summary) -> Path:
    """A fold folder as `genreflow train` leaves it; rows are (audio_name, true, predicted)."""
    directory = root / f"fold_{fold}"
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audio_name", "fold", "genre", *GENRES])
        for name, true, predicted in rows:
            writer.writerow([name, fold, true, *probabilities(predicted)])
    (directory / "summary.json").write_text(json.dumps({"fold": fold, **summary}))
    return directory


def standard_rows(fold: int) -> list[tuple[str, str, str]]:
    wrong = dict(MISTAKES[fold])
    return [(clip_name(g, fold), g, wrong.get(g, g)) for g in GENRES]


@pytest.fixture
def ten_folds(tmp_path: Path) -> list[Path]:
    return [write_fold(tmp_path / "folds", k, standard_rows(k)) for k in range(1, 11)]


def hand_stats(values: list[float], t975: float, ratio: float) -> dict:
    k = len(values)
    mean = sum(values) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    return {
        "mean": mean,
        "sd": sd,
        "naive": t975 * sd / math.sqrt(k),
        "corrected": t975 * sd * math.sqrt(1 / k + ratio),
    }


class _VisibleText(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "title", "script"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("style", "title", "script"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.lines.append(data.strip())


def visible_lines(html_text: str) -> list[str]:
    parser = _VisibleText()
    parser.feed(html_text)
    return parser.lines


def test_ten_folds_statistics(ten_folds: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = aggregate(ten_folds, out)

    assert report["partial"] is False
    assert report["missing_folds"] == [] and report["failed_folds"] == []
    assert {int(k): v for k, v in report["fold_accuracy"].items()} == pytest.approx(ACCURACY)
    assert [f["n_correct"] for f in report["folds"]] == [10, 9, 8, 7, 10, 9, 8, 7, 9, 9]

    values = [ACCURACY[k] for k in range(1, 11)]
    # 10 folds of 10 clips: n_test / n_train = 10 / 90
    expected = hand_stats(values, T975[9], 10 / 90)
    acc = report["accuracy"]
    assert acc["k"] == 10
    assert acc["mean"] == pytest.approx(0.86)
    assert acc["std"] == pytest.approx(expected["sd"])
    assert acc["min"] == pytest.approx(0.7) and acc["max"] == pytest.approx(1.0)
    assert acc["t_quantile"] == pytest.approx(T975[9], abs=1e-6)
    assert acc["test_train_ratio"] == pytest.approx(1 / 9)
    assert acc["naive_ci"]["low"] == pytest.approx(0.86 - expected["naive"], abs=1e-6)
    assert acc["naive_ci"]["high"] == pytest.approx(0.86 + expected["naive"], abs=1e-6)
    assert acc["corrected_ci"]["low"] == pytest.approx(0.86 - expected["corrected"], abs=1e-6)
    assert acc["corrected_ci"]["high"] == pytest.approx(0.86 + expected["corrected"], abs=1e-6)
    # the correction widens the interval by sqrt(1 + k * ratio) = sqrt(1 + 10/9)
    width_ratio = acc["corrected_ci"]["half_width"] / acc["naive_ci"]["half_width"]
    assert width_ratio == pytest.approx(math.sqrt(1 + 10 / 9))
    assert "Nadeau" in acc["corrected_ci"]["method"]
    assert "naive" in acc["naive_ci"]["method"]
    assert "overlap" in report["intervals_note"]
    assert report["pooled_accuracy"] == pytest.approx(86 / 100)
    assert report["n_clips"] == 100

    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.csv",
        "confusion.png",
        "per_genre.csv",
        "report.html",
        "report.json",
    ]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["accuracy"]["mean"] == pytest.approx(0.86)
    assert on_disk["partial"] is False


def test_confusion_matrix_and_confused_pairs(ten_folds: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = aggregate(ten_folds, out)

    index = {g: i for i, g in enumerate(GENRES)}
    expected = [[0] * 10 for _ in GENRES]
    for g in GENRES:
        expected[index[g]][index[g]] = 10
    # counted from MISTAKES by hand: rock->metal in 7 folds, disco->pop in 4,
    # country->blues in 2, jazz->classical in 1
    for true, predicted, count in [
        ("rock", "metal", 7),
        ("disco", "pop", 4),
        ("country", "blues", 2),
        ("jazz", "classical", 1),
    ]:
        expected[index[true]][index[true]] -= count
        expected[index[true]][index[predicted]] = count
    assert report["confusion"]["matrix"] == expected

    with (out / "confusion.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["true", *GENRES]
    assert [r[0] for r in rows[1:]] == list(GENRES)
    assert [[int(c) for c in r[1:]] for r in rows[1:]] == expected

    pairs = report["confused_pairs"]
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("rock", "metal", 7),
        ("disco", "pop", 4),
        ("country", "blues", 2),
        ("jazz", "classical", 1),
    ]
    assert pairs[0]["clips"] == [clip_name("rock", k) for k in (2, 3, 4, 6, 7, 8, 10)]
    assert pairs[2]["clips"] == ["country.00003.wav", "country.00007.wav"]
    assert pairs[3]["clips"] == ["jazz.00008.wav"]

    png = (out / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000  # a real plot, not an empty canvas

    page = (out / "report.html").read_text()
    lines = visible_lines(page)
    assert lines[0] == "10-fold cross-validation (cv10)"
    assert "Partial" not in page
    assert "data:image/png;base64,iVBORw0KGgo" in page  # the PNG signature in base64
    assert "rock.00009.wav" in page
    assert not re.search(r'src="(?!data:)', page)  # self-contained: no external files


def test_per_genre_metrics_on_a_tiny_confusion(tmp_path: Path) -> None:
    # 2 folds, 8 clips. true -> predicted:
    #   blues: b, b, classical      classical: classical, classical, blues
    #   country: blues               disco: disco
    rows_1 = [
        ("blues.00000.wav", "blues", "blues"),
        ("blues.00001.wav", "blues", "blues"),
        ("classical.00000.wav", "classical", "classical"),
        ("country.00000.wav", "country", "blues"),
    ]
    rows_2 = [
        ("blues.00002.wav", "blues", "classical"),
        ("classical.00001.wav", "classical", "classical"),
        ("classical.00002.wav", "classical", "blues"),
        ("disco.00000.wav", "disco", "disco"),
    ]
    folds = [write_fold(tmp_path, 1, rows_1), write_fold(tmp_path, 2, rows_2)]
    report = aggregate(folds, tmp_path / "out", expected_folds=[1, 2], min_folds=2)
    per_genre = {g["genre"]: g for g in report["per_genre"]}

    # blues: predicted 4 times (2 right), truly 3 clips
    assert per_genre["blues"]["precision"] == pytest.approx(2 / 4)
    assert per_genre["blues"]["recall"] == pytest.approx(2 / 3)
    assert per_genre["blues"]["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
    assert per_genre["blues"]["support"] == 3
    # classical: predicted 3 times (2 right), truly 3 clips
    assert per_genre["classical"]["precision"] == pytest.approx(2 / 3)
    assert per_genre["classical"]["recall"] == pytest.approx(2 / 3)
    assert per_genre["classical"]["f1"] == pytest.approx(2 / 3)
    # country: never right, never predicted
    assert per_genre["country"] == {
        "genre": "country",
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
    }
    assert per_genre["disco"]["f1"] == pytest.approx(1.0)
    assert per_genre["metal"]["support"] == 0
    # macro F1 over the 4 genres that occur
    blues_f1 = 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3)
    assert report["macro_f1"] == pytest.approx((blues_f1 + 2 / 3 + 0 + 1) / 4)
    assert report["fold_accuracy"] == {"1": 0.75, "2": 0.5}
    # two folds of 4: n_test / n_train = 4 / 4, t_{0.975,1}
    expected = hand_stats([0.75, 0.5], T975[1], 1.0)
    corrected = report["accuracy"]["corrected_ci"]
    assert corrected["half_width"] == pytest.approx(expected["corrected"], rel=1e-6)

    with (tmp_path / "out" / "per_genre.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["genre"] for r in rows] == list(GENRES)
    assert float(rows[0]["precision"]) == pytest.approx(0.5)
    assert int(rows[2]["support"]) == 1


def test_seven_of_ten_is_partial_and_names_the_missing(
    ten_folds: list[Path], tmp_path: Path
) -> None:
    broken = ten_folds[7]  # fold 8: training died before writing its predictions
    (broken / "predictions.csv").unlink()
    given = ten_folds[:8]  # folds 9 and 10 never arrived
    out = tmp_path / "report"
    report = aggregate(given, out, min_folds=7)

    assert report["partial"] is True
    assert report["usable_folds"] == [1, 2, 3, 4, 5, 6, 7]
    assert report["missing_folds"] == [8, 9, 10]
    assert len(report["failed_folds"]) == 1
    failed = report["failed_folds"][0]
    assert failed["fold"] == 8 and "predictions.csv" in failed["reason"]
    assert failed["dir"] == str(broken)

    values = [ACCURACY[k] for k in range(1, 8)]
    # the missing folds still trained every usable fold's model: N = 7*10 + 3*10
    expected = hand_stats(values, T975[6], 10 / 90)
    acc = report["accuracy"]
    assert acc["k"] == 7
    assert acc["mean"] == pytest.approx(expected["mean"])
    assert acc["std"] == pytest.approx(expected["sd"])
    assert acc["naive_ci"]["half_width"] == pytest.approx(expected["naive"], rel=1e-6)
    assert acc["corrected_ci"]["half_width"] == pytest.approx(expected["corrected"], rel=1e-6)
    assert report["n_clips"] == 70

    page = (out / "report.html").read_text()
    lines = visible_lines(page)
    assert lines[0] == "10-fold cross-validation (cv10)"
    assert lines[1] == "Partial result:"
    assert "fold(s) 8, 9, 10 missing" in lines[2]
    assert str(broken / "predictions.csv") in page
    assert json.loads((out / "report.json").read_text())["partial"] is True


def test_too_few_folds_is_an_error_naming_them(ten_folds: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    with pytest.raises(GenreflowError, match=r"6 of 10 folds.*7 needed.*7, 8, 9, 10"):
        aggregate(ten_folds[:6], out, min_folds=7)
    assert not (out / "report.json").exists()


def test_default_needs_every_fold(ten_folds: list[Path], tmp_path: Path) -> None:
    with pytest.raises(GenreflowError, match=r"missing fold\(s\) 10 "):
        aggregate(ten_folds[:9], tmp_path / "report")


def test_clip_predicted_in_two_folds(ten_folds: list[Path], tmp_path: Path) -> None:
    rows = standard_rows(2)
    rows[0] = (clip_name("blues", 1), "blues", "blues")  # fold 1's blues clip again
    write_fold(tmp_path / "folds", 2, rows)
    with pytest.raises(GenreflowError, match=r"blues\.00000\.wav is also predicted") as caught:
        aggregate(ten_folds, tmp_path / "report")
    assert str(ten_folds[0] / "predictions.csv") in str(caught.value)
    assert str(ten_folds[1] / "predictions.csv") in str(caught.value)


def test_clip_predicted_twice_in_one_file(tmp_path: Path) -> None:
    rows = standard_rows(1)
    rows.append(rows[3])
    folder = write_fold(tmp_path, 1, rows)
    with pytest.raises(GenreflowError, match=r"line 12: clip disco\.00000\.wav predicted twice"):
        aggregate([folder], tmp_path / "out", expected_folds=[1], min_folds=1)


def test_fold_column_disagrees_with_summary(tmp_path: Path) -> None:
    folder = write_fold(tmp_path, 3, standard_rows(3))
    (folder / "summary.json").write_text(json.dumps({"fold": 4}))
    with pytest.raises(GenreflowError, match=r"predictions\.csv, line 2: fold 3 disagrees"):
        aggregate([folder], tmp_path / "out", min_folds=1)


def test_unknown_genre_and_bad_probabilities(tmp_path: Path) -> None:
    folder = write_fold(tmp_path, 1, standard_rows(1))
    path = folder / "predictions.csv"
    original = path.read_text()
    path.write_text(original.replace(",rock,", ",polka,"))
    with pytest.raises(GenreflowError, match=r"line 11: unknown genre 'polka'"):
        aggregate([folder], tmp_path / "out", expected_folds=[1], min_folds=1)

    lines = original.splitlines()
    cells = lines[4].split(",")
    cells[3 + GENRES.index("disco")] = "0.2"  # 0.2 + 9 * 0.3/9 = 0.5 in total
    lines[4] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(GenreflowError, match=r"line 5: probabilities sum to 0\.5, not 1"):
        aggregate([folder], tmp_path / "out", expected_folds=[1], min_folds=1)


def test_probabilities_rounded_to_bf16_are_accepted_and_renormalised(tmp_path: Path) -> None:
    # What a fold trained under bf16 autocast wrote before its head was kept in float32:
    # softmax values with 8 significant bits, whose rows miss 1 by up to 2**-8.
    import torch

    logits = torch.randn(200, len(GENRES), generator=torch.Generator().manual_seed(0)) * 3
    rounded = torch.softmax(logits, dim=-1).bfloat16().double().numpy()
    sums = rounded.sum(axis=1)
    assert np.abs(sums - 1).max() > 1e-3  # the old tolerance refused these
    assert np.abs(sums - 1).max() <= PROBABILITY_SUM_TOLERANCE
    path = tmp_path / "predictions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audio_name", "fold", "genre", *GENRES])
        for k, row in enumerate(rounded):
            writer.writerow([f"blues.{k:05d}.wav", 1, "blues", *(f"{p:.8g}" for p in row)])
    _, _, read = read_predictions(path, 1)
    np.testing.assert_allclose(read.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(read, rounded / sums[:, None], rtol=1e-7)

    # A row further from 1 than bf16 rounding can take it is still refused.
    off = rounded[0] * (1 - 2 * PROBABILITY_SUM_TOLERANCE)
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow(["blues.99999.wav", 1, "blues", *(f"{p:.8g}" for p in off)])
    with pytest.raises(GenreflowError, match=r"line 202: probabilities sum to 0\.99"):
        read_predictions(path, 1)


def test_unreadable_summary_is_a_failed_fold(ten_folds: list[Path], tmp_path: Path) -> None:
    (ten_folds[4] / "summary.json").write_text("{not json")
    report = aggregate(ten_folds, tmp_path / "report", min_folds=9)
    assert report["missing_folds"] == [5]
    assert report["failed_folds"][0]["fold"] is None
    assert "summary.json: unreadable" in report["failed_folds"][0]["reason"]


def test_n_train_from_summary_and_train_fraction(tmp_path: Path) -> None:
    # an inner validation split: each model trained on 72 clips, tested on 10
    folds = [write_fold(tmp_path / "folds", k, standard_rows(k), n_train=72) for k in range(1, 11)]
    values = [ACCURACY[k] for k in range(1, 11)]
    report = aggregate(folds, tmp_path / "a")
    assert report["accuracy"]["test_train_ratio"] == pytest.approx(10 / 72)
    expected = hand_stats(values, T975[9], 10 / 72)
    assert report["accuracy"]["corrected_ci"]["half_width"] == pytest.approx(
        expected["corrected"], rel=1e-6
    )
    report = aggregate(folds, tmp_path / "b", train_fraction=0.8)
    assert report["accuracy"]["test_train_ratio"] == pytest.approx(0.25)


def test_fold_folders_written_under_the_old_names_read_under_todays(tmp_path: Path) -> None:
    """A fold folder from before the renames (heldout_accuracy, best_accuracy, n_heldout)
    reads under today's names, and the report labels the peak test accuracy optimistic."""
    from genreflow.fold_result import read_fold, read_metrics, read_summary

    old = {"best_accuracy": 0.9, "best_iteration": 40, "n_heldout": 10, "n_train": 80}
    folds = [write_fold(tmp_path / "folds", k, standard_rows(k), **old) for k in range(1, 11)]
    (folds[0] / "metrics.csv").write_text(
        "iteration,train_loss,valid_accuracy,heldout_accuracy,seconds\n"
        "20,1.5,0.6,0.7,1.0\n40,1.0,0.8,0.9,2.0\n"
    )
    assert [row["test_accuracy"] for row in read_metrics(folds[0])] == ["0.7", "0.9"]
    for summary in (read_summary(folds[0]), read_fold(folds[0]).summary):
        assert summary["peak_test_accuracy"] == 0.9 and summary["peak_test_iteration"] == 40
        assert summary["n_test"] == 10
        assert not {"best_accuracy", "best_iteration", "n_heldout"} & set(summary)

    report = aggregate(folds, tmp_path / "report")
    assert [f["peak_test_accuracy"] for f in report["folds"]] == [0.9] * 10
    # The peak is shown beside the result, never in it.
    assert report["accuracy"]["mean"] == pytest.approx(np.mean(list(ACCURACY.values())))
    page = visible_lines((tmp_path / "report" / "report.html").read_text())
    assert any("peak test accuracy (optimistic)" in line for line in page)
    assert any(line.startswith("Peak test accuracy:") and "optimistic" in line for line in page)


def test_paired_comparison_by_hand() -> None:
    a = {1: 0.90, 2: 0.85, 3: 0.88, 4: 0.92, 5: 0.80, 6: 0.87, 7: 0.91, 8: 0.86, 9: 0.89, 10: 0.84}
    b = {1: 0.86, 2: 0.86, 3: 0.83, 4: 0.88, 5: 0.81, 6: 0.82, 7: 0.87, 8: 0.85, 9: 0.84}
    result = paired_comparison(a, b, train_fraction=0.9)

    differences = [a[k] - b[k] for k in range(1, 10)]  # fold 10 is only in run A
    k = 9
    mean = sum(differences) / k
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (k - 1))
    se = sd * math.sqrt(1 / k + 1 / 9)
    t = mean / se
    # two-sided p of Student's t with v dof: the regularised incomplete beta I_{v/(v+t^2)}(v/2, 1/2)
    dof = k - 1
    p = special.betainc(dof / 2, 0.5, dof / (dof + t * t))

    assert result["folds"] == list(range(1, 10))
    assert result["only_in_a"] == [10] and result["only_in_b"] == []
    assert result["differences"][3] == pytest.approx(0.05)
    assert result["mean_difference"] == pytest.approx(mean)
    assert result["std_difference"] == pytest.approx(sd)
    assert result["t_statistic"] == pytest.approx(t)
    assert result["dof"] == 8
    assert result["p_value"] == pytest.approx(p, rel=1e-6)
    # t_{0.975,8} = 2.306004
    assert result["corrected_ci"]["low"] == pytest.approx(mean - 2.306004 * se, abs=1e-6)
    assert result["corrected_ci"]["high"] == pytest.approx(mean + 2.306004 * se, abs=1e-6)
    # the uncorrected test would claim more than the data support
    naive_t = mean / (sd / math.sqrt(k))
    assert abs(result["t_statistic"]) < abs(naive_t)


def test_paired_comparison_needs_two_common_folds() -> None:
    with pytest.raises(GenreflowError, match="at least 2 folds"):
        paired_comparison({1: 0.9, 2: 0.8}, {2: 0.7, 3: 0.6}, train_fraction=0.9)
    with pytest.raises(GenreflowError, match="train_fraction"):
        paired_comparison({1: 0.9, 2: 0.8}, {1: 0.7, 2: 0.6}, train_fraction=1.0)


def test_command_line(ten_folds: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["aggregate", "--out", str(out), "--min-folds", "7"]
    for folder in ten_folds[:7]:
        argv += ["--fold-dir", str(folder)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "10-fold cross-validation (cv10): 7 of 10 folds" in printed
    assert "PARTIAL: missing fold(s) 8, 9, 10" in printed
    assert "corrected (Nadeau-Bengio)" in printed
    assert f"report: {out / 'report.html'}" in printed
    assert (out / "report.json").is_file()

    argv[argv.index("7")] = "8"
    assert main(argv) == 2
    assert "7 of 10 folds usable, 8 needed" in capsys.readouterr().err


def test_single_split_protocol(tmp_path: Path) -> None:
    # the filtered protocol reports once on one test list: no spread, no intervals
    folder = write_fold(tmp_path, 4, standard_rows(4))
    out = tmp_path / "out"
    report = aggregate([folder], out, expected_folds=[4], min_folds=1, protocol="filtered")
    acc = report["accuracy"]
    assert acc["k"] == 1 and acc["mean"] == pytest.approx(0.7)
    assert acc["std"] is None and acc["naive_ci"] is None and acc["corrected_ci"] is None
    assert report["partial"] is False
    lines = visible_lines((out / "report.html").read_text())
    assert lines[0] == "fault-filtered split (filtered)"

    with pytest.raises(GenreflowError, match="unknown protocol 'cv5'"):
        aggregate([folder], out, expected_folds=[4], min_folds=1, protocol="cv5")


# --- the filtered protocol: repetitions of one train/validation/test split ------------------
# Student's t_{0.975, 2} and the normal quantile z_{0.975}, from printed tables
T975_2 = 4.302653
Z975 = 1.959964
# The test list: two clips of each genre, the same in every repetition.
TEST_CLIPS = [(f"{genre}.{i:05d}.wav", genre) for genre in GENRES for i in (0, 1)]
# Per repetition: clip -> the wrong genre it was given; every other clip is right.
REPETITION_MISTAKES = {
    1: {"rock.00000.wav": "metal", "disco.00001.wav": "pop"},
    2: {"rock.00000.wav": "metal"},
    3: {"rock.00000.wav": "metal", "disco.00001.wav": "pop", "country.00000.wav": "blues"},
}
FILTERED_SPLIT = {
    "train": 443,
    "valid": 197,
    "test": len(TEST_CLIPS),
    "excluded": 2,
    "missing": 1,
    "excluded_names": ["blues.00099.wav", "pop.00098.wav"],
    "missing_names": ["jazz.00054.wav"],
}


def filtered_summary(repetition: int, **overrides) -> dict:
    return {
        "protocol": "filtered",
        "selection": "validation",
        "split": FILTERED_SPLIT,
        "valid_accuracy": 0.8,
        "selected_iteration": 100 * repetition,
        "data_sha256": "d" * 64,
        "split_sha256": "5" * 64,
        "seeds": {"train": repetition - 1},
        **overrides,
    }


def repetition_rows(repetition: int) -> list[tuple[str, str, str]]:
    wrong = REPETITION_MISTAKES[repetition]
    return [(name, genre, wrong.get(name, genre)) for name, genre in TEST_CLIPS]


@pytest.fixture
def three_repetitions(tmp_path: Path) -> list[Path]:
    return [
        write_fold(tmp_path / "reps", r, repetition_rows(r), **filtered_summary(r))
        for r in (1, 2, 3)
    ]


def wilson_by_hand(p: float, n: int, z: float) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_filtered_repetitions(three_repetitions: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    # no protocol= given: the summaries say "filtered"
    report = aggregate(three_repetitions, out, expected_folds=[1, 2, 3], min_folds=3)

    assert report["protocol"] == "filtered"
    assert report["selection"] == "validation"
    assert report["split"] == FILTERED_SPLIT
    assert report["data_sha256"] == "d" * 64 and report["split_sha256"] == "5" * 64
    assert report["seeds"] == {"1": {"train": 0}, "2": {"train": 1}, "3": {"train": 2}}
    assert [f["selected_iteration"] for f in report["folds"]] == [100, 200, 300]
    # 20 test clips; 2, 1 and 3 mistakes
    assert report["fold_accuracy"] == {"1": 18 / 20, "2": 19 / 20, "3": 17 / 20}
    assert report["n_clips"] == 20 and report["n_predictions"] == 60

    # the pooled matrix sums the repetitions: 6 predictions per genre, 3 rock->metal,
    # 2 disco->pop, 1 country->blues
    index = {g: i for i, g in enumerate(GENRES)}
    expected = [[0] * 10 for _ in GENRES]
    for g in GENRES:
        expected[index[g]][index[g]] = 6
    for true, predicted, count in [
        ("rock", "metal", 3),
        ("disco", "pop", 2),
        ("country", "blues", 1),
    ]:
        expected[index[true]][index[true]] -= count
        expected[index[true]][index[predicted]] = count
    assert report["confusion"]["matrix"] == expected
    assert "sum over 3 repetition" in report["confusion"]["pooled_over"]
    assert report["pooled_accuracy"] == pytest.approx(54 / 60)
    # a clip missed in several repetitions is named once
    assert report["confused_pairs"][0]["clips"] == ["rock.00000.wav"]

    acc = report["accuracy"]
    values = [0.90, 0.95, 0.85]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert acc["mean"] == pytest.approx(0.9) and acc["std"] == pytest.approx(sd)
    assert acc["min"] == pytest.approx(0.85) and acc["max"] == pytest.approx(0.95)
    assert acc["naive_ci"]["half_width"] == pytest.approx(T975_2 * sd / math.sqrt(3), rel=1e-6)
    assert "training randomness" in acc["naive_ci"]["method"]
    # no Nadeau-Bengio here: no fold-to-fold overlap of training sets to correct for
    assert acc["corrected_ci"] is None and acc["test_train_ratio"] is None
    # Wilson on the pooled proportion 54/60 but with n = the 20 test clips, not 60
    low, high = wilson_by_hand(54 / 60, 20, Z975)
    assert acc["wilson_ci"]["low"] == pytest.approx(low, abs=1e-6)
    assert acc["wilson_ci"]["high"] == pytest.approx(high, abs=1e-6)
    assert acc["wilson_ci"]["n"] == 20
    wider_by_n = wilson_by_hand(54 / 60, 60, Z975)
    assert acc["wilson_ci"]["half_width"] > (wider_by_n[1] - wider_by_n[0]) / 2
    assert (
        "Wilson" in report["intervals_note"] and "training randomness" in report["intervals_note"]
    )

    metrics = flat_metrics(report)
    assert metrics["accuracy_ci95_low"] == pytest.approx(low, abs=1e-6)
    assert metrics["accuracy_naive_ci95_high"] == pytest.approx(acc["naive_ci"]["high"])
    assert metrics["fold_02_accuracy"] == pytest.approx(0.95)

    lines = visible_lines((out / "report.html").read_text())
    assert lines[0] == (
        "fault-filtered split (filtered); checkpoint chosen on the validation split"
    )
    page = (out / "report.html").read_text()
    assert "jazz.00054.wav" in page and "d" * 64 in page
    on_disk = (out / "report.json").read_text()
    assert json.loads(on_disk)["split"]["missing"] == 1


def test_filtered_and_cv10_log_the_same_metric_names(
    three_repetitions: list[Path], ten_folds: list[Path], tmp_path: Path
) -> None:
    filtered = flat_metrics(
        aggregate(three_repetitions, tmp_path / "f", expected_folds=[1, 2, 3], min_folds=3)
    )
    cv10 = flat_metrics(aggregate(ten_folds, tmp_path / "c"))

    def names(metrics: dict) -> set[str]:
        return {n for n in metrics if not re.fullmatch(r"fold_\d\d_accuracy", n)}

    # test_train_ratio feeds `genreflow compare`'s correction: a cv10 figure only
    assert names(filtered) == names(cv10) - {"test_train_ratio"}
    assert {"accuracy_ci95_low", "accuracy_naive_ci95_low", "accuracy_mean"} <= names(filtered)
    assert cv10["test_train_ratio"] == pytest.approx(1 / 9)


def test_mixed_protocols_is_an_error(three_repetitions: list[Path], tmp_path: Path) -> None:
    four = {"expected_folds": [1, 2, 3, 4], "min_folds": 4}
    three = {"expected_folds": [1, 2, 3], "min_folds": 3}
    cv10_fold = write_fold(tmp_path / "other", 4, repetition_rows(1), protocol="cv10")
    with pytest.raises(GenreflowError, match="disagree on the protocol") as caught:
        aggregate([*three_repetitions, cv10_fold], tmp_path / "out", **four)
    assert str(three_repetitions[0] / "summary.json") in str(caught.value)
    assert str(cv10_fold / "summary.json") in str(caught.value)

    # a summary without "protocol" counts as cv10 beside one that says filtered
    (cv10_fold / "summary.json").write_text(json.dumps({"fold": 4}))
    with pytest.raises(GenreflowError, match="disagree on the protocol"):
        aggregate([*three_repetitions, cv10_fold], tmp_path / "out", **four)

    # the caller's protocol must agree with what the folds record
    with pytest.raises(GenreflowError, match=r"asked to aggregate protocol 'cv10'.*'filtered'"):
        aggregate(three_repetitions, tmp_path / "out", **three, protocol="cv10")


def test_repetition_with_other_clips_is_an_error(
    three_repetitions: list[Path], tmp_path: Path
) -> None:
    rows = repetition_rows(2)
    rows[0] = ("blues.00007.wav", "blues", "blues")  # instead of blues.00000.wav
    folder = write_fold(tmp_path / "reps", 2, rows, **filtered_summary(2))
    with pytest.raises(GenreflowError, match=r"repetition 2 predicts a different set") as caught:
        aggregate(three_repetitions, tmp_path / "out", expected_folds=[1, 2, 3], min_folds=3)
    message = str(caught.value)
    assert str(folder / "predictions.csv") in message
    assert "blues.00007.wav" in message and "blues.00000.wav" in message


def test_folds_disagree_on_the_data(three_repetitions: list[Path], tmp_path: Path) -> None:
    write_fold(
        tmp_path / "reps", 3, repetition_rows(3), **filtered_summary(3, data_sha256="e" * 64)
    )
    with pytest.raises(GenreflowError, match="disagree on the data checksum") as caught:
        aggregate(three_repetitions, tmp_path / "out", expected_folds=[1, 2, 3], min_folds=3)
    assert str(three_repetitions[2] / "summary.json") in str(caught.value)


def test_one_repetition_and_one_fold_have_no_spread(tmp_path: Path) -> None:
    folder = write_fold(tmp_path / "reps", 1, repetition_rows(1), **filtered_summary(1))
    out = tmp_path / "filtered"
    report = aggregate([folder], out, expected_folds=[1], min_folds=1)
    acc = report["accuracy"]
    assert acc["std"] is None and acc["naive_ci"] is None and acc["corrected_ci"] is None
    # the Wilson interval is about the test clips, not the repetitions: one is enough
    low, high = wilson_by_hand(18 / 20, 20, Z975)
    assert acc["wilson_ci"]["low"] == pytest.approx(low, abs=1e-6)
    on_disk = (out / "report.json").read_text()
    assert "NaN" not in on_disk and json.loads(on_disk)["accuracy"]["std"] is None
    metrics = flat_metrics(report)
    assert "accuracy_std" not in metrics and "accuracy_naive_ci95_low" not in metrics

    cv10 = aggregate(
        [write_fold(tmp_path / "cv", 3, standard_rows(3))],
        tmp_path / "cv10",
        expected_folds=[3],
        min_folds=1,
    )
    acc = cv10["accuracy"]
    assert acc["std"] is None and acc["naive_ci"] is None and acc["corrected_ci"] is None
    assert acc["wilson_ci"] is None
    assert not any("ci95" in name or name == "accuracy_std" for name in flat_metrics(cv10))
    assert "NaN" not in (tmp_path / "cv10" / "report.json").read_text()


def test_heldout_selection_is_named_first(tmp_path: Path) -> None:
    folds = [
        write_fold(tmp_path / "folds", k, standard_rows(k), protocol="cv10", selection="heldout")
        for k in (1, 2)
    ]
    out = tmp_path / "out"
    report = aggregate(folds, out, expected_folds=[1, 2], min_folds=2)
    assert report["selection"] == "heldout"
    lines = visible_lines((out / "report.html").read_text())
    assert lines[0] == (
        "10-fold cross-validation (cv10); checkpoint chosen on the held-out fold, "
        "as the seed did: optimistic"
    )
    assert report["split"] is None and report["seeds"] == {}

    # selection recorded by one fold and not by another: mixed runs, refused
    write_fold(tmp_path / "folds", 2, standard_rows(2), protocol="cv10")
    with pytest.raises(GenreflowError, match="disagree on the checkpoint selection"):
        aggregate(folds, out, expected_folds=[1, 2], min_folds=2)


def test_folds_of_an_earlier_recipe_are_labelled_and_never_mixed(tmp_path: Path) -> None:
    """A fold whose config records no recipe_version was trained under recipe 1 (the loss
    summed over genres): its report still reads, and says so first thing."""
    today = {"recipe_version": RECIPE_VERSION, "seed": 0}
    old = {"seed": 0}
    folds = [write_fold(tmp_path / "old", k, standard_rows(k), config=old) for k in (1, 2)]
    out = tmp_path / "out"
    report = aggregate(folds, out, expected_folds=[1, 2], min_folds=2)
    assert report["recipe_version"] == 1
    assert "summed over genres" in report["recipe"]
    note = next(line for line in headline(report) if line.startswith("OLDER RECIPE"))
    assert "recipe 1" in note and f"recipe {RECIPE_VERSION}" in note
    assert any(
        line.startswith("OLDER RECIPE") for line in visible_lines((out / "report.html").read_text())
    )

    folds = [write_fold(tmp_path / "new", k, standard_rows(k), config=today) for k in (1, 2)]
    report = aggregate(folds, out, expected_folds=[1, 2], min_folds=2)
    assert report["recipe_version"] == RECIPE_VERSION
    assert not any(line.startswith("OLDER RECIPE") for line in headline(report))

    write_fold(tmp_path / "new", 2, standard_rows(2), config=old)
    with pytest.raises(GenreflowError, match="disagree on the recipe version"):
        aggregate(folds, out, expected_folds=[1, 2], min_folds=2)


def test_the_report_says_what_a_rerun_gives(tmp_path: Path) -> None:
    """CPU folds rerun bit for bit; GPU folds do not, and the report says so."""
    cpu = [
        write_fold(tmp_path / "cpu", r, repetition_rows(r), **filtered_summary(r, device="cpu"))
        for r in (1, 2)
    ]
    report = aggregate(cpu, tmp_path / "cpu-report", expected_folds=[1, 2], min_folds=2)
    assert "bit for bit" in report["reproducibility"]
    gpu = [
        write_fold(tmp_path / "gpu", r, repetition_rows(r), **filtered_summary(r, device="cuda"))
        for r in (1, 2)
    ]
    report = aggregate(gpu, tmp_path / "gpu-report", expected_folds=[1, 2], min_folds=2)
    assert report["reproducibility"].startswith("trained on cuda: a rerun with the same seed")
    page = (tmp_path / "gpu-report" / "report.html").read_text()
    assert "not bit-identical" in page


def test_scipy_statistics_match_the_formulas_by_hand() -> None:
    # The naive t interval and Welch's test come from scipy, Nadeau-Bengio and Wilson are
    # computed by hand (Wilson: the pooled count of a filtered run need not be whole, which
    # scipy's binomtest requires); each agrees with the other way to rounding.
    from scipy import stats

    from genreflow.compare import _welch

    values = [0.80, 0.90, 0.85, 0.86, 0.91, 0.84, 0.88, 0.87, 0.83, 0.86]
    k, mean, sd = len(values), float(np.mean(values)), float(np.std(values, ddof=1))
    naive = fold_statistics(values, 1 / 9)["naive_ci"]
    half = stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)
    assert naive["low"] == pytest.approx(mean - half, abs=1e-15)
    assert naive["high"] == pytest.approx(mean + half, abs=1e-15)
    assert naive["half_width"] == pytest.approx(half, abs=1e-15)

    for successes, n in ((18, 20), (0, 5), (5, 5), (261, 290)):
        wilson = wilson_interval(successes / n, n)
        by_scipy = stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
        assert wilson["low"] == pytest.approx(by_scipy.low, abs=1e-15)
        assert wilson["high"] == pytest.approx(by_scipy.high, abs=1e-15)

    a, b = [0.80, 0.82, 0.81], [0.84, 0.83, 0.85, 0.86]
    var_a, var_b = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(b) - np.mean(a)) / math.sqrt(var_a + var_b)
    dof = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    welch = _welch(a, b)
    assert welch["t_statistic"] == pytest.approx(t, abs=1e-12)
    assert welch["dof"] == pytest.approx(dof, abs=1e-12)
    assert welch["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), dof), abs=1e-15)
    half = stats.t.ppf(0.975, dof) * math.sqrt(var_a + var_b)
    assert welch["ci"]["half_width"] == pytest.approx(half, abs=1e-15)
    still = _welch([0.8, 0.8], [0.9, 0.9])  # no spread: scipy's t is nan, ours says why
    assert still["t_statistic"] == math.inf and still["p_value"] == 0.0
