"""One fold's training: resume equivalence, the outputs' format, model selection, the
filtered protocol, bad inputs, learning.

Every run is real: the 80 M-parameter Cnn14, 1 s clips at 32 kHz, a handful of iterations
on a small features file made here with h5py (three folds, one clip per genre and fold:
fold 1 is the test fold, fold 2 the validation fold, fold 3 trains).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from killable_child import start_held

from genreflow.aggregate import aggregate
from genreflow.audio import SAMPLE_RATE
from genreflow.cli import main
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.models.checkpoints import load_transfer_model, save_checkpoint
from genreflow.models.transfer import TransferCnn14
from genreflow.runtime import (
    autocast_for,
    cpu_has_native_bf16,
    cpu_threads,
    cpu_threads_for_training,
    resolve_precision,
)
from genreflow.splits import clip_id, filtered_lists, split_sha256
from genreflow.train import (
    LAST,
    EpochSampler,
    PackedClips,
    TrainConfig,
    evaluate,
    normalized_probabilities,
    train_fold,
)

REPO = Path(__file__).resolve().parents[1]


def write_features(
    path: Path,
    *,
    clips_per_genre_and_fold: int = 1,
    folds: tuple[int, ...] = (1, 2, 3),
    seconds: float = 1.0,
    sample_rate: int = SAMPLE_RATE,
    seed: int = 0,
    names: list[str] | None = None,
) -> Path:
    """A features.h5 as `genreflow pack` writes it: genre g is band-limited noise around
    its own centre frequency, gated at its own rate, with a tone in every other genre.

    By default clip k of a genre is `<genre>.0000k.wav` in folds[k % len(folds)]; `names`
    gives the clips instead (sorted, folds by the seed's rule, as pack assigns them).
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    if names is None:
        per_genre = clips_per_genre_and_fold * len(folds)
        clips = [
            (f"{genre}.{k:05d}.wav", folds[k % len(folds)])
            for genre in GENRES
            for k in range(per_genre)
        ]
    else:
        clips = [(name, row % 10 + 1) for row, name in enumerate(sorted(names))]
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    names, waveforms, targets, fold_of = [], [], [], []
    for name, fold in clips:
        g = GENRES.index(name.split(".")[0])
        centre = 150 * 2 ** (0.6 * g)
        gate_rate = (1, 2, 3, 5, 8, 13, 21, 4, 6, 10)[g]
        spectrum_mask = (freqs > centre / 1.3) & (freqs < centre * 1.3)
        noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * spectrum_mask, n)
        noise /= np.abs(noise).max()
        gate = 0.1 + 0.9 * (np.sin(2 * np.pi * gate_rate * t + rng.uniform(0, 6.3)) > 0)
        tone = 0.5 * np.sin(2 * np.pi * centre * t) if g % 2 else 0.0
        x = np.clip(0.4 * gate * (noise + tone), -1, 1)
        names.append(name)
        waveforms.append((x * 32767).astype(np.int16))
        targets.append(np.eye(len(GENRES), dtype=np.float32)[g])
        fold_of.append(fold)
    with h5py.File(path, "w") as hf:
        hf["audio_name"] = np.array([name.encode() for name in names])
        hf["waveform"] = np.stack(waveforms)
        hf["target"] = np.stack(targets)
        hf["fold"] = np.array(fold_of, dtype=np.int32)
        hf.attrs.update(
            {
                "sample_rate": sample_rate,
                "clip_samples": n,
                "clip_seconds": seconds,
                "genres": list(GENRES),
                "source_sha256": "0" * 64,
                "genreflow_version": "test",
            }
        )
    return path


