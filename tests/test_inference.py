"""embed and predict on tiny audio files: segment averaging, ensembles, the CLI, bad files.

The checkpoints are random Cnn14s written in both published forms: what is tested is the
plumbing around the model (decoding, cutting, averaging, loading, output formats), which
does not depend on the weights being trained.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from genreflow.audio import SAMPLE_RATE, load_segments
from genreflow.cli import main
from genreflow.data.genres import GENRES
from genreflow.ensemble import load_ensemble
from genreflow.errors import GenreflowError
from genreflow.inference import embed, predict
from genreflow.models.checkpoints import save_checkpoint
from genreflow.models.transfer import TransferCnn14

CLIP_SECONDS = 0.5
CLIP = int(CLIP_SECONDS * SAMPLE_RATE)


def _tone(seconds: float, freq: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = TransferCnn14().eval()
        metadata = {
            "genres": list(GENRES),
            "sample_rate": SAMPLE_RATE,
            "clip_samples": CLIP,
            "fold": seed + 1,
        }
        save_checkpoint(root / f"fold{seed + 1}.pth", model, iteration=3, metadata=metadata)
        models.append(model)
    # The published form: the bare Cnn14 state dict under 'model', no metadata.
    torch.save({"model": models[0].base.state_dict()}, root / "published.pth")
    # Three whole clips and a tail too short to keep (under a second).
    long = np.concatenate([_tone(CLIP_SECONDS, f) for f in (220, 880, 3520)] + [_tone(0.1, 50)])
    sf.write(root / "long.wav", long, SAMPLE_RATE)
    # Another rate and two channels: decoded to 32 kHz mono, padded to one clip.
    stereo = np.stack([_tone(0.3, 440, 22050), _tone(0.3, 660, 22050)], axis=1)
    sf.write(root / "short.flac", stereo, 22050)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot really audio at all")
    return root, models


def test_embed_averages_consecutive_clips(work):
    root, models = work
    files = [str(root / "long.wav"), str(root / "short.flac")]
    got = embed(str(root / "published.pth"), files, clip_seconds=CLIP_SECONDS, device="cpu")
    assert got.shape == (2, 2048) and got.dtype == np.float32

    segments = load_segments(root / "long.wav", CLIP)
    assert segments.shape == (3, CLIP)
    with torch.inference_mode():
        per_clip = models[0].base(torch.from_numpy(segments))["embedding"].numpy()
    np.testing.assert_allclose(got[0], per_clip.mean(0), rtol=1e-5, atol=1e-6)
    # The three tones give three different embeddings: the mean is not one of them.
    assert not np.allclose(per_clip[0], per_clip[1], atol=1e-4)

    # A fine-tuned checkpoint with the same base gives the same embeddings; its metadata
    # supplies the clip length.
    ours = embed(str(root / "fold1.pth"), files, device="cpu")
    np.testing.assert_allclose(ours, got, rtol=1e-5, atol=1e-6)


def test_predict_ensemble_is_the_mean_of_its_members(work):
    root, _ = work
    files = [str(root / "long.wav"), str(root / "short.flac")]
    one = predict([str(root / "fold1.pth")], files, device="cpu")
    two = predict([str(root / "fold2.pth")], files, device="cpu")
    both = predict([str(root / "fold1.pth"), str(root / "fold2.pth")], files, device="cpu")
    assert [r["file"] for r in both] == files
    for a, b, ensemble in zip(one, two, both, strict=True):
        assert list(ensemble["probabilities"]) == list(GENRES)
        probs = np.array(list(ensemble["probabilities"].values()))
        expected = (
            np.array(list(a["probabilities"].values())) + list(b["probabilities"].values())
        ) / 2
        np.testing.assert_allclose(probs, expected, rtol=1e-9)
        assert probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert ensemble["genre"] == GENRES[int(np.argmax(probs))]
    # Clips of another length than the checkpoint's give other probabilities.
    longer = predict([str(root / "fold1.pth")], files[:1], clip_seconds=1.5, device="cpu")
    assert longer[0]["probabilities"] != one[0]["probabilities"]


def test_predict_cli_json_and_table(work, capsys):
    root, _ = work
    files = [str(root / "long.wav"), str(root / "short.flac")]
    args = ["predict", "--checkpoint", str(root / "fold1.pth")]
    args += ["--checkpoint", str(root / "fold2.pth"), *files, "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert isinstance(results, list) and len(results) == 2
    for result, file in zip(results, files, strict=True):
        assert set(result) == {"file", "genre", "probabilities"}
        assert result["file"] == file and result["genre"] in GENRES
        assert list(result["probabilities"]) == list(GENRES)

    # The table, here for one checkpoint: file, genre, then a column per genre.
    assert main([*args[:3], *files, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "genre", *GENRES]
    assert [line.split()[0] for line in lines[1:]] == files
    for line in lines[1:]:
        cells = line.split()
        probabilities = [float(cell) for cell in cells[2:]]
        assert len(probabilities) == len(GENRES)
        assert sum(probabilities) == pytest.approx(1.0, abs=6e-3)
        assert cells[1] == GENRES[int(np.argmax(probabilities))]


def test_embed_cli_writes_one_row_per_file(work, tmp_path, capsys):
    root, _ = work
    out = tmp_path / "emb.npy"
    files = [str(root / "short.flac"), str(root / "long.wav"), str(root / "short.flac")]
    args = ["embed", "--checkpoint", str(root / "fold1.pth"), *files, "--out", str(out)]
    assert main(args) == 0
    rows = np.load(out)
    assert rows.shape == (3, 2048)
    np.testing.assert_array_equal(rows[0], rows[2])
    assert "3 x 2048" in capsys.readouterr().out


def test_corrupt_or_missing_file_is_a_clear_error(work, capsys):
    root, _ = work
    corrupt = str(root / "corrupt.wav")
    args = ["predict", "--checkpoint", str(root / "fold1.pth"), str(root / "long.wav"), corrupt]
    assert main(args) == 2
    assert f"genreflow predict: error: {corrupt}: " in capsys.readouterr().err

    missing = str(root / "nowhere.wav")
    args = ["embed", "--checkpoint", str(root / "published.pth"), missing]
    assert main([*args, "--out", str(root / "x.npy")]) == 2
    assert f"{missing}: no such audio file" in capsys.readouterr().err
    assert not (root / "x.npy").exists()


def test_predict_needs_a_fine_tuned_checkpoint(work):
    root, _ = work
    with pytest.raises(GenreflowError, match="published.pth"):
        predict([str(root / "published.pth")], [str(root / "long.wav")], device="cpu")


def test_load_ensemble_gives_predicts_probabilities(work):
    root, _ = work
    checkpoints = [str(root / "fold1.pth"), str(root / "fold2.pth")]
    ensemble = load_ensemble(checkpoints)
    ensemble.train()  # refused: an ensemble only ever runs in eval mode
    assert not ensemble.training and ensemble.genres == list(GENRES)
    clip = load_segments(root / "short.flac", CLIP)  # one clip: nothing to average over
    with torch.inference_mode():
        probabilities = ensemble(torch.from_numpy(clip)).numpy()
    expected = predict(checkpoints, [str(root / "short.flac")], device="cpu")[0]
    np.testing.assert_allclose(
        probabilities[0], list(expected["probabilities"].values()), rtol=1e-5, atol=1e-7
    )


def test_a_request_is_bounded_in_files_and_in_seconds_of_clips(work, monkeypatch):
    from genreflow.inference import ensemble_probabilities

    root, _ = work
    ensemble = load_ensemble([str(root / "fold1.pth"), str(root / "fold2.pth")])
    long, short = str(root / "long.wav"), str(root / "short.flac")

    def probabilities(files):
        names = [f"row {i}" for i in range(len(files))]
        return ensemble_probabilities(
            ensemble, files, clip_samples=CLIP, device=torch.device("cpu"), names=names
        )

    monkeypatch.setenv("GENREFLOW_MAX_REQUEST_ROWS", "2")
    with pytest.raises(GenreflowError) as info:
        probabilities([long, short, short])
    assert str(info.value) == (
        "the request: 3 files, over the limit of 2 files (rows) one request may hold "
        "(set GENREFLOW_MAX_REQUEST_ROWS to raise it)"
    )

    # 2 s of 0.5 s clips: long.wav is 3 clips (1.6 s, its 0.1 s tail dropped), short.flac
    # one (0.3 s, padded): 2 s exactly, the most a request may hold.
    monkeypatch.setenv("GENREFLOW_MAX_REQUEST_ROWS", "10")
    monkeypatch.setenv("GENREFLOW_MAX_REQUEST_SECONDS", "2")
    assert probabilities([long, short]).shape == (2, len(GENRES))
    # Row 1 decodes to 1.6 s, more than the 1.5 s left; the row after it is not read.
    with pytest.raises(GenreflowError) as info:
        probabilities([short, long, short])
    message = str(info.value)
    assert message.startswith(
        "row 1: longer than the 1.5 s left of the request, over the limit of 2 seconds of "
        "audio one request may hold, each file counted in whole clips (set "
        "GENREFLOW_MAX_REQUEST_SECONDS to raise it); row 2: not decoded"
    )
    # A file within what is left whose clips pass it: short.flac (0.3 s) is a whole 2 s clip
    # of a model with 2 s clips.
    monkeypatch.setenv("GENREFLOW_MAX_REQUEST_SECONDS", "1")
    with pytest.raises(GenreflowError) as info:
        ensemble_probabilities(
            ensemble, [short], clip_samples=4 * CLIP, device=torch.device("cpu"), names=["row 0"]
        )
    assert str(info.value).startswith(
        "row 0: 1 clip(s) of 2 s, more than the 1 s left of the request, over the limit of 1"
    )


def test_predict_refuses_a_crafted_file_with_one_line(work, tmp_path, capsys):
    from crafted_audio import one_hz_wav

    root, _ = work
    crafted = tmp_path / "one-hertz.wav"
    crafted.write_bytes(one_hz_wav())
    args = ["predict", "--checkpoint", str(root / "fold1.pth"), str(crafted)]
    assert main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"genreflow predict: error: {crafted}: sample rate 1 Hz, under the lowest allowed, "
        "4000 Hz (set GENREFLOW_MIN_SAMPLE_RATE to lower it)\n"
    )
