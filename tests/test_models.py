"""Cnn14 as PANNs defines it, the transfer model, and checkpoint load/save.

Cnn14 has 80 M parameters, so the models are built once per module and fed tiny batches
(two clips of one second).
"""

from __future__ import annotations

import io
import pathlib
import re

import librosa
import numpy as np
import pytest
import torch

from genreflow.audio import SAMPLE_RATE
from genreflow.errors import GenreflowError
from genreflow.logmel import FMAX, FMIN, HOP_SIZE, MEL_BINS, WINDOW_SIZE, LogmelFrontEnd
from genreflow.models import (
    MODELS,
    PUBLISHED_CHECKPOINTS,
    Cnn6,
    Cnn10,
    Cnn14,
    Mixup,
    Transfer,
    TransferCnn14,
    do_mixup,
    infer_architecture,
    load_checkpoint,
    load_model,
    load_pretrained,
    load_transfer_model,
    save_checkpoint,
)
from genreflow.models.checkpoints import _published_for

# The parameter count PANNs publishes for Cnn14 (Kong et al. 2019) is 80,753,615:
# everything trainable, i.e. without the frozen STFT kernels and mel filter bank.
PANNS_CNN14_PARAMETERS = 80_753_615


def clips(batch: int = 2, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Noise plus a tone per clip: energy in every mel bin, so dB values stay off the floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    rows = [
        0.05 * rng.standard_normal(t.size) + 0.5 * np.sin(2 * np.pi * (220 * (i + 1)) * t)
        for i in range(batch)
    ]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


def librosa_logmel(y: np.ndarray) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=SAMPLE_RATE,
        n_fft=WINDOW_SIZE,
        hop_length=HOP_SIZE,
        win_length=WINDOW_SIZE,
        window="hann",
        center=True,
        pad_mode="reflect",
        power=2.0,
        n_mels=MEL_BINS,
        fmin=FMIN,
        fmax=FMAX,
    )
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T  # (frames, mel)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def states_differ(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def cnn14() -> Cnn14:
    torch.manual_seed(0)
    return Cnn14().eval()


@pytest.fixture(scope="module")
def transfer() -> TransferCnn14:
    torch.manual_seed(1)
    return TransferCnn14(classes_num=10).eval()