# Small enough for two cores: a frozen base (only the head learns), 2 x 2 clips per step.
# fp32 whatever the CPU: the bit-for-bit comparisons below must mean the same on every machine.
RESUME_RECIPE = {
    "freeze_base": True,
    "iterations": 6,
    "batch_size": 2,
    "eval_every": 2,
    "precision": "fp32",
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """features.h5; the same random Cnn14 as a published checkpoint ({'model': Cnn14
    state dict}, no metadata); and as one of ours made for 2 s clips."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(1)
    model = TransferCnn14()
    torch.save({"model": model.base.state_dict()}, root / "published.pth")
    metadata = {"genres": list(GENRES), "sample_rate": SAMPLE_RATE, "clip_samples": 64000}
    save_checkpoint(root / "two_seconds.pth", model, iteration=10, metadata=metadata)
    return {
        "features": write_features(root / "features.h5"),
        "published": root / "published.pth",
        "two_seconds": root / "two_seconds.pth",
    }


def _config(work: dict[str, Path], out: Path, **changes) -> TrainConfig:
    fields = {"features": str(work["features"]), "fold": 1, "out": str(out)}
    fields.update(pretrained=str(work["published"]), device="cpu", **RESUME_RECIPE)
    return TrainConfig(**{**fields, **changes})


def _cli_args(work: dict[str, Path], out: Path) -> list[str]:
    r = RESUME_RECIPE
    return [
        "train",
        f"--features={work['features']}",
        "--fold=1",
        f"--out={out}",
        f"--pretrained={work['published']}",
        "--freeze-base",
        f"--iterations={r['iterations']}",
        f"--batch-size={r['batch_size']}",
        f"--eval-every={r['eval_every']}",
        f"--precision={r['precision']}",
        "--device=cpu",
    ]


@pytest.fixture(scope="module")
def uninterrupted(work, tmp_path_factory) -> Path:
    """The reference run, in this process, from the published-form checkpoint."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(_cli_args(work, out)) == 0
    return out


def _metrics_without_time(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert float(row.pop("seconds")) >= 0
    return rows


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_killed_run_resumes_to_the_same_result(work, uninterrupted, tmp_path, capsys):
    # Killed once iteration 4's last.pth is written: past the commit point (resume.pt, at
    # iteration 2), which the resume must rewrite identically. The child holds there until
    # the kill (killed after a poll instead, a busy machine sometimes let it finish first).
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "genreflow.cli", *_cli_args(work, out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        process = start_held(
            "genreflow.models.checkpoints:save_checkpoint",
            command[1:],
            calls=2,
            named=LAST,
            env=env,
            stderr=stderr,
        )
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()
    assert not (out / "summary.json").exists()
    assert len(_metrics_without_time(out / "metrics.csv")) == 2  # iterations 2 and 4
    killed_at = torch.load(out / "resume.pt", weights_only=True)["iteration"]
    assert killed_at == 2

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from iteration {killed_at}" in resumed.stderr

    assert _metrics_without_time(out / "metrics.csv") == _metrics_without_time(
        uninterrupted / "metrics.csv"
    )
    assert (out / "predictions.csv").read_text() == (uninterrupted / "predictions.csv").read_text()
    for name in ("last.pth", "best.pth"):
        ours, reference = _weights(out / name), _weights(uninterrupted / name)
        assert ours.keys() == reference.keys()
        for key in reference:
            assert torch.equal(ours[key], reference[key]), f"{name}: {key} differs"
    # No resume state and no partial write left behind: the same files as the reference.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in uninterrupted.iterdir())

    # Finished: the same command does nothing and says so.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(_cli_args(work, out)) == 0
    assert "already trained to iteration 6" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_each_evaluation_is_reported_as_it_happens(work, uninterrupted, tmp_path):
    """on_evaluation (the live curve's feed) gets each metrics.csv row while the run goes
    on, before the run is finished, and the same rows the reference run wrote."""
    out = tmp_path / "live"
    seen = []

    def on_evaluation(row: dict) -> None:
        seen.append({**row, "finished": (out / "summary.json").exists()})

    train_fold(_config(work, out), on_evaluation=on_evaluation)
    assert not any(row.pop("finished") for row in seen)
    for row in seen:
        assert row.pop("seconds") >= 0
    expected = _metrics_without_time(uninterrupted / "metrics.csv")
    assert [{k: str(v) for k, v in row.items()} for row in seen] == expected


def test_outputs_follow_the_contract(work, uninterrupted):
    out = uninterrupted
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pth",
        "last.pth",
        "metrics.csv",
        "predictions.csv",
        "summary.json",
    ]
    with (out / "metrics.csv").open(newline="") as f:
        metrics = list(csv.DictReader(f))
    assert list(metrics[0]) == [
        "iteration",
        "train_loss",
        "valid_accuracy",
        "test_accuracy",
        "seconds",
    ]
    assert [int(row["iteration"]) for row in metrics] == [2, 4, 6]

    with h5py.File(work["features"]) as hf:
        names, folds = hf["audio_name"][:], hf["fold"][:]
    heldout = [name.decode() for name, k in zip(names, folds, strict=True) if k == 1]
    with (out / "predictions.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["audio_name", "fold", "genre", *GENRES]
    assert [row["audio_name"] for row in rows] == heldout
    for row in rows:
        assert row["fold"] == "1" and row["genre"] == row["audio_name"].split(".")[0]
        assert sum(float(row[g]) for g in GENRES) == pytest.approx(1.0, abs=1e-6)

    summary = json.loads((out / "summary.json").read_text())
    accuracy = np.mean([max(GENRES, key=lambda g: float(r[g])) == r["genre"] for r in rows])
    assert summary["final_accuracy"] == pytest.approx(accuracy)
    # The reported number is the selected checkpoint's, from its row of metrics.csv.
    selected = next(r for r in metrics if int(r["iteration"]) == summary["selected_iteration"])
    assert summary["final_accuracy"] == float(selected["test_accuracy"])
    assert summary["valid_accuracy"] == float(selected["valid_accuracy"])
    assert summary["peak_test_accuracy"] == max(float(r["test_accuracy"]) for r in metrics)
    assert summary["fold"] == 1 and summary["iterations"] == 6
    assert summary["path"] == "fine-tune"
    assert summary["protocol"] == "cv10" and summary["selection"] == "validation"
    assert summary["n_train"] == 10 and summary["n_test"] == 10
    assert summary["split"] == {
        "train": 10,
        "valid": 10,
        "test": 10,
        "excluded": 0,
        "missing": 0,
        "excluded_names": [],
        "missing_names": [],
    }
    assert summary["split_sha256"] == split_sha256("cv10")
    assert summary["data_sha256"] == "0" * 64  # the packed file's source_sha256
    assert summary["seeds"] == {"config": 0, "torch": 0, "python": 0, "sampler": 0, "mixup": 1}
    assert summary["clips_per_second"] > 0 and summary["wall_seconds"] > 0

    checkpoint = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 6
    assert all(k.startswith(("base.", "fc_transfer.")) for k in checkpoint["model"])
    metadata = checkpoint["genreflow"]
    assert metadata["genres"] == list(GENRES)
    assert metadata["sample_rate"] == SAMPLE_RATE and metadata["clip_samples"] == SAMPLE_RATE
    assert metadata["fold"] == 1
    assert metadata["config"]["batch_size"] == 2 and metadata["config"]["lr"] == 1e-4
    assert metadata["recipe"]["amsgrad"] is True
    best = torch.load(out / "best.pth", map_location="cpu", weights_only=True)
    assert best["iteration"] == summary["selected_iteration"]
    model, loaded_metadata = load_transfer_model(out / "last.pth")
    assert isinstance(model, TransferCnn14) and loaded_metadata["fold"] == 1
    assert loaded_metadata["config"]["protocol"] == "cv10"


def test_the_checkpoint_is_chosen_on_validation_and_reported_on_the_test_fold(work, uninterrupted):
    """best.pth is the first evaluation with the highest valid_accuracy, and predictions.csv
    is best.pth on the test fold (not the last model)."""
    out = uninterrupted
    with (out / "metrics.csv").open(newline="") as f:
        metrics = list(csv.DictReader(f))
    valid = [float(row["valid_accuracy"]) for row in metrics]
    chosen = metrics[int(np.argmax(valid))]  # argmax: the first of equals
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selected_iteration"] == int(chosen["iteration"])
    assert summary["final_accuracy"] == float(chosen["test_accuracy"])
    assert torch.load(out / "best.pth", weights_only=True)["iteration"] == int(chosen["iteration"])

    model, _ = load_transfer_model(out / "best.pth")
    with h5py.File(work["features"]) as hf:
        test_rows = np.flatnonzero(hf["fold"][:] == 1)
    waveforms = PackedClips(str(work["features"]), test_rows)
    probabilities = evaluate(
        model,
        waveforms,
        test_rows,
        batch_size=2,
        device=torch.device("cpu"),
        amp=autocast_for(torch.device("cpu"), "fp32"),
    )
    with (out / "predictions.csv").open(newline="") as f:
        written = np.array([[float(r[g]) for g in GENRES] for r in csv.DictReader(f)])
    np.testing.assert_allclose(written, probabilities, rtol=1e-6, atol=1e-7)


def test_no_test_clip_takes_part_in_the_choice(work, uninterrupted, tmp_path):
    """The same run on features whose test fold is replaced (other sounds, shuffled labels)
    trains and chooses exactly as before: only the held-out figures change."""
    altered = tmp_path / "altered.h5"
    altered.write_bytes(work["features"].read_bytes())
    with h5py.File(altered, "a") as hf:
        test = np.flatnonzero(hf["fold"][:] == 1)
        hf["waveform"][test] = np.random.default_rng(5).integers(
            -3000, 3000, size=(len(test), hf["waveform"].shape[1]), dtype=np.int16
        )
        hf["target"][test] = np.roll(hf["target"][test], 3, axis=1)
    out = tmp_path / "out"
    summary = train_fold(_config(work, out, features=str(altered)))
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["selected_iteration"] == reference["selected_iteration"]
    assert summary["valid_accuracy"] == reference["valid_accuracy"]

    def columns(path: Path) -> list[tuple[str, str, str]]:
        rows = _metrics_without_time(path / "metrics.csv")
        return [(r["iteration"], r["train_loss"], r["valid_accuracy"]) for r in rows]

    assert columns(out) == columns(uninterrupted)
    ours, reference_weights = _weights(out / "best.pth"), _weights(uninterrupted / "best.pth")
    for key in reference_weights:
        assert torch.equal(ours[key], reference_weights[key]), key


def test_bad_inputs_fail_before_training(work, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(GenreflowError, match=f"{missing}: features file not found"):
        train_fold(_config(work, out, features=str(missing)))
    with pytest.raises(
        GenreflowError, match=r"fold 5 has no clips in .*features.h5 \(folds present: 1, 2, 3\)"
    ):
        train_fold(_config(work, out, fold=5))
    with pytest.raises(GenreflowError, match="validation fold 4 .*after test fold 3"):
        train_fold(_config(work, out, fold=3))
    with pytest.raises(GenreflowError, match="--protocol must be one of cv10, filtered"):
        train_fold(_config(work, out, protocol="kfold"))
    with pytest.raises(GenreflowError, match="--selection must be one of validation, heldout"):
        train_fold(_config(work, out, selection="test"))
    # A training-list and a validation-list clip, but none of the test list.
    no_test = write_features(tmp_path / "no_test.h5", names=["blues.00029.wav", "blues.00000.wav"])
    with pytest.raises(GenreflowError, match="filtered: none of the 290 test-list clips"):
        train_fold(_config(work, out, features=str(no_test), protocol="filtered"))
    other_rate = write_features(tmp_path / "16k.h5", sample_rate=16000)
    with pytest.raises(GenreflowError, match="16000 Hz.*32000 Hz"):
        train_fold(_config(work, out, features=str(other_rate)))
    with pytest.raises(GenreflowError, match="clip_samples 64000.*clip_samples 32000"):
        train_fold(_config(work, out, pretrained=str(work["two_seconds"])))
    misfit = tmp_path / "misfit.pth"
    torch.save({"model": {"conv_block1.conv1.weight": torch.zeros(3, 3)}}, misfit)
    with pytest.raises(GenreflowError, match="misfit.pth does not fit.*missing key"):
        train_fold(_config(work, out, pretrained=str(misfit)))
    with pytest.raises(GenreflowError, match="--iterations must be"):
        train_fold(_config(work, out, iterations=0))
    with pytest.raises(GenreflowError, match="--eval-every must be"):
        train_fold(_config(work, out, eval_every=0))
    assert not out.exists()


def test_cli_reports_a_bad_fold(work, tmp_path, capsys):
    args = _cli_args(work, tmp_path / "out")
    args[2] = "--fold=5"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "fold 5 has no clips in" in err and "(folds present: 1, 2, 3)" in err
    args[2] = "--fold=11"
    assert main(args) == 2
    assert "cv10: --fold must be one of 1..10, got 11" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*args[:2], "--fold=1", *args[3:], "--selection=test"])
    assert exited.value.code == 2 and "invalid choice: 'test'" in capsys.readouterr().err


def test_a_resume_with_other_settings_is_refused(work, uninterrupted):
    with pytest.raises(GenreflowError, match="other settings.*seed=0 there, 1 now"):
        train_fold(_config(work, uninterrupted, seed=1))
    with pytest.raises(GenreflowError, match="other settings.*selection='validation' there"):
        train_fold(_config(work, uninterrupted, selection="heldout"))
    with pytest.raises(GenreflowError, match="finished at iteration 6"):
        train_fold(_config(work, uninterrupted, iterations=8))


def test_a_run_of_an_earlier_recipe_is_neither_resumed_nor_taken_as_finished(
    work, uninterrupted, tmp_path
):
    """Folders trained before recipe versions were recorded (recipe 1: the loss summed over
    genres) are refused, finished or not: resuming one under today's loss would splice two
    recipes into one run."""
    from genreflow import resume

    old = tmp_path / "old"
    shutil.copytree(uninterrupted, old)
    summary = json.loads((old / "summary.json").read_text())
    del summary["config"]["recipe_version"]
    (old / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(GenreflowError, match="other settings.*recipe_version=1 there, 2 now"):
        train_fold(_config(work, old))

    config = _config(work, tmp_path / "unfinished")
    fingerprint = summary["features"]
    saved = {"iteration": 2, "config": summary["config"], "features": fingerprint}
    Path(config.out).mkdir()
    torch.save(saved, Path(config.out) / resume.RESUME)
    with pytest.raises(GenreflowError, match="recipe_version=1 there, 2 now"):
        resume.load(Path(config.out), config, fingerprint)


def _filtered_sample() -> list[str]:
    """Clips named as in GTZAN: per genre the first two of the filtered training list, the
    first of the validation and of the test list; and five clips that no list names."""
    lists = filtered_lists()
    listed = {name for names in lists.values() for name in names}
    picked = []
    for genre in GENRES:
        for part, count in (("train", 2), ("valid", 1), ("test", 1)):
            picked += [n for n in lists[part] if n.startswith(f"{genre}.")][:count]
    every = sorted(f"{genre}.{k:05d}" for genre in GENRES for k in range(100))
    excluded = [name for name in every if name not in listed][:5]
    return [f"{name}.wav" for name in picked + excluded]


def test_filtered_protocol_trains_chooses_and_reports_on_the_lists(work, tmp_path, capsys):
    """The lists decide the rows whatever the folds say; the repetition (fold) only moves
    the seed: repetition 2 with seed 0 is repetition 1 with seed 1, bit for bit.

    (A set of the lists' full size is run through train_head in test_frozen; here the
    80 M-parameter Cnn14 evaluates only a sample, 20 training clips, 10 + 10 evaluated.)
    """
    names = _filtered_sample()
    # 0.7 s: just over the 0.63 s SpecAugment needs, to keep three runs cheap.
    features = write_features(tmp_path / "filtered.h5", names=names, seconds=0.7)
    recipe = {"features": str(features), "protocol": "filtered", "iterations": 2}
    first = train_fold(_config(work, tmp_path / "r1", **recipe, fold=1, seed=0))
    second = train_fold(_config(work, tmp_path / "r2", **recipe, fold=2, seed=0))
    args = [a for a in _cli_args(work, tmp_path / "cli") if not a.startswith("--iterations")]
    args = [a if not a.startswith("--features") else f"--features={features}" for a in args]
    assert main([*args, "--iterations=2", "--protocol=filtered", "--seed=1"]) == 0
    assert "(filtered): test accuracy" in capsys.readouterr().out

    lists = filtered_lists()
    split = second["split"]
    assert [split[k] for k in ("train", "valid", "test", "excluded", "missing")] == [
        20,
        10,
        10,
        5,
        930 - 40,
    ]
    assert split["excluded_names"] == names[-5:]
    assert len(split["missing_names"]) == 890 and "rock.00099" in split["missing_names"]
    assert second["protocol"] == "filtered" and second["selection"] == "validation"
    assert second["n_train"] == 20 and second["n_test"] == 10
    assert second["split_sha256"] == split_sha256("filtered") != split_sha256("cv10")
    assert second["seeds"]["config"] == 0 and second["seeds"]["torch"] == 1
    assert first["seeds"]["torch"] == 0

    with (tmp_path / "r2" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(clip_id(r["audio_name"]) for r in rows) == sorted(
        clip_id(n) for n in names if clip_id(n) in set(lists["test"])
    )
    assert {r["fold"] for r in rows} == {"2"}  # the repetition, not the packed fold

    # Same effective seed: the same run; another seed: another run.
    def predictions(out: Path) -> list[list[str]]:
        with (out / "predictions.csv").open(newline="") as f:
            return [[v for k, v in row.items() if k != "fold"] for row in csv.DictReader(f)]

    assert _metrics_without_time(tmp_path / "cli" / "metrics.csv") == _metrics_without_time(
        tmp_path / "r2" / "metrics.csv"
    )
    assert predictions(tmp_path / "cli") == predictions(tmp_path / "r2")
    assert predictions(tmp_path / "r1") != predictions(tmp_path / "r2")


def _band_noise(rng, n: int, low: float, high: float) -> np.ndarray:
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n)) * ((freqs > low) & (freqs < high))
    x = np.fft.irfft(spectrum, n)
    return 0.4 * x / np.abs(x).max()


@pytest.mark.slow
def test_full_fine_tuning_learns(tmp_path):
    """Twenty steps of the seed's loop (Adam, clip_nll, all 80 M parameters trained) take
    a random Cnn14 from chance to telling two genres apart on clips it never saw.

    Why this setting: a random base cannot be frozen here, because the seed keeps a frozen
    base in train mode and, untrained, its train-mode embeddings (dropout, batch
    statistics) share nothing with its eval-mode ones; and ten genres need far more
    steps than two CPU cores give a test. Two genres (low and high band noise), lr 1e-3,
    no mixup, batch 4 (it gets there by step 16 with seeds 0, 1 and 2).
    """
    rng = np.random.default_rng(0)
    n = SAMPLE_RATE
    bands = {"blues": (100, 250), "classical": (6000, 12000)}
    names, waveforms, targets, folds = [], [], [], []
    for genre, (low, high) in bands.items():
        for k in range(8):
            names.append(f"{genre}.{k:05d}.wav".encode())
            waveforms.append((_band_noise(rng, n, low, high) * 32767).astype(np.int16))
            targets.append(np.eye(len(GENRES), dtype=np.float32)[GENRES.index(genre)])
            folds.append(1 + k % 2)
    features = tmp_path / "two_genres.h5"
    with h5py.File(features, "w") as hf:
        hf["audio_name"] = np.array(names)
        hf["waveform"] = np.stack(waveforms)
        hf["target"] = np.stack(targets)
        hf["fold"] = np.array(folds, dtype=np.int32)
        hf.attrs.update(
            {"sample_rate": SAMPLE_RATE, "clip_samples": n, "clip_seconds": 1.0}
            | {"genres": list(GENRES), "source_sha256": "1" * 64}
        )
    config = TrainConfig(
        features=str(features),
        fold=1,
        out=str(tmp_path / "out"),
        iterations=20,
        batch_size=4,
        lr=1e-3,
        mixup=False,
        eval_every=20,
        device="cpu",
        # The same arithmetic on every CPU: `auto` is bf16 where native, whose rounding
        # moves this 20-step run across the line (measured: 0.5 at 20 steps, 1.0 at 40).
        precision="fp32",
        # Two folds leave none to validate on; one evaluation, at the end, so nothing is
        # chosen: the final model is reported either way.
        selection="heldout",
    )
    summary = train_fold(config)
    assert summary["selected_iteration"] == 20
    # Chance is 0.5 between the two genres present (0.1 over the ten outputs).
    assert summary["final_accuracy"] >= 0.875
    with (tmp_path / "out" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    # Not only the argmax: the probability on the true genre has moved off the prior.
    assert np.mean([float(row[row["genre"]]) for row in rows]) > 0.6


def test_waveforms_read_from_disk_equal_those_held_in_memory(work):
    rows = np.array([7, 3, 3, 0, 19])  # unsorted, repeated: what an epoch boundary gives
    in_memory = PackedClips(str(work["features"]), np.arange(20))
    on_disk = PackedClips(str(work["features"]), np.arange(20), max_memory_bytes=0)
    try:
        assert in_memory.in_memory and not on_disk.in_memory
        with h5py.File(work["features"]) as hf:
            expected = np.stack([hf["waveform"][row] for row in rows])
        np.testing.assert_array_equal(in_memory[rows], expected)
        np.testing.assert_array_equal(on_disk[rows], expected)
    finally:
        on_disk.close()


def test_sampler_walks_whole_epochs_and_resumes_from_its_state(tmp_path):
    rows = np.arange(10, 17)
    sampler = EpochSampler(rows, seed=3)
    first = np.concatenate([sampler.next_batch(4) for _ in range(7)])  # four epochs
    for epoch in first.reshape(4, 7):
        assert sorted(epoch) == list(rows)
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    expected = np.concatenate([sampler.next_batch(3) for _ in range(5)])
    restored = EpochSampler(rows, seed=99)
    restored.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    np.testing.assert_array_equal(
        np.concatenate([restored.next_batch(3) for _ in range(5)]), expected
    )


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def test_precision_option_resolves_to_the_hardware_and_is_validated(
    work, uninterrupted, tmp_path, capsys
):
    cpu = torch.device("cpu")
    native = cpu_has_native_bf16()
    flags = _cpuinfo_flags()
    if flags is not None:
        assert native == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for: emulated if need be
    with pytest.raises(GenreflowError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(GenreflowError, match="--precision must be one of auto, fp32, bf16"):
        train_fold(_config(work, tmp_path / "bad", precision="fp16"))
    assert not (tmp_path / "bad").exists()
    args = _cli_args(work, tmp_path / "bad")
    with pytest.raises(SystemExit) as exited:
        main([a if not a.startswith("--precision") else "--precision=fp16" for a in args])
    assert exited.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err

    # What the forward pass runs in; the weights stay fp32 either way.
    conv = torch.nn.Conv2d(1, 4, 3)
    x = torch.randn(2, 1, 8, 8)
    with autocast_for(cpu, "bf16")():
        assert conv(x).dtype == torch.bfloat16
    with autocast_for(cpu, "fp32")():
        assert conv(x).dtype == torch.float32
    assert conv.weight.dtype == torch.float32

    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["config"]["precision"] == "fp32"


@pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="no native bf16 on this CPU: emulated, one step takes ~25 s (the option's "
    "resolution and autocast are tested above)",
)
def test_a_bf16_run_stays_close_to_fp32(work, tmp_path, capsys):
    # bf16 autocast really runs (the probabilities move in their low digits) and stays
    # close to fp32, since the weights, the optimiser and the front end remain fp32.
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        summary = train_fold(_config(work, out, precision=precision, iterations=2))
        assert summary["precision"] == precision
        with (out / "predictions.csv").open(newline="") as f:
            runs[precision] = np.array([[float(r[g]) for g in GENRES] for r in csv.DictReader(f)])
    assert "cpu bf16 autocast" in capsys.readouterr().err
    assert not np.array_equal(runs["bf16"], runs["fp32"])
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], atol=0.02)
    # The bf16 fold's rows sum to 1 as written, and aggregate (and so tracking) reads it.
    np.testing.assert_allclose(runs["bf16"].sum(axis=1), 1.0, atol=1e-6)
    report = aggregate([tmp_path / "bf16"], tmp_path / "report", expected_folds=[1], min_folds=1)
    assert report["usable_folds"] == [1]


def test_probabilities_are_float32_and_normalised_under_bf16_autocast(work):
    # On any CPU (emulated bf16 where not native): the head's log-softmax leaves autocast
    # in float32, and evaluate's rows sum to 1 as written, so aggregate accepts them.
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = TransferCnn14()
    embedding = torch.randn(6, model.base.embedding_size)
    with autocast_for(cpu, "bf16")():
        assert model.fc_transfer(embedding).dtype == torch.bfloat16  # autocast is on
        log_probs = model.head_forward(embedding)
    assert log_probs.dtype == torch.float32
    assert np.abs(log_probs.detach().exp().sum(-1).numpy() - 1).max() < 1e-6

    # Log-probabilities that went through bf16 (what the head gave before) sum to 1 only
    # within bf16's rounding; normalized_probabilities makes them sum to 1 all the same.
    rounded = torch.log_softmax(model.fc_transfer(embedding) * 5, dim=-1).bfloat16()
    assert np.abs(rounded.detach().double().exp().sum(-1).numpy() - 1).max() > 1e-4
    probabilities = normalized_probabilities(rounded)
    assert probabilities.dtype == np.float64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)

    waveforms = PackedClips(str(work["features"]), np.arange(3))
    rows = np.arange(3)
    amp = autocast_for(cpu, "bf16")
    evaluated = evaluate(model, waveforms, rows, batch_size=2, device=cpu, amp=amp)
    assert evaluated.shape == (3, len(GENRES)) and evaluated.dtype == np.float64
    np.testing.assert_allclose(evaluated.sum(axis=1), 1.0, atol=1e-12)


