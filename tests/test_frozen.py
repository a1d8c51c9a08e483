"""The frozen-base fast path: embed once, train heads on the stored embeddings.

A randomly initialised Cnn14 costs about 0.1 s per second of audio per clip here, so the
clips are 1 s long and few; four genres with clearly different sounds (a low tone, a high
tone, noise, a pulsed tone) in four folds give the head something to learn (fold K is
tested, fold K + 1 chooses the head, the other two train it). The filtered protocol runs
on synthetic embeddings named as GTZAN's 1000 clips, since embedding that many is slow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from killable_child import start_held

from genreflow import __version__
from genreflow.audio import int16_to_float32
from genreflow.cli import main
from genreflow.data.genres import GENRE_INDEX, GENRES
from genreflow.embedding import BASE, EMBEDDINGS, PARTIAL, embed_features, read_embeddings
from genreflow.ensemble import load_head_ensemble
from genreflow.errors import GenreflowError
from genreflow.fold_result import HEAD, METRICS, METRICS_COLUMNS, PREDICTIONS, SUMMARY
from genreflow.head import fold_standardisation, train_head
from genreflow.models.transfer import TransferCnn14
from genreflow.recipe import HeadConfig
from genreflow.splits import clip_id, filtered_lists, split_sha256

SR = 32000
CLIP_SAMPLES = SR  # 1 s
USED_GENRES = ("blues", "classical", "metal", "pop")
PER_GENRE = 8
BATCH = 4
CLIPS = len(USED_GENRES) * PER_GENRE


def _clip(genre: str, number: int) -> np.ndarray:
    """One second of a sound that only its genre makes, varied per clip."""
    rng = np.random.default_rng([GENRE_INDEX[genre], number])
    t = np.arange(CLIP_SAMPLES) / SR
    level = rng.uniform(0.2, 0.5)
    if genre == "blues":
        x = np.sin(2 * np.pi * rng.uniform(90, 140) * t + rng.uniform(0, 6))
    elif genre == "classical":
        x = np.sin(2 * np.pi * rng.uniform(1500, 2000) * t)
    elif genre == "metal":
        x = np.clip(rng.standard_normal(CLIP_SAMPLES), -2.5, 2.5) / 2.5
    else:
        x = np.sin(2 * np.pi * 440 * t) * ((t * rng.uniform(3, 5)) % 1 < 0.25)
    x = level * x + 0.005 * rng.standard_normal(CLIP_SAMPLES)
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def write_features(path: Path, names: list[str], folds: dict[str, int]) -> Path:
    """A packed features.h5 as genreflow.features writes it, for the given clip names."""
    names = sorted(names)
    encoded = [name.encode() for name in names]
    target = np.zeros((len(names), len(GENRES)), np.float32)
    for row, name in enumerate(names):
        target[row, GENRE_INDEX[name.split(".")[0]]] = 1.0
    with h5py.File(path, "w") as hf:
        name_dtype = h5py.string_dtype("utf-8", max(map(len, encoded)))
        hf.create_dataset("audio_name", data=np.array(encoded, dtype=name_dtype))
        waveform = np.stack([_clip(n.split(".")[0], int(n.split(".")[1])) for n in names])
        hf.create_dataset("waveform", data=waveform, chunks=(1, CLIP_SAMPLES))
        hf.create_dataset("target", data=target)
        hf.create_dataset("fold", data=np.array([folds[n] for n in names], np.int32))
        hf.attrs.update(
            {
                "sample_rate": SR,
                "clip_samples": CLIP_SAMPLES,
                "clip_seconds": 1.0,
                "genres": list(GENRES),
                "source_sha256": "ab" * 32,
                "clips_found": len(names),
                "genreflow_version": "test-pack",
                "created": "2024-01-01T00:00:00+00:00",
            }
        )
    return path


ALL_NAMES = sorted(f"{g}.{k:05d}.wav" for g in USED_GENRES for k in range(PER_GENRE))
# Four folds of 8 clips, 2 per genre.
FOLDS = {name: row % 4 + 1 for row, name in enumerate(ALL_NAMES)}


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("pack") / "features.h5", ALL_NAMES, FOLDS)


@pytest.fixture(scope="module")
def embedded(features, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded")
    # fp32, so that what these tests compare means the same on every CPU (bf16 has its
    # own tests below).
    embed_features(features, out, batch_size=BATCH, device="cpu", precision="fp32", seed=0)
    return out


@pytest.fixture(scope="module")
def heads(embedded, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("heads")
    for fold in (1, 2):
        train_head(HeadConfig(embedded / EMBEDDINGS, fold, root / f"fold{fold}"))
    return [root / f"fold{fold}" for fold in (1, 2)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- embed -------------------------------------------------------------------------------
def test_embeddings_file_holds_every_clip_and_says_how_it_was_made(features, embedded):
    with h5py.File(embedded / EMBEDDINGS, "r") as hf, h5py.File(features, "r") as src:
        assert hf["embedding"].shape == (CLIPS, 2048)
        assert hf["embedding"].dtype == np.float32
        assert list(hf["audio_name"].asstr()[:]) == list(src["audio_name"].asstr()[:])
        np.testing.assert_array_equal(hf["target"][:], src["target"][:])
        np.testing.assert_array_equal(hf["fold"][:], src["fold"][:])
        assert hf["fold"].dtype == np.int32
        attrs = dict(hf.attrs)
        for key in ("sample_rate", "clip_samples", "clip_seconds", "source_sha256"):
            assert attrs[key] == src.attrs[key]
        assert list(attrs["genres"]) == list(GENRES)
        embedding = hf["embedding"][:]
    assert attrs["base_sha256"] == _sha256(embedded / BASE)
    assert attrs["pretrained"] == "random-init(seed=0)"
    assert attrs["genreflow_version"] == __version__
    assert attrs["features_genreflow_version"] == "test-pack"
    assert np.isfinite(embedding).all()
    # fc1 + ReLU: non-negative, and different sounds give different embeddings.
    assert (embedding >= 0).all()
    assert np.abs(embedding[0] - embedding[-1]).max() > 1e-3
    assert not (embedded / PARTIAL).exists()


def test_base_checkpoint_is_the_published_form_and_reproduces_the_embeddings(
    features, embedded, tmp_path
):
    checkpoint = torch.load(embedded / BASE, weights_only=True)
    assert set(checkpoint) == {"model"}
    assert "fc_audioset.weight" in checkpoint["model"]
    assert not any(key.startswith("base.") for key in checkpoint["model"])
    for key in ("bn0.running_mean", "conv_block6.conv2.weight", "fc1.weight"):
        assert key in checkpoint["model"]

    # It loads back as a pretrained base (embed_features calls load_pretrained) and makes
    # the same embeddings: embed a few of the clips again from base.pth.
    some = ALL_NAMES[::6]
    small = write_features(tmp_path / "small.h5", some, FOLDS)
    summary = embed_features(
        small, tmp_path / "again", pretrained=str(embedded / BASE), precision="fp32"
    )
    assert summary["pretrained"] == str(embedded / BASE)
    assert summary["base_sha256"] == _sha256(embedded / BASE)
    again = read_embeddings(tmp_path / "again" / EMBEDDINGS)
    first = read_embeddings(embedded / EMBEDDINGS)
    rows = [first.names.index(name) for name in again.names]
    np.testing.assert_allclose(again.embedding, first.embedding[rows], rtol=1e-5, atol=1e-6)


def test_fp32_embed_is_the_bases_own_forward_unchanged(features, tmp_path):
    # precision fp32 must give exactly what the base computes on its own (eval mode, fp32,
    # no autocast): the numbers the embed step gave before bf16 existed.
    from genreflow.models.checkpoints import load_pretrained
    from genreflow.models.cnn14 import Cnn14
    from genreflow.runtime import cpu_threads, torch_threads

    out = tmp_path / "fp32"
    summary = embed_features(features, out, batch_size=BATCH, device="cpu", precision="fp32")
    assert summary["precision"] == "fp32"
    base = Cnn14()
    load_pretrained(base, out / BASE)
    base.eval()
    with h5py.File(features, "r") as hf:
        waveform = int16_to_float32(hf["waveform"][:])
    with torch_threads(cpu_threads()), torch.inference_mode():
        expected = np.concatenate(
            [
                base(torch.from_numpy(waveform[start : start + BATCH]))["embedding"].numpy()
                for start in range(0, CLIPS, BATCH)
            ]
        )
    embeddings = read_embeddings(out / EMBEDDINGS)
    assert embeddings.attrs["precision"] == "fp32"
    np.testing.assert_array_equal(embeddings.embedding, expected)


# bf16 keeps 8 bits of mantissa: measured on these clips with a random-init Cnn14, each
# embedding's cosine similarity with its fp32 one is above 0.9999 and its relative error
# below 1%; the bounds leave room for other CPUs' kernels.
BF16_MIN_COSINE, BF16_MAX_RELATIVE_ERROR = 0.9995, 0.02


def test_bf16_embeddings_are_within_tolerance_of_fp32(features, tmp_path):
    fp32 = embed_features(features, tmp_path / "fp32", batch_size=BATCH, precision="fp32")
    bf16 = embed_features(features, tmp_path / "bf16", batch_size=BATCH, precision="bf16")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["base_sha256"] == bf16["base_sha256"]  # the same base, another precision
    exact = read_embeddings(tmp_path / "fp32" / EMBEDDINGS).embedding.astype(np.float64)
    rounded = read_embeddings(tmp_path / "bf16" / EMBEDDINGS).embedding.astype(np.float64)
    assert read_embeddings(tmp_path / "bf16" / EMBEDDINGS).attrs["precision"] == "bf16"
    norms = np.linalg.norm(exact, axis=1)
    cosine = np.sum(exact * rounded, axis=1) / (norms * np.linalg.norm(rounded, axis=1))
    relative_error = np.linalg.norm(rounded - exact, axis=1) / norms
    assert cosine.min() >= BF16_MIN_COSINE, cosine.min()
    assert relative_error.max() <= BF16_MAX_RELATIVE_ERROR, relative_error.max()
    assert not np.array_equal(exact, rounded)  # bf16 did compute in bf16
    # What tells clips apart survives: each clip's bf16 embedding is nearest to its own
    # fp32 one.
    distances = np.linalg.norm(rounded[:, None, :] - exact[None, :, :], axis=2)
    np.testing.assert_array_equal(distances.argmin(axis=1), np.arange(CLIPS))


def test_compiled_bf16_embed_is_within_the_same_tolerance(features, tmp_path):
    # torch.compile (what auto picks on a CPU for hours of audio), forced on 6 clips in
    # batches of 4: one compile, the short last batch padded, the rows its own.
    six = write_features(tmp_path / "six.h5", ALL_NAMES[::5][:6], FOLDS)
    fp32 = embed_features(six, tmp_path / "fp32", batch_size=BATCH, precision="fp32")
    assert fp32["compiled"] is False
    code = [
        "embed-features", "--features", str(six), "--out", str(tmp_path / "compiled"),
        "--batch-size", str(BATCH), "--precision", "bf16", "--compile", "on",
    ]  # fmt: skip
    assert main(code) == 0
    exact = read_embeddings(tmp_path / "fp32" / EMBEDDINGS).embedding.astype(np.float64)
    compiled = read_embeddings(tmp_path / "compiled" / EMBEDDINGS).embedding.astype(np.float64)
    norms = np.linalg.norm(exact, axis=1)
    cosine = np.sum(exact * compiled, axis=1) / (norms * np.linalg.norm(compiled, axis=1))
    assert cosine.min() >= BF16_MIN_COSINE, cosine.min()
    assert (np.linalg.norm(compiled - exact, axis=1) / norms).max() <= BF16_MAX_RELATIVE_ERROR


def test_embed_refuses_a_finished_file_of_another_precision(features, tmp_path):
    two = write_features(tmp_path / "two.h5", ALL_NAMES[:2], FOLDS)
    embed_features(two, tmp_path / "out", batch_size=BATCH, precision="fp32")
    with pytest.raises(GenreflowError, match="precision"):
        embed_features(two, tmp_path / "out", batch_size=BATCH, precision="bf16")
    with pytest.raises(GenreflowError, match="--precision must be one of"):
        embed_features(two, tmp_path / "other", precision="fp16")
    with pytest.raises(GenreflowError, match="--compile must be one of"):
        embed_features(two, tmp_path / "other", compile_base="yes")


def test_killed_embed_resumes_and_ends_where_an_uninterrupted_run_does(embedded, tmp_path):
    # The first 20 clips: the same rows in the same batches as the fixture's first 20.
    first_clips = write_features(tmp_path / "first.h5", ALL_NAMES[:20], FOLDS)
    out = tmp_path / "killed"
    code = (
        "from genreflow.embedding import embed_features; "
        f"embed_features({str(first_clips)!r}, {str(out)!r}, batch_size={BATCH}, "
        "device='cpu', precision='fp32')"
    )
    # The child holds once its second batch is on disk, until the kill: killed after a
    # poll instead, a busy machine sometimes let it write more, or finish.
    log = tmp_path / "killed.log"
    with log.open("w") as stderr:
        process = start_held(
            "genreflow.embedding:write_atomic",
            ["-c", code],
            calls=2,
            named="rows_*.npy",
            stdout=stderr,
            stderr=stderr,
        )
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()
    done = len(list((out / PARTIAL).glob("rows_*.npy")))
    assert done == 2
    assert not (out / EMBEDDINGS).exists()

    summary = embed_features(first_clips, out, batch_size=BATCH, device="cpu", precision="fp32")
    assert done * BATCH <= summary["resumed_from"] < 20
    assert summary["base_sha256"] == _sha256(embedded / BASE)
    assert not (out / PARTIAL).exists()
    # The same seed in another process gives the same base, and the resumed run the same
    # numbers as the uninterrupted one.
    np.testing.assert_array_equal(
        read_embeddings(out / EMBEDDINGS).embedding,
        read_embeddings(embedded / EMBEDDINGS).embedding[:20],
    )


def test_rerun_of_a_finished_embed_does_nothing(features, embedded, capsys):
    before = (embedded / EMBEDDINGS).stat().st_mtime_ns, (embedded / BASE).stat().st_mtime_ns
    summary = embed_features(features, embedded, batch_size=BATCH, precision="fp32")
    assert summary["already_done"] is True
    assert "nothing to do" in capsys.readouterr().err
    after = (embedded / EMBEDDINGS).stat().st_mtime_ns, (embedded / BASE).stat().st_mtime_ns
    assert after == before
    # The command says the same and exits 0.
    command = ["embed-features", "--features", str(features), "--out", str(embedded)]
    assert main([*command, "--precision", "fp32"]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_embed_discards_a_partial_run_of_other_inputs_and_stale_temporaries(tmp_path, capsys):
    two = write_features(tmp_path / "two.h5", ALL_NAMES[:2], FOLDS)
    out = tmp_path / "out"
    (out / PARTIAL).mkdir(parents=True)
    manifest = {"features_fingerprint": "0" * 64, "pretrained": "random-init(seed=0)"}
    (out / PARTIAL / "manifest.json").write_text(json.dumps(manifest))
    np.save(out / PARTIAL / "rows_00000000.npy", np.zeros((2, 2048), np.float32))
    (out / f".{BASE}.abc123.tmp").write_bytes(b"half a checkpoint")
    summary = embed_features(two, out, batch_size=BATCH, device="cpu")
    assert "discarding" in capsys.readouterr().err
    assert summary["resumed_from"] == 0
    assert not (out / f".{BASE}.abc123.tmp").exists()
    assert read_embeddings(out / EMBEDDINGS).embedding.any()


def test_embed_refuses_to_mix_outputs_of_another_base(features, embedded):
    with pytest.raises(GenreflowError, match="pretrained"):
        embed_features(features, embedded, seed=1, device="cpu", precision="fp32")


def test_embed_bad_inputs_are_clear_errors(tmp_path, features):
    with pytest.raises(GenreflowError, match="not found"):
        embed_features(tmp_path / "missing.h5", tmp_path / "out")
    other_rate = tmp_path / "rate.h5"
    write_features(other_rate, ALL_NAMES[:2], FOLDS)
    with h5py.File(other_rate, "a") as hf:
        hf.attrs["sample_rate"] = 16000
    with pytest.raises(GenreflowError, match="16000 Hz"):
        embed_features(other_rate, tmp_path / "out")
    with pytest.raises(GenreflowError, match="batch size"):
        embed_features(features, tmp_path / "out", batch_size=0)


# --- the head ----------------------------------------------------------------------------
def _read_predictions(path: Path) -> tuple[list[dict], np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, np.array([[float(row[g]) for g in GENRES] for row in rows])


def test_head_learns_and_writes_the_training_steps_formats(embedded, heads):
    data = read_embeddings(embedded / EMBEDDINGS)
    for fold, out in zip((1, 2), heads, strict=True):
        summary = json.loads((out / SUMMARY).read_text())
        assert summary["fold"] == fold
        assert summary["path"] == "frozen-base"
        # Four genres: chance is 0.25.
        assert summary["final_accuracy"] >= 0.8
        assert summary["n_train"] == CLIPS // 2
        assert summary["n_test"] == CLIPS // 4
        for key in ("iterations", "peak_test_accuracy", "peak_test_iteration", "wall_seconds"):
            assert key in summary
        assert summary["base_sha256"] == _sha256(embedded / BASE)
        assert summary["protocol"] == "cv10" and summary["selection"] == "validation"
        assert summary["split"]["valid"] == CLIPS // 4 and summary["split"]["excluded"] == 0
        assert summary["split_sha256"] == split_sha256("cv10")
        assert summary["data_sha256"] == "ab" * 32  # the packed file's source_sha256
        assert summary["seeds"] == {"config": 0, "sampler": 0}

        with (out / METRICS).open(newline="") as f:
            metrics = list(csv.DictReader(f))
        assert (
            tuple(metrics[0])
            == METRICS_COLUMNS
            == (
                "iteration",
                "train_loss",
                "valid_accuracy",
                "test_accuracy",
                "seconds",
            )
        )
        assert int(metrics[-1]["iteration"]) == summary["iterations"]
        # Reported: the head chosen on validation (the first best), on the test fold.
        valid = [float(row["valid_accuracy"]) for row in metrics]
        chosen = metrics[int(np.argmax(valid))]
        assert summary["selected_iteration"] == int(chosen["iteration"])
        assert summary["valid_accuracy"] == max(valid)
        assert float(chosen["test_accuracy"]) == summary["final_accuracy"]
        assert summary["peak_test_accuracy"] == max(float(row["test_accuracy"]) for row in metrics)
        # Training loss falls.
        assert float(metrics[-1]["train_loss"]) < float(metrics[0]["train_loss"])

        rows, probabilities = _read_predictions(out / PREDICTIONS)
        with (out / PREDICTIONS).open() as f:
            assert f.readline().strip().split(",") == ["audio_name", "fold", "genre", *GENRES]
        expected = [name for name, k in zip(data.names, data.folds, strict=True) if k == fold]
        assert [row["audio_name"] for row in rows] == expected
        assert {row["fold"] for row in rows} == {str(fold)}
        assert [row["genre"] for row in rows] == [name.split(".")[0] for name in expected]
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
        accuracy = np.mean(
            [GENRES[p.argmax()] == row["genre"] for p, row in zip(probabilities, rows, strict=True)]
        )
        assert accuracy == summary["final_accuracy"]


def test_saved_head_applied_to_raw_embeddings_gives_the_evaluated_predictions(embedded, heads):
    data = read_embeddings(embedded / EMBEDDINGS)
    for fold, out in zip((1, 2), heads, strict=True):
        checkpoint = torch.load(out / HEAD, weights_only=True)
        assert set(checkpoint["model"]) == {"fc_transfer.weight", "fc_transfer.bias"}
        summary = json.loads((out / SUMMARY).read_text())
        assert checkpoint["iteration"] == summary["selected_iteration"]
        meta = checkpoint["genreflow"]
        assert meta["fold"] == fold
        assert meta["genres"] == list(GENRES)
        assert meta["base_sha256"] == _sha256(embedded / BASE)
        assert meta["recipe"]["loss"] == "clip_nll"

        # The head fits the transfer model as the seed's fc_transfer does.
        model = TransferCnn14()
        model.fc_transfer.load_state_dict(
            {k.removeprefix("fc_transfer."): v for k, v in checkpoint["model"].items()}
        )
        raw = torch.from_numpy(data.embedding[data.folds == fold])
        with torch.no_grad():
            probabilities = model.head_forward(raw).exp().double().numpy()
        _, evaluated = _read_predictions(out / PREDICTIONS)
        np.testing.assert_allclose(probabilities, evaluated, atol=2e-5)


def test_folding_the_standardisation_is_exact():
    rng = np.random.default_rng(0)
    x = rng.gamma(1.0, rng.uniform(0.01, 100, size=16), size=(50, 16))
    mean, scale = x.mean(axis=0), x.std(axis=0)
    weight, bias = rng.standard_normal((10, 16)), rng.standard_normal(10)
    folded_weight, folded_bias = fold_standardisation(weight, bias, mean, scale)
    np.testing.assert_allclose(
        x @ folded_weight.T + folded_bias, ((x - mean) / scale) @ weight.T + bias, atol=1e-9
    )


def write_embeddings(
    path: Path, embedding, genre_index, folds, base_sha256="00" * 32, names=None
) -> Path:
    if names is None:
        names = [f"{GENRES[g]}.{i:05d}.wav" for i, g in enumerate(genre_index)]
    names = [name.encode() for name in names]
    with h5py.File(path, "w") as hf:
        hf.create_dataset("audio_name", data=np.array(names))
        hf.create_dataset("embedding", data=np.asarray(embedding, np.float32))
        hf.create_dataset("target", data=np.eye(len(GENRES), dtype=np.float32)[genre_index])
        hf.create_dataset("fold", data=np.asarray(folds, np.int32))
        hf.attrs.update(
            {"genres": list(GENRES), "base_sha256": base_sha256, "pretrained": "synthetic"}
        )
    return path


def test_head_copes_with_dead_and_badly_scaled_dimensions(tmp_path):
    # Ten classes as clusters; dimensions scaled over six orders of magnitude, and a
    # block of dimensions that are zero on the training folds (ReLUs that never fire)
    # but not on the held-out fold.
    rng = np.random.default_rng(1)
    genre_index = np.repeat(np.arange(10), 30)
    centres = rng.standard_normal((10, 64))
    x = centres[genre_index] + 0.7 * rng.standard_normal((300, 64))
    x = np.maximum(x, 0) * np.logspace(-3, 3, 64)
    folds = np.arange(300) % 10 + 1
    x[:, :8] = np.where(folds[:, None] == 3, rng.uniform(0, 5, (300, 8)), 0.0)
    path = write_embeddings(tmp_path / "e.h5", x, genre_index, folds)
    summary = train_head(HeadConfig(path, 3, tmp_path / "head"))
    assert summary["final_accuracy"] >= 0.8  # chance: 0.1
    weight = torch.load(tmp_path / "head" / HEAD, weights_only=True)["model"]
    assert torch.all(weight["fc_transfer.weight"][:, :8] == 0)


def test_head_training_is_deterministic_for_a_seed(embedded, tmp_path):
    def run(seed: int, name: str) -> dict:
        config = HeadConfig(
            embedded / EMBEDDINGS, 1, tmp_path / name,
            iterations=40, batch_size=8, mixup=True, eval_every=20, seed=seed,
        )  # fmt: skip
        train_head(config)
        return torch.load(tmp_path / name / HEAD, weights_only=True)["model"]

    first, second, other = run(0, "a"), run(0, "b"), run(1, "c")
    for key in first:
        assert torch.equal(first[key], second[key])
    assert (tmp_path / "a" / PREDICTIONS).read_text() == (tmp_path / "b" / PREDICTIONS).read_text()
    assert _metrics_without_time(tmp_path / "a") == _metrics_without_time(tmp_path / "b")
    assert not torch.equal(first["fc_transfer.weight"], other["fc_transfer.weight"])
    assert (tmp_path / "a" / PREDICTIONS).read_text() != (tmp_path / "c" / PREDICTIONS).read_text()
    assert _metrics_without_time(tmp_path / "a") != _metrics_without_time(tmp_path / "c")


def _metrics_without_time(out: Path) -> list[dict]:
    with (out / METRICS).open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert float(row.pop("seconds")) >= 0
    return rows


# Every GTZAN clip name, sorted, with the seed's folds; a cluster per genre, 64 dimensions.
GTZAN_NAMES = sorted(f"{genre}.{k:05d}.wav" for genre in GENRES for k in range(100))


def _gtzan_shaped_embeddings(path: Path) -> Path:
    rng = np.random.default_rng(3)
    genre_index = np.array([GENRES.index(name.split(".")[0]) for name in GTZAN_NAMES])
    x = rng.standard_normal((10, 64))[genre_index] + 1.5 * rng.standard_normal((1000, 64))
    folds = np.arange(1000) % 10 + 1
    return write_embeddings(path, np.maximum(x, 0), genre_index, folds, names=GTZAN_NAMES)


@pytest.fixture(scope="module")
def gtzan_shaped(tmp_path_factory) -> Path:
    return _gtzan_shaped_embeddings(tmp_path_factory.mktemp("gtzan") / "embeddings.h5")


FILTERED_RUN = {"protocol": "filtered", "iterations": 60, "eval_every": 10, "batch_size": 32}


def test_head_on_the_filtered_split_trains_chooses_and_reports_on_its_lists(gtzan_shaped, tmp_path):
    summary = train_head(HeadConfig(gtzan_shaped, 1, tmp_path / "r1", **FILTERED_RUN))
    lists = filtered_lists()
    split = summary["split"]
    assert [split[k] for k in ("train", "valid", "test", "excluded", "missing")] == [
        443,
        197,
        290,
        70,
        0,
    ]
    assert "classical.00042.wav" in split["excluded_names"] and split["missing_names"] == []
    assert summary["n_train"] == 443 and summary["n_test"] == 290
    assert summary["protocol"] == "filtered" and summary["selection"] == "validation"
    assert summary["split_sha256"] == split_sha256("filtered")
    assert summary["data_sha256"] == ""  # these embeddings record no source checksum
    assert summary["final_accuracy"] >= 0.5  # chance: 0.1

    rows, _ = _read_predictions(tmp_path / "r1" / PREDICTIONS)
    assert [clip_id(row["audio_name"]) for row in rows] == sorted(lists["test"])
    assert {row["fold"] for row in rows} == {"1"}
    with (tmp_path / "r1" / METRICS).open(newline="") as f:
        metrics = list(csv.DictReader(f))
    valid = [float(row["valid_accuracy"]) for row in metrics]
    chosen = metrics[int(np.argmax(valid))]
    assert summary["selected_iteration"] == int(chosen["iteration"])
    assert summary["final_accuracy"] == float(chosen["test_accuracy"])
    assert torch.load(tmp_path / "r1" / HEAD, weights_only=True)["iteration"] == int(
        chosen["iteration"]
    )

    # Repetition 2 is repetition 1 with the next seed: the same numbers; seed 0's differ.
    train_head(HeadConfig(gtzan_shaped, 2, tmp_path / "r2", **FILTERED_RUN))
    train_head(HeadConfig(gtzan_shaped, 1, tmp_path / "seed1", **FILTERED_RUN, seed=1))
    assert _metrics_without_time(tmp_path / "r2") == _metrics_without_time(tmp_path / "seed1")
    r2, r2_probabilities = _read_predictions(tmp_path / "r2" / PREDICTIONS)
    _, seed1_probabilities = _read_predictions(tmp_path / "seed1" / PREDICTIONS)
    assert {row["fold"] for row in r2} == {"2"}
    np.testing.assert_array_equal(r2_probabilities, seed1_probabilities)
    assert _metrics_without_time(tmp_path / "r1") != _metrics_without_time(tmp_path / "r2")


def test_no_test_clip_takes_part_in_choosing_the_head(gtzan_shaped, tmp_path):
    """Test-list embeddings and labels replaced: the same training, the same choice, the
    same head; only the test figures move."""
    altered = tmp_path / "altered.h5"
    altered.write_bytes(gtzan_shaped.read_bytes())
    test = sorted(_rows_of(filtered_lists()["test"]))
    with h5py.File(altered, "a") as hf:
        hf["embedding"][test] = np.random.default_rng(9).random((len(test), 64)) * 5
        hf["target"][test] = np.roll(hf["target"][test], 1, axis=1)
    first = train_head(HeadConfig(gtzan_shaped, 1, tmp_path / "a", **FILTERED_RUN))
    second = train_head(HeadConfig(altered, 1, tmp_path / "b", **FILTERED_RUN))
    assert first["selected_iteration"] == second["selected_iteration"]
    assert first["valid_accuracy"] == second["valid_accuracy"]
    assert first["final_accuracy"] != second["final_accuracy"]

    def chosen_by(out: Path) -> list[tuple[str, str, str]]:
        return [
            (r["iteration"], r["train_loss"], r["valid_accuracy"])
            for r in _metrics_without_time(out)
        ]

    assert chosen_by(tmp_path / "a") == chosen_by(tmp_path / "b")
    heads = [torch.load(tmp_path / name / HEAD, weights_only=True)["model"] for name in "ab"]
    for key in heads[0]:
        assert torch.equal(heads[0][key], heads[1][key])


def _rows_of(names) -> list[int]:
    row_of = {clip_id(name): row for row, name in enumerate(GTZAN_NAMES)}
    return [row_of[name] for name in names]


def test_heldout_selection_chooses_on_the_test_rows(gtzan_shaped, tmp_path):
    summary = train_head(
        HeadConfig(gtzan_shaped, 1, tmp_path / "h", **FILTERED_RUN, selection="heldout")
    )
    assert summary["selection"] == "heldout" and summary["split"]["valid"] == 290
    metrics = _metrics_without_time(tmp_path / "h")
    assert all(row["valid_accuracy"] == row["test_accuracy"] for row in metrics)
    # Chosen on the test rows, the reported figure is the best one seen: optimistic.
    assert summary["final_accuracy"] == summary["peak_test_accuracy"]


def test_head_bad_inputs_are_clear_errors(embedded, tmp_path):
    with pytest.raises(
        GenreflowError, match=r"cv10: fold 5 has no clips in .*\(folds present: 1, 2, 3, 4\)"
    ):
        train_head(HeadConfig(embedded / EMBEDDINGS, 5, tmp_path / "out"))
    with pytest.raises(GenreflowError, match="validation fold 5 .*after test fold 4"):
        train_head(HeadConfig(embedded / EMBEDDINGS, 4, tmp_path / "out"))
    with pytest.raises(GenreflowError, match="cv10: --fold must be one of 1..10"):
        train_head(HeadConfig(embedded / EMBEDDINGS, 0, tmp_path / "out"))
    with pytest.raises(GenreflowError, match="--protocol must be one of cv10, filtered"):
        train_head(HeadConfig(embedded / EMBEDDINGS, 1, tmp_path / "out", protocol="kfold"))
    with pytest.raises(GenreflowError, match="--selection must be one of validation, heldout"):
        train_head(HeadConfig(embedded / EMBEDDINGS, 1, tmp_path / "out", selection="best"))
    with pytest.raises(GenreflowError, match="not found"):
        train_head(HeadConfig(tmp_path / "missing.h5", 1, tmp_path / "out"))
    with pytest.raises(GenreflowError, match="iterations"):
        train_head(HeadConfig(embedded / EMBEDDINGS, 1, tmp_path / "out", iterations=0))
    not_ours = tmp_path / "other.h5"
    with h5py.File(not_ours, "w") as hf:
        hf.create_dataset("embedding", data=np.zeros((2, 4), np.float32))
    with pytest.raises(GenreflowError, match="missing dataset 'audio_name'"):
        train_head(HeadConfig(not_ours, 1, tmp_path / "out"))


def test_train_head_command(embedded, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train-head", "--embeddings", str(embedded / EMBEDDINGS), "--fold", "2"]
    assert main([*argv, "--out", str(out), "--iterations", "30", "--eval-every", "10"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / SUMMARY).read_text())
    assert printed["iterations"] == 30
    assert printed["config"]["lr"] == 1e-3  # left out: the recipe's default
    assert printed["protocol"] == "cv10" and printed["selection"] == "validation"
    assert main([*argv, "--out", str(out), "--iterations", "0"]) == 2
    assert main([*argv, "--out", str(out), "--iterations", "30", "--selection", "heldout"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"] == "heldout"


# --- the ensemble ------------------------------------------------------------------------
def test_ensemble_averages_the_heads_probabilities(features, embedded, heads):
    ensemble = load_head_ensemble(embedded / BASE, [out / HEAD for out in heads])
    rows = [0, 7, 20, 31]
    with h5py.File(features, "r") as hf:
        waveform = torch.from_numpy(int16_to_float32(hf["waveform"][rows]))
    with torch.inference_mode():
        probabilities = ensemble(waveform).double().numpy()
    assert probabilities.shape == (len(rows), len(GENRES))

    stored = read_embeddings(embedded / EMBEDDINGS).embedding[rows].astype(np.float64)
    per_head = []
    for out in heads:
        state = torch.load(out / HEAD, weights_only=True)["model"]
        logits = stored @ state["fc_transfer.weight"].double().numpy().T
        logits += state["fc_transfer.bias"].double().numpy()
        per_head.append(torch.softmax(torch.from_numpy(logits), dim=-1).numpy())
    np.testing.assert_allclose(probabilities, np.mean(per_head, axis=0), atol=2e-5)
    # Asking for training mode changes nothing: inference only.
    ensemble.train()
    assert not ensemble.base.training


def test_ensemble_refuses_a_head_of_another_base(embedded, heads, tmp_path):
    genre_index = np.arange(40) % 10
    path = write_embeddings(
        tmp_path / "e.h5", np.random.default_rng(0).random((40, 2048)), genre_index,
        np.arange(40) % 3 + 1, base_sha256="ff" * 32,
    )  # fmt: skip
    train_head(HeadConfig(path, 1, tmp_path / "foreign", iterations=5, eval_every=5))
    with pytest.raises(GenreflowError, match="trained on embeddings of the base"):
        load_head_ensemble(embedded / BASE, [heads[0] / HEAD, tmp_path / "foreign" / HEAD])
    with pytest.raises(GenreflowError, match="no head"):
        load_head_ensemble(embedded / BASE, [])


def test_exported_fold_model_is_the_base_and_the_head_in_the_seeds_form(embedded, heads, tmp_path):
    from genreflow.ensemble import export_transfer_checkpoint
    from genreflow.models.checkpoints import load_transfer_model

    path = export_transfer_checkpoint(embedded / BASE, heads[0] / HEAD, tmp_path / "fold1.pth")
    checkpoint = torch.load(path, weights_only=True)
    assert {"iteration", "model", "genreflow"} <= set(checkpoint)
    assert all(k.startswith(("base.", "fc_transfer.")) for k in checkpoint["model"])
    model, metadata = load_transfer_model(path)
    assert metadata["fold"] == 1 and metadata["path"] == "frozen-base"
    data = read_embeddings(embedded / EMBEDDINGS)
    with torch.no_grad():
        probabilities = model.head_forward(torch.from_numpy(data.embedding[data.folds == 1]))
    _, evaluated = _read_predictions(heads[0] / PREDICTIONS)
    np.testing.assert_allclose(probabilities.exp().double().numpy(), evaluated, atol=2e-5)


def test_train_head_help_states_the_recipes_defaults(capsys):
    from genreflow.head import DEFAULT_RECIPE

    with pytest.raises(SystemExit):
        main(["train-head", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{DEFAULT_RECIPE['iterations']} full-batch steps" in text
    assert DEFAULT_RECIPE["batch_size"] == 0
    assert f"lr {DEFAULT_RECIPE['lr']}," in text
    assert f"weight decay {DEFAULT_RECIPE['weight_decay']}," in text
    assert ("no mixup" in text) is (not DEFAULT_RECIPE["mixup"])
    assert f"alpha {DEFAULT_RECIPE['mixup_alpha']}" in text
    assert f"every {DEFAULT_RECIPE['eval_every']} steps" in text
    assert f"seed {DEFAULT_RECIPE['seed']}." in text