# --- the network -------------------------------------------------------------------------
def test_logmel_front_end_equals_librosa(cnn14):
    waveform = clips(batch=2)
    with torch.no_grad():
        ours = cnn14.logmel(waveform)
    assert ours.shape == (2, 1, SAMPLE_RATE // HOP_SIZE + 1, MEL_BINS)
    for row in range(2):
        reference = librosa_logmel(waveform[row].numpy())
        np.testing.assert_allclose(ours[row, 0].numpy(), reference, atol=1e-3, rtol=0)


def test_front_end_is_frozen_and_float32_under_autocast(cnn14):
    frozen = [*cnn14.spectrogram_extractor.parameters(), *cnn14.logmel_extractor.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logmel = cnn14.logmel(clips(batch=1))
    assert logmel.dtype == torch.float32
    assert torch.isfinite(logmel).all()


def test_cnn14_parameter_count_matches_panns(cnn14):
    trainable = sum(p.numel() for p in cnn14.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in cnn14.parameters() if not p.requires_grad)
    assert trainable == PANNS_CNN14_PARAMETERS
    # The STFT's real and imaginary kernels (513 x 1024 each) and the mel filter bank.
    assert frozen == 2 * 513 * 1024 + 513 * 64


def test_published_key_names(cnn14):
    keys = set(cnn14.state_dict())
    for key in (
        "spectrogram_extractor.stft.conv_real.weight",
        "spectrogram_extractor.stft.conv_imag.weight",
        "logmel_extractor.melW",
        "bn0.running_mean",
        "conv_block1.conv1.weight",
        "conv_block6.conv2.weight",
        "conv_block6.bn2.running_var",
        "fc1.weight",
        "fc_audioset.bias",
    ):
        assert key in keys
    assert "conv_block7.conv1.weight" not in keys
    assert cnn14.bn0.num_features == MEL_BINS
    channels = [getattr(cnn14, f"conv_block{i}").conv2.out_channels for i in range(1, 7)]
    assert channels == [64, 128, 256, 512, 1024, 2048]
    assert cnn14.fc_audioset.out_features == 527


def test_eval_outputs_are_deterministic_without_spec_augment(cnn14):
    calls = []
    hook = cnn14.spec_augmenter.register_forward_hook(lambda *_: calls.append(1))
    waveform = clips(batch=2)
    try:
        with torch.no_grad():
            first = cnn14(waveform)
            second = cnn14(waveform)
    finally:
        hook.remove()
    assert calls == []
    assert set(first) == {"clipwise_output", "embedding"}
    assert first["clipwise_output"].shape == (2, 527)
    assert first["embedding"].shape == (2, 2048)
    assert ((first["clipwise_output"] > 0) & (first["clipwise_output"] < 1)).all()
    assert (first["embedding"] >= 0).all()  # after ReLU
    for key in first:
        assert torch.equal(first[key], second[key])


def test_spec_augment_and_dropout_in_training_only():
    # The forward pass is shared by all PANNs CNNs; Cnn6 exercises it at a fraction of
    # Cnn14's cost.
    torch.manual_seed(0)
    model = Cnn6()
    calls = []
    model.spec_augmenter.register_forward_hook(lambda *_: calls.append(1))
    waveform = clips(batch=2)
    lam = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        model.train()
        first = model(waveform)["embedding"]
        second = model(waveform)["embedding"]
        assert len(calls) == 2
        model.eval()
        evaluated = model(waveform, mixup_lambda=lam)  # mixup is ignored outside training
        assert model(waveform)["embedding"].equal(evaluated["embedding"])
    assert len(calls) == 2
    assert not torch.equal(first, second)
    assert evaluated["embedding"].shape == (2, 512)


def test_mixup_halves_the_batch_in_training(cnn14):
    waveform = clips(batch=2)
    lam = torch.tensor([0.3, 0.7])
    try:
        with torch.no_grad():
            cnn14.train()
            mixed = cnn14(waveform, mixup_lambda=lam)
    finally:
        cnn14.eval()
    assert mixed["clipwise_output"].shape == (1, 527)
    assert mixed["embedding"].shape == (1, 2048)


def test_do_mixup_pairs_clips_two_by_two():
    x = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    lam = np.array([0.25, 0.75, 1.0, 0.0])
    out = do_mixup(x, lam)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], 0.25 * x[0] + 0.75 * x[1])
    torch.testing.assert_close(out[1], x[2])
    with pytest.raises(GenreflowError, match="even batch"):
        do_mixup(x[:3], lam[:3])


def _saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_mixup_lambdas_are_seeded_pairs_and_resumable():
    mixup = Mixup(alpha=1.0, seed=1234)
    lam = mixup.get_lambda(8)
    assert lam.shape == (8,)
    np.testing.assert_allclose(lam[0::2] + lam[1::2], 1.0)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert np.array_equal(Mixup(alpha=1.0, seed=1234).get_lambda(8), lam)

    # The seed's mixer: one Beta(alpha, alpha) draw per pair from RandomState(seed).
    seed_rng = np.random.RandomState(1234)
    seed_lam = [seed_rng.beta(1.0, 1.0, 1)[0] for _ in range(4)]
    np.testing.assert_array_equal(lam[0::2], seed_lam)

    state = torch.load(_saved(mixup.state_dict()), weights_only=True)
    following = mixup.get_lambda(6)
    resumed = Mixup(alpha=1.0, seed=0)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.get_lambda(6), following)
    with pytest.raises(GenreflowError, match="even batch size"):
        mixup.get_lambda(3)


def test_too_short_or_misshapen_input_is_a_clear_error(cnn14):
    with pytest.raises(GenreflowError, match="at least"):
        cnn14(torch.zeros(1, 1000))
    with pytest.raises(GenreflowError, match=r"\(batch, samples\)"):
        cnn14(torch.zeros(SAMPLE_RATE))
    with pytest.raises(GenreflowError, match="float waveforms"):
        cnn14(torch.zeros(1, SAMPLE_RATE, dtype=torch.int16))
    # Long enough for the network, too short for SpecAugment's 64-frame time stripes.
    short = clips(batch=2, seconds=0.5)
    cnn14.train()
    try:
        with pytest.raises(GenreflowError, match="SpecAugment in training needs at least 64"):
            cnn14(short)
    finally:
        cnn14.eval()