def test_training_threads_follow_the_cpu_quota_and_are_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    allowed = cpu_threads()
    assert 1 <= allowed <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(allowed + 3)
        with cpu_threads_for_training():
            assert torch.get_num_threads() == allowed
        assert torch.get_num_threads() == allowed + 3
    finally:
        torch.set_num_threads(before)


def test_the_resume_state_follows_its_schedule_and_leaves_the_result_alone(
    work, uninterrupted, tmp_path
):
    """resume_every_seconds=0 writes a state at every evaluation but the last; a long
    interval, at the first evaluation only; either way the run ends where the reference
    (whose CLI default is 300 s) does, and on_checkpoint is told what each state vouches for."""
    from genreflow.train import _train_fold_in

    sent: dict[float, list[tuple[tuple[str, ...], int]]] = {}
    for every in (0.0, 1e9):
        out = tmp_path / f"every-{every:g}"
        calls = sent[every] = []

        def record(*names: str, out: Path = out, calls: list = calls) -> None:
            iteration = torch.load(out / "resume.pt", weights_only=True)["iteration"]
            calls.append((names, iteration))

        _train_fold_in(_config(work, out, resume_every_seconds=every), out, on_checkpoint=record)
        assert _metrics_without_time(out / "metrics.csv") == _metrics_without_time(
            uninterrupted / "metrics.csv"
        )
        for name in ("last.pth", "best.pth"):
            ours, reference = _weights(out / name), _weights(uninterrupted / name)
            assert all(torch.equal(ours[k], reference[k]) for k in reference), name
        assert sorted(p.name for p in out.iterdir()) == sorted(
            p.name for p in uninterrupted.iterdir()
        )
    assert [iteration for _, iteration in sent[0.0]] == [2, 4]
    assert [iteration for _, iteration in sent[1e9]] == [2]
    for names, _ in sent[0.0] + sent[1e9]:
        assert names[-1] == "resume.pt" and set(names) <= {"best.pth", "resume.pt"}
    assert sent[0.0][0][0] == ("best.pth", "resume.pt")  # the first evaluation improves


