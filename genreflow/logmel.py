"""Cnn14's frozen front end on its own: waveform -> STFT -> mel filter bank -> log (dB).

Two layers use it, so it is neither's: the model builds on it (PannsCnn in
genreflow.models.cnn14), and packing runs it alone (`genreflow pack --representation
logmel`, genreflow.features), so that a packed log-mel is exactly what the network would
compute from the packed waveform, and the data layer needs no model.

The parameters are those of the published PANNs checkpoints (audioset_tagging_cnn, Cnn14
at 32 kHz): torchlibrosa's Spectrogram and LogmelFilterBank with window 1024, hop 320,
64 mel bins, 50 to 14000 Hz, Hann, centred, reflect padding, ref 1.0, amin 1e-10, no
top_db. Change them and the pretrained weights no longer fit the features. The attribute
names are PANNs' own, so the released checkpoints' keys fit unchanged:

    spectrogram_extractor.stft.conv_real.weight   frozen STFT as a 1-D convolution
    spectrogram_extractor.stft.conv_imag.weight
    logmel_extractor.melW                         frozen mel filter bank
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchlibrosa.stft import LogmelFilterBank, Spectrogram

from genreflow.audio import SAMPLE_RATE
from genreflow.errors import GenreflowError

WINDOW_SIZE = 1024
HOP_SIZE = 320
MEL_BINS = 64
FMIN = 50
FMAX = 14000

# What fixes a front end's output (the rest of torchlibrosa's settings are constants here),
# as a log-mel file records it and as a model's front end reports it: Cnn14's defaults.
FRONT_END = {
    "sample_rate": SAMPLE_RATE,
    "window_size": WINDOW_SIZE,
    "hop_size": HOP_SIZE,
    "mel_bins": MEL_BINS,
    "fmin": FMIN,
    "fmax": FMAX,
}
# A model's frozen front end (from its checkpoint) may differ from the one that packed a
# log-mel by this much, relative to the largest weight: 1e-5 moves a log-mel by about
# 4e-5 dB, far below float16's rounding of it (0.008 to 0.03 dB at 10 to 60 dB).
FRONT_END_TOLERANCE = 1e-5


def logmel_frames(samples: int, hop_size: int = HOP_SIZE) -> int:
    """Frames of the front end's log-mel of `samples` samples (centred STFT: one frame per
    hop, plus one): 960000 -> 3001."""
    return samples // hop_size + 1


class LogmelFrontEnd(nn.Module):
    """The frozen front end alone: waveform -> STFT -> mel filter bank -> log (dB)."""

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        window_size: int = WINDOW_SIZE,
        hop_size: int = HOP_SIZE,
        mel_bins: int = MEL_BINS,
        fmin: float = FMIN,
        fmax: float = FMAX,
    ):
        super().__init__()
        self.config = {
            "architecture": type(self).__name__,
            "sample_rate": sample_rate,
            "window_size": window_size,
            "hop_size": hop_size,
            "mel_bins": mel_bins,
            "fmin": fmin,
            "fmax": fmax,
        }
        # Frozen, so fine-tuning never moves the STFT or the filter bank.
        self.spectrogram_extractor = Spectrogram(
            n_fft=window_size,
            hop_length=hop_size,
            win_length=window_size,
            window="hann",
            center=True,
            pad_mode="reflect",
            freeze_parameters=True,
        )
        self.logmel_extractor = LogmelFilterBank(
            sr=sample_rate,
            n_fft=window_size,
            n_mels=mel_bins,
            fmin=fmin,
            fmax=fmax,
            ref=1.0,
            amin=1e-10,
            top_db=None,
            freeze_parameters=True,
        )

    @property
    def front_end_config(self) -> dict:
        """What fixes the log-mel: the parameters a packed log-mel must have been made with."""
        return {key: self.config[key] for key in FRONT_END}

    @property
    def min_samples(self) -> int:
        """The shortest waveform the front end accepts: longer than half a window, so
        that reflect padding is defined."""
        return self.config["window_size"] // 2 + 1

    def logmel(self, waveform: Tensor) -> Tensor:
        """(batch, samples) -> log-mel in dB, (batch, 1, frames, mel).

        Always computed in float32: under mixed precision a float16 power spectrum
        underflows and the 1e-10 floor of the dB conversion becomes log(0).
        """
        if waveform.dim() != 2:
            raise GenreflowError(
                f"{type(self).__name__} takes waveforms shaped (batch, samples), "
                f"got shape {tuple(waveform.shape)}"
            )
        if not waveform.is_floating_point():
            raise GenreflowError(
                f"{type(self).__name__} takes float waveforms in [-1, 1], got {waveform.dtype}; "
                "scale stored int16 clips first (genreflow.audio, divide by 32767)"
            )
        if waveform.shape[1] < self.min_samples:
            raise GenreflowError(
                f"{type(self).__name__} needs at least {self.min_samples} samples per clip "
                f"({self.min_samples / self.config['sample_rate']:.3f} s), "
                f"got {waveform.shape[1]}"
            )
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            x = self.spectrogram_extractor(waveform.float())  # (batch, 1, frames, freq)
            return self.logmel_extractor(x)  # (batch, 1, frames, mel)

    def forward(self, waveform: Tensor) -> Tensor:
        return self.logmel(waveform)