def test_logmel_input_skips_the_front_end_and_gives_the_waveform_outputs(cnn14):
    waveform = clips(batch=2)
    with torch.no_grad():
        logmel = cnn14.logmel(waveform)
        from_waveform = cnn14(waveform)
        calls = []
        hook = cnn14.spectrogram_extractor.register_forward_hook(lambda *_: calls.append(1))
        try:
            from_logmel = cnn14(logmel)
            from_half = cnn14(logmel.half())  # any float dtype: packed log-mel is float16
        finally:
            hook.remove()
    assert calls == []
    for key in from_waveform:
        assert torch.equal(from_logmel[key], from_waveform[key])
    assert from_half["embedding"].dtype == torch.float32


def test_logmel_input_in_training_draws_the_same_augmentation_and_mixup():
    torch.manual_seed(0)
    model = Cnn6().train()
    waveform, lam = clips(batch=2), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        logmel = model.logmel(waveform)
        torch.manual_seed(3)
        from_waveform = model(waveform, lam)["embedding"]
        torch.manual_seed(3)
        from_logmel = model(logmel, lam)["embedding"]
    assert from_logmel.shape == (1, 512)
    assert torch.equal(from_logmel, from_waveform)


def test_front_end_alone_is_the_networks_front_end(cnn14):
    torch.manual_seed(7)  # its STFT draws initial weights, then sets the DFT: seed-free
    front_end = LogmelFrontEnd().eval()
    waveform = clips(batch=1)
    with torch.no_grad():
        assert torch.equal(front_end(waveform), cnn14.logmel(waveform))
    assert front_end.front_end_config == cnn14.front_end_config
    assert set(front_end.state_dict()) == {
        "spectrogram_extractor.stft.conv_real.weight",
        "spectrogram_extractor.stft.conv_imag.weight",
        "logmel_extractor.melW",
    }


def test_misshapen_logmel_is_a_clear_error(cnn14):
    frames = SAMPLE_RATE // HOP_SIZE + 1
    with pytest.raises(GenreflowError, match=r"log-mels shaped \(batch, 1, frames, 64\)"):
        cnn14(torch.zeros(1, 2, frames, MEL_BINS))
    with pytest.raises(GenreflowError, match=r"log-mels shaped .*got shape \(1, 1, 100, 128\)"):
        cnn14(torch.zeros(1, 1, 100, 128))
    with pytest.raises(GenreflowError, match="float log-mels"):
        cnn14(torch.zeros(1, 1, frames, MEL_BINS, dtype=torch.int16))
    with pytest.raises(GenreflowError, match="at least 32 log-mel frames"):
        cnn14(torch.zeros(1, 1, 31, MEL_BINS))


def test_smaller_panns_models_share_the_interface():
    for cls, embedding in ((Cnn10, 512), (Cnn6, 512)):
        model = cls(mel_bins=32).eval()
        assert model.bn0.num_features == 32
        with torch.no_grad():
            out = model(clips(batch=2, seconds=0.5))
        assert out["clipwise_output"].shape == (2, 527)
        assert out["embedding"].shape == (2, embedding)
        assert infer_architecture(model.state_dict()) == cls.__name__
    assert MODELS == {"Cnn14": Cnn14, "Cnn10": Cnn10, "Cnn6": Cnn6}


# --- the transfer model ------------------------------------------------------------------
def test_transfer_outputs_log_probabilities(transfer):
    with torch.no_grad():
        out = transfer(clips(batch=2))
    assert out["clipwise_output"].shape == (2, 10)
    assert out["embedding"].shape == (2, 2048)
    torch.testing.assert_close(out["clipwise_output"].exp().sum(dim=1), torch.ones(2))
    torch.testing.assert_close(transfer.head_forward(out["embedding"]), out["clipwise_output"])
    assert transfer.base.fc_audioset.out_features == 527
    total = sum(p.numel() for p in transfer.parameters())
    assert total == PANNS_CNN14_PARAMETERS + 2 * 513 * 1024 + 513 * 64 + 2048 * 10 + 10


def test_freeze_base_on_cnn14_trains_only_the_head():
    torch.manual_seed(0)
    model = TransferCnn14(classes_num=10, freeze_base=True).train()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc_transfer.weight", "fc_transfer.bias"]
    out = model(clips(batch=2), mixup_lambda=torch.tensor([0.4, 0.6]))
    out["clipwise_output"][:, 3].sum().backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert model.fc_transfer.weight.grad is not None
    assert model.fc_transfer.weight.grad.abs().sum() > 0