def test_a_resume_puts_back_the_best_checkpoint_its_state_vouches_for(
    work, uninterrupted, tmp_path, capsys
):
    """Killed after a later evaluation replaced best.pth (as one of a GPU's trajectories
    may, which the resumed run need not repeat), the resume starts from the best.pth that
    resume.pt knew, and ends with the reference's."""

    class Killed(Exception):
        pass

    def killed_at_the_last_evaluation(row: dict) -> None:
        if row["iteration"] == RESUME_RECIPE["iterations"]:
            raise Killed

    out = tmp_path / "run"
    config = _config(work, out, resume_every_seconds=1e9)  # one state, at iteration 2
    with pytest.raises(Killed):
        train_fold(config, on_evaluation=killed_at_the_last_evaluation)
    saved = torch.load(out / "resume.pt", weights_only=True)
    assert saved["iteration"] == 2
    kept = out / f".best-at-{saved['best']['iteration']}.pth"
    assert _weights(kept).keys() == _weights(out / "best.pth").keys()
    stranger = TransferCnn14()
    save_checkpoint(out / "best.pth", stranger, iteration=4, metadata={"genres": list(GENRES)})

    train_fold(config)
    assert "resuming from iteration 2" in capsys.readouterr().err
    ours, reference = _weights(out / "best.pth"), _weights(uninterrupted / "best.pth")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in uninterrupted.iterdir())


