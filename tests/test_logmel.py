"""Log-mel packing (`pack --representation logmel`): the file it writes, and the numbers
it gives beside the waveform file packed from the same tree: embeddings, a training
step with the same seed and batch, and a whole fold.

Cnn14's front end is frozen and SpecAugment and mixup act after it, so the log-mel path
must compute exactly what the waveform path computes from the same log-mel; what is left
is float16's rounding of the stored log-mel, measured here against the rounding the
seed's own int16 waveforms already bring.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from genreflow.audio import SAMPLE_RATE, clip_samples
from genreflow.cli import main
from genreflow.data.download import download
from genreflow.data.genres import GENRES
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.embedding import EMBEDDINGS, embed_features, read_embeddings
from genreflow.errors import GenreflowError
from genreflow.features import RowLayout, model_input, pack, read_index
from genreflow.logmel import LogmelFrontEnd, logmel_frames
from genreflow.models.transfer import TransferCnn14
from genreflow.recipe import TrainConfig
from genreflow.runtime import autocast_for
from genreflow.train import make_optimizer, train_fold, training_step

CLIP_SECONDS = 2.0
FRAMES = logmel_frames(clip_samples(CLIP_SECONDS))  # 201
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logmel")
    archive, sha256 = make_synthetic_gtzan(root / "synth", clips_per_genre=2, seconds=CLIP_SECONDS)
    return download(archive, root / "data", sha256=sha256, progress=False)


@pytest.fixture(scope="module")
def packed(dataset, tmp_path_factory) -> dict[str, Path]:
    """The same tree packed both ways; the log-mel by worker processes (one torch thread
    each), the waveform in this process."""
    root = tmp_path_factory.mktemp("packed")
    pack(dataset, root / "waveform.h5", clip_seconds=CLIP_SECONDS, workers=1, progress=False)
    pack(
        dataset,
        root / "logmel.h5",
        clip_seconds=CLIP_SECONDS,
        representation="logmel",
        workers=2,
        progress=False,
    )
    return {"waveform": root / "waveform.h5", "logmel": root / "logmel.h5"}


def rows_of(path: Path, rows) -> np.ndarray:
    with h5py.File(path, "r") as hf:
        return hf[read_index(path)[3]["representation"]][rows]


def test_logmel_file_holds_the_front_end_output_of_the_packed_waveform(packed):
    with h5py.File(packed["logmel"], "r") as hf:
        assert set(hf) == {"audio_name", "logmel", "target", "fold", "skipped"}
        assert hf["logmel"].dtype == np.float16
        assert hf["logmel"].shape == (20, FRAMES, 64)
        assert hf["logmel"].chunks == (1, FRAMES, 64)
        assert hf.attrs["representation"] == "logmel"
        assert json.loads(hf.attrs["front_end"]) == LogmelFrontEnd().front_end_config
    with h5py.File(packed["waveform"], "r") as hf:
        assert hf.attrs["representation"] == "waveform" and "front_end" not in hf.attrs

    names_w, targets_w, folds_w, attrs_w = read_index(packed["waveform"])
    names_l, targets_l, folds_l, attrs_l = read_index(packed["logmel"])
    np.testing.assert_array_equal(names_l, names_w)
    np.testing.assert_array_equal(targets_l, targets_w)
    np.testing.assert_array_equal(folds_l, folds_w)
    assert attrs_l["clip_samples"] == attrs_w["clip_samples"] == clip_samples(CLIP_SECONDS)

    # Each row is the front end's output for the stored int16 waveform, read as training
    # reads it, rounded to float16: within half a float16 step (a step here, since the
    # workers' single-threaded STFT may sum in another order than this process).
    with torch.inference_mode():
        reference = LogmelFrontEnd()(model_input("waveform", rows_of(packed["waveform"], ...), CPU))
    reference = reference[:, 0].numpy()
    stored = rows_of(packed["logmel"], ...).astype(np.float32)
    step = np.spacing(np.abs(reference).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(stored - reference) <= step)
    assert np.abs(stored - reference).max() > 0  # float16 did round


def test_bytes_per_clip_both_ways():
    # A 30 s clip: 960000 int16 samples, or 3001 frames x 64 mel bins of float16.
    waveform = RowLayout.of("waveform", clip_samples(30.0))
    logmel = RowLayout.of("logmel", clip_samples(30.0))
    assert waveform.nbytes == 1_920_000
    assert logmel.shape == (3001, 64) and logmel.nbytes == 384_128


def test_embeddings_from_logmel_equal_those_from_waveforms(packed, tmp_path):
    # fp32 on both sides: what differs is the float16 log-mel, not the autocast's rounding.
    made = {
        kind: embed_features(path, tmp_path / kind, seed=0, precision="fp32")
        for kind, path in packed.items()
    }
    assert made["waveform"]["base_sha256"] == made["logmel"]["base_sha256"]
    waveform = read_embeddings(tmp_path / "waveform" / EMBEDDINGS)
    logmel = read_embeddings(tmp_path / "logmel" / EMBEDDINGS)
    assert waveform.names == logmel.names
    np.testing.assert_array_equal(waveform.folds, logmel.folds)
    assert logmel.attrs["representation"] == "logmel"
    # Measured: 6e-6 of the largest embedding value; float16 rounds the log-mel to 5e-4.
    scale = np.abs(waveform.embedding).max()
    np.testing.assert_allclose(logmel.embedding, waveform.embedding, rtol=0, atol=1e-4 * scale)


def _step(model, clips: torch.Tensor, precision: str = "fp32"):
    """One training step of the seed's recipe (mixup on two pairs) from `model`'s weights,
    with the same seed for SpecAugment and dropout; (loss, every gradient as one vector)."""
    model = copy.deepcopy(model).train()
    optimizer = make_optimizer(model, 1e-4)
    target = torch.eye(len(GENRES))[[0, 3, 5, 9]]
    lam = torch.tensor([0.3, 0.7, 0.6, 0.4])
    torch.manual_seed(5)
    loss = training_step(model, optimizer, clips, target, lam, autocast_for(CPU, precision))
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    return loss.item(), torch.cat(grads)


def test_training_step_on_logmel_is_the_waveform_step_up_to_float16_rounding(packed):
    torch.manual_seed(0)
    model = TransferCnn14()
    rows = [0, 7, 12, 19]
    waveform = model_input("waveform", rows_of(packed["waveform"], rows), CPU)
    logmel = model_input("logmel", rows_of(packed["logmel"], rows), CPU)
    with torch.no_grad():
        computed = model.base.logmel(waveform)

    loss_w, grad_w = _step(model, waveform)
    # The split is clean: the front end's own output fed in gives the same step, bit for bit.
    loss, grad = _step(model, computed)
    assert loss == loss_w and torch.equal(grad, grad_w)
    # The packed log-mel gives the step of the float16-rounded log-mel, bit for bit (the
    # worker's STFT may differ in a last float32 bit, which float16 rounding absorbs).
    loss_l, grad_l = _step(model, logmel)
    loss_16, grad_16 = _step(model, computed.half().float())
    assert loss_l == loss_16 and torch.equal(grad_l, grad_16)

    # What float16 changes, against what the seed's int16 storage already changes: the
    # same step on the waveform moved by up to half an int16 step (its rounding error).
    noise = torch.rand(waveform.shape, generator=torch.Generator().manual_seed(1)) - 0.5
    loss_q, grad_q = _step(model, waveform + noise / 32767)
    relative = float((grad_l - grad_w).norm() / grad_w.norm())
    relative_int16 = float((grad_q - grad_w).norm() / grad_w.norm())
    assert abs(loss_l - loss_w) / abs(loss_w) < 1e-3  # measured 9e-5
    assert relative < relative_int16  # measured 0.06 against 0.31


def _fold_config(features: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        features=str(features),
        fold=1,
        out=str(out),
        device="cpu",
        freeze_base=True,
        iterations=2,
        batch_size=2,
        eval_every=2,
        precision="fp32",
    )


def _probabilities(out: Path) -> np.ndarray:
    with open(out / "predictions.csv") as f:
        return np.array([[float(row[g]) for g in GENRES] for row in csv.DictReader(f)])


def test_a_fold_trains_to_the_same_result_from_either(packed, tmp_path):
    summaries = {
        kind: train_fold(_fold_config(path, tmp_path / kind)) for kind, path in packed.items()
    }
    assert summaries["logmel"]["features"]["representation"] == "logmel"
    assert summaries["waveform"]["features"]["representation"] == "waveform"
    assert summaries["logmel"]["final_accuracy"] == summaries["waveform"]["final_accuracy"]
    np.testing.assert_allclose(
        _probabilities(tmp_path / "logmel"), _probabilities(tmp_path / "waveform"), atol=1e-3
    )


def _copy_with(src: Path, dst: Path, change) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as hf:
        change(hf)
    return dst


def test_readers_refuse_a_file_that_is_not_what_it_says(packed, tmp_path):
    def drop_logmel(hf):
        del hf["logmel"]

    def unknown(hf):
        hf.attrs["representation"] = "spectrogram"

    def no_front_end(hf):
        del hf.attrs["front_end"]

    def says_waveform(hf):
        hf.attrs["representation"] = "waveform"

    cases = {
        drop_logmel: "missing dataset 'logmel'",
        unknown: "holds clips as 'spectrogram'; genreflow reads waveform or logmel",
        no_front_end: "without a readable 'front_end' attribute",
        says_waveform: "missing dataset 'waveform'",
    }
    for change, message in cases.items():
        bad = _copy_with(packed["logmel"], tmp_path / f"{change.__name__}.h5", change)
        with pytest.raises(GenreflowError, match=str(bad)) as caught:
            read_index(bad)
        assert message in str(caught.value)


def test_a_logmel_made_with_another_front_end_is_refused_by_embed_and_train(packed, tmp_path):
    def other_fmin(hf):
        front_end = json.loads(hf.attrs["front_end"])
        hf.attrs["front_end"] = json.dumps({**front_end, "fmin": 0})

    bad = _copy_with(packed["logmel"], tmp_path / "fmin0.h5", other_fmin)
    read_index(bad)  # a consistent file in itself
    message = f"{bad}: its log-mel was made with fmin 0, the model's front end has fmin 50"
    with pytest.raises(GenreflowError, match=message):
        embed_features(bad, tmp_path / "embed", seed=0)
    with pytest.raises(GenreflowError, match=message):
        train_fold(_fold_config(bad, tmp_path / "fold"))


def test_a_checkpoint_with_another_frozen_front_end_cannot_read_packed_logmel(packed, tmp_path):
    torch.manual_seed(0)
    base = TransferCnn14().base
    state = base.state_dict()
    state["logmel_extractor.melW"] = state["logmel_extractor.melW"] * 1.01
    torch.save({"model": state}, tmp_path / "other_front_end.pth")
    checkpoint = str(tmp_path / "other_front_end.pth")
    with pytest.raises(GenreflowError, match="differs in logmel_extractor.melW") as caught:
        embed_features(packed["logmel"], tmp_path / "logmel", pretrained=checkpoint)
    assert str(packed["logmel"]) in str(caught.value)
    # The waveform file goes through that checkpoint's own front end.
    made = embed_features(packed["waveform"], tmp_path / "waveform", pretrained=checkpoint)
    assert made["clips"] == 20


def test_pack_command_takes_the_representation(dataset, tmp_path, capsys):
    out = tmp_path / "features.h5"
    argv = ["pack", "--dataset", str(dataset), "--out", str(out), "--no-progress"]
    assert main([*argv, "--clip-seconds", "1", "--representation", "logmel", "--workers", "1"]) == 0
    printed = capsys.readouterr()
    assert "stored as float16 log-mel (64 mel bins, window 1024, hop 320, 50-14000 Hz)" in (
        printed.out + printed.err
    )
    assert read_index(out)[3]["representation"] == "logmel"
    assert rows_of(out, 0).shape == (logmel_frames(SAMPLE_RATE), 64)
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--representation", "mfcc"])
    assert exited.value.code == 2
    assert "invalid choice: 'mfcc' (choose from 'waveform', 'logmel')" in capsys.readouterr().err