# --- checkpoints -------------------------------------------------------------------------
def test_published_form_loads_into_the_base(tmp_path, cnn14, transfer):
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    torch.save({"model": cnn14.state_dict()}, path)
    head_before = transfer.fc_transfer.weight.detach().clone()
    assert states_differ(transfer.base.state_dict(), cnn14.state_dict())

    load_pretrained(transfer, str(path))

    assert_same_state(transfer.base.state_dict(), cnn14.state_dict())
    assert torch.equal(transfer.fc_transfer.weight, head_before)


def test_published_form_in_the_legacy_format_and_into_a_bare_cnn14(tmp_path, cnn14):
    model = Cnn6().eval()
    path = tmp_path / "Cnn6_mAP=0.343.pth"
    torch.save({"model": model.state_dict()}, path, _use_new_zipfile_serialization=False)
    fresh = Cnn6()
    load_pretrained(fresh, path)
    assert_same_state(fresh.state_dict(), model.state_dict())

    loaded, metadata = load_model(f"file://{path}")
    assert isinstance(loaded, Cnn6) and not loaded.training and metadata == {}
    assert_same_state(loaded.state_dict(), model.state_dict())

    with pytest.raises(GenreflowError, match="does not fit Cnn14: .*missing key"):
        load_pretrained(cnn14, path)


def test_seed_form_loads_into_the_transfer_model(tmp_path, transfer):
    # What the seed wrote: {'iteration', 'model'} of a Transfer_Cnn14, nothing else.
    path = tmp_path / "2000_iterations.pth"
    torch.save({"iteration": 2000, "model": transfer.state_dict()}, path)

    model, metadata = load_transfer_model(path)

    assert isinstance(model, TransferCnn14) and not model.training
    assert metadata == {}
    assert model.fc_transfer.out_features == 10
    assert_same_state(model.state_dict(), transfer.state_dict())

    # The same file as --pretrained into an existing transfer model: base and head load.
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    load_pretrained(model, path)
    assert_same_state(model.state_dict(), transfer.state_dict())