def test_a_fold_into_gs_uploads_in_the_background_and_its_end_waits(
    work, uninterrupted, tmp_path, emulator, monkeypatch, capsys
):
    """Through the GCS emulator: the states go up while the loop goes on, the end waits for
    them, the prefix ends with the reference's files and weights, and the log says where the
    time went and what was uploaded."""
    import uuid

    from genreflow import storage
    from genreflow.train import PhaseClock

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "genreflow-test")
    monkeypatch.setenv("GENREFLOW_CACHE", str(tmp_path / "cache"))
    bucket = f"train-{uuid.uuid4().hex[:12]}"
    storage.gcs_client().create_bucket(bucket)
    clock = PhaseClock()
    config = _config(work, f"gs://{bucket}/fold1", resume_every_seconds=0)
    train_fold(config, clock=clock)

    names = {b.name for b in storage.gcs_client().list_blobs(bucket)}
    assert names == {f"fold1/{p.name}" for p in uninterrupted.iterdir()}  # resume.pt deleted
    fetched = tmp_path / "fetched"
    storage.copy_folder(config.out, fetched)
    ours, reference = _weights(fetched / "best.pth"), _weights(uninterrupted / "best.pth")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    # At least the best.pth and resume.pt of one state (of iterations 2 and 4: an older one
    # still waiting when a newer came was dropped); resume.pt holds the model and more.
    assert clock.uploads.files >= 2 and clock.uploads.failed == 0
    assert clock.uploads.bytes > 2 * (fetched / "best.pth").stat().st_size
    assert clock.clips == RESUME_RECIPE["iterations"] * 2 * RESUME_RECIPE["batch_size"]
    phases = {"data", "steps", "evaluation", "checkpoint", "upload_wait", "other"}
    assert set(clock.shares()) == phases
    assert sum(clock.shares().values()) == pytest.approx(1.0)
    logged = capsys.readouterr().err
    assert "clips/s overall" in logged and f"uploaded {clock.uploads.files} files" in logged