def test_save_checkpoint_round_trip_with_metadata(tmp_path):
    torch.manual_seed(2)
    model = Transfer("Cnn10", classes_num=4, hop_size=160).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    metadata = {
        "genres": ["blues", "classical", "country", "disco"],
        "fold": 3,
        "recipe": {"lr": 1e-4, "mixup": True, "note": None},
    }
    path = tmp_path / "out" / "best.pth"
    save_checkpoint(
        path, model, iteration=7, metadata=metadata, extra={"optimizer": optimizer.state_dict()}
    )

    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pth"]  # no temp left
    raw = load_checkpoint(path)
    assert raw["iteration"] == 7
    assert set(raw) == {"iteration", "model", "genreflow", "optimizer"}
    assert all(k.startswith(("base.", "fc_transfer.")) for k in raw["model"])

    loaded, loaded_metadata = load_transfer_model(str(path))
    assert type(loaded) is Transfer and type(loaded.base) is Cnn10
    assert loaded.base.config["hop_size"] == 160  # from metadata, not the default
    assert {k: loaded_metadata[k] for k in metadata} == metadata
    assert loaded_metadata["model_config"]["architecture"] == "Cnn10"
    assert_same_state(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        waveform = clips(batch=2, seconds=0.5)
        torch.testing.assert_close(
            loaded(waveform)["clipwise_output"], model(waveform)["clipwise_output"]
        )


def test_save_checkpoint_refuses_what_weights_only_cannot_load(tmp_path):
    model = Cnn6()
    path = tmp_path / "c.pth"
    with pytest.raises(GenreflowError, match=r"metadata\['when'\] is a ndarray"):
        save_checkpoint(path, model, iteration=0, metadata={"when": np.zeros(2)})
    with pytest.raises(GenreflowError, match="may not replace model"):
        save_checkpoint(path, model, iteration=0, metadata={}, extra={"model": {}})
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_does_not_fit_names_every_problem(tmp_path, cnn14, transfer):
    state = dict(cnn14.state_dict())
    del state["conv_block3.bn1.weight"]
    state["conv_block9.conv1.weight"] = torch.zeros(1)
    state["fc1.weight"] = torch.zeros(2048, 100)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    before = {k: v.clone() for k, v in transfer.state_dict().items()}

    with pytest.raises(GenreflowError) as error:
        load_pretrained(transfer, path)

    message = str(error.value)
    assert str(path) in message
    assert "missing key(s): conv_block3.bn1.weight" in message
    assert "unexpected key(s): conv_block9.conv1.weight" in message
    assert "fc1.weight (checkpoint (2048, 100), model (2048, 2048))" in message
    assert_same_state(transfer.state_dict(), before)  # nothing was loaded


def test_long_key_lists_are_truncated(tmp_path, transfer):
    path = tmp_path / "empty_head.pth"
    torch.save({"model": {f"extra{i}": torch.zeros(1) for i in range(20)}}, path)
    with pytest.raises(GenreflowError) as error:
        load_pretrained(transfer, path)
    message = str(error.value)
    assert "20 unexpected key(s)" in message and "and 12 more" in message
    assert "missing key(s)" in message and "more" in message


def test_weights_only_refuses_arbitrary_pickled_objects(tmp_path):
    marker = tmp_path / "code_ran"

    class RunsCodeWhenUnpickled:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": RunsCodeWhenUnpickled()}, path)
    with pytest.raises(GenreflowError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_corrupt_and_malformed_files_are_clear_errors(tmp_path, transfer):
    with pytest.raises(GenreflowError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pth")
    good = tmp_path / "good.pth"
    torch.save({"model": {"a": torch.zeros(3)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(GenreflowError, match="truncated.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(GenreflowError, match="garbage.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(garbage)
    bare = tmp_path / "bare.pth"
    torch.save({"fc1.weight": torch.zeros(2)}, bare)
    with pytest.raises(GenreflowError, match="expected a dict with a 'model' state dict"):
        load_checkpoint(bare)
    with pytest.raises(GenreflowError, match="sha256 mismatch"):
        load_checkpoint(good, sha256="0" * 64)
    with pytest.raises(GenreflowError, match="without a transfer head"):
        load_transfer_model(good)


def test_data_parallel_prefix_is_undone(tmp_path):
    model = Cnn6()
    path = tmp_path / "wrapped.pth"
    torch.save({"model": torch.nn.DataParallel(model).state_dict()}, path)
    assert next(iter(torch.load(path, weights_only=True)["model"])).startswith("module.")
    fresh = Cnn6()
    load_pretrained(fresh, path)
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_published_zenodo_urls_are_verified_by_default():
    cnn14_file = PUBLISHED_CHECKPOINTS["Cnn14"]
    assert cnn14_file.filename == "Cnn14_mAP=0.431.pth"
    assert _published_for(cnn14_file.url) is cnn14_file
    old_style = "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"
    assert _published_for(old_style) is cnn14_file
    assert _published_for("https://example.org/Cnn14_mAP=0.431.pth") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transfer_model_on_cuda_with_mixed_precision(transfer):
    model = transfer.to("cuda")
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            waveform = clips(batch=2).cuda()
            logmel = model.base.logmel(waveform)
            out = model(waveform)
        assert logmel.dtype == torch.float32 and torch.isfinite(logmel).all()
        assert out["clipwise_output"].shape == (2, 10)
        assert torch.isfinite(out["clipwise_output"]).all()
    finally:
        transfer.to("cpu")


def test_a_foreign_checkpoint_is_refused_naming_the_file_and_what_it_holds(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save(
        {"model": {"conv.weight": torch.zeros(4, 1, 3, 3), "fc.bias": torch.zeros(2)}}, foreign
    )
    for load in (load_model, load_transfer_model):
        with pytest.raises(GenreflowError) as raised:
            load(foreign)
        message = str(raised.value)
        if load is load_transfer_model:  # no base.* keys: named as such, with the file
            assert str(foreign) in message and "no base.* keys" in message
            continue
        assert message.startswith(f"{foreign}: not a PANNs model")
        assert "conv.weight, fc.bias" in message and "no conv_block* keys" in message
        assert "Cnn14: conv_block1..6, 2 conv(s) each" in message
    transfer = tmp_path / "transfer.pth"
    torch.save(
        {"model": {"base.conv.weight": torch.zeros(1), "fc_transfer.weight": torch.zeros(10, 4)}},
        transfer,
    )
    with pytest.raises(
        GenreflowError, match=rf"^{re.escape(str(transfer))}: not a PANNs model.*holds conv\.weight"
    ):
        load_transfer_model(transfer)
