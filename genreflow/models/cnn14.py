"""PANNs CNNs (Kong et al., 2019, arXiv:1912.10211): Cnn14 and its smaller siblings.

The attribute names are the published ones (audioset_tagging_cnn, pytorch/models.py), so
the state-dict keys of the released AudioSet checkpoints (`Cnn14_mAP=0.431.pth`, ...) fit
these modules unchanged:

    spectrogram_extractor.stft.conv_real.weight   frozen STFT as a 1-D convolution
    spectrogram_extractor.stft.conv_imag.weight
    logmel_extractor.melW                         frozen mel filter bank
    bn0.*                                         BatchNorm2d over the mel bins
    conv_block{i}.conv1/conv2/bn1/bn2.*           the conv blocks
    fc1.*, fc_audioset.*                          the embedding layer and the AudioSet head

The front end (STFT, mel filter bank, log) is genreflow.logmel's, with the log-mel
parameters of the published checkpoints (window 1024, hop 320, 64 mel bins, 50 to
14000 Hz).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchlibrosa.augmentation import SpecAugmentation

from genreflow.audio import SAMPLE_RATE
from genreflow.errors import GenreflowError
from genreflow.logmel import FMAX, FMIN, HOP_SIZE, MEL_BINS, WINDOW_SIZE, LogmelFrontEnd

AUDIOSET_CLASSES = 527

# SpecAugment as PANNs trains with it: 2 time stripes of up to 64 frames and 2 frequency
# stripes of up to 8 mel bins, zeroed in the (bn0-normalised) log-mel.
SPEC_AUGMENT = {
    "time_drop_width": 64,
    "time_stripes_num": 2,
    "freq_drop_width": 8,
    "freq_stripes_num": 2,
}
BLOCK_DROPOUT = 0.2
HEAD_DROPOUT = 0.5


def init_layer(layer: nn.Module) -> None:
    """Xavier-uniform weights and zero bias, PANNs' initialisation for conv and linear."""
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def init_bn(bn: nn.Module) -> None:
    """Identity affine transform to start with."""
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each with batch norm and ReLU, then average pooling."""

    CONVS: ClassVar[int] = 2

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        for conv in (self.conv1, self.conv2):
            init_layer(conv)
        for bn in (self.bn1, self.bn2):
            init_bn(bn)

    def forward(self, x: Tensor, pool_size: tuple[int, int]) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


class ConvBlock5x5(nn.Module):
    """One 5x5 convolution with batch norm and ReLU, then average pooling (Cnn6)."""

    CONVS: ClassVar[int] = 1

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        init_layer(self.conv1)
        init_bn(self.bn1)

    def forward(self, x: Tensor, pool_size: tuple[int, int]) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.avg_pool2d(x, kernel_size=pool_size)


def do_mixup(x: Tensor, mixup_lambda: Tensor | np.ndarray) -> Tensor:
    """Mix clips two by two, as PANNs does: row i of the output is clip 2i weighted by
    lambda[2i] plus clip 2i+1 weighted by lambda[2i+1], so the batch halves.

    Args:
        x: (batch, ...) with an even batch; inputs or targets alike.
        mixup_lambda: (batch,) weights, pairs that sum to one (see `Mixup.get_lambda`).
    """
    batch = x.shape[0]
    lam = torch.as_tensor(mixup_lambda).to(device=x.device, dtype=x.dtype)
    if batch % 2 or lam.shape != (batch,):
        raise GenreflowError(
            f"mixup pairs clips two by two: it needs an even batch and one weight per clip, "
            f"got a batch of {batch} and weights of shape {tuple(lam.shape)}"
        )
    lam = lam.reshape(batch, *([1] * (x.dim() - 1)))
    return x[0::2] * lam[0::2] + x[1::2] * lam[1::2]


class Mixup:
    """Seeded mixup weights: for each pair of clips, lam ~ Beta(alpha, alpha) and 1 - lam.

    The numpy RandomState (MT19937) draws one Beta variate per pair, so a given seed gives
    the same sequence as the PANNs recipe's own mixer with that seed.
    """

    def __init__(self, alpha: float = 1.0, seed: int = 1234):
        self.alpha = float(alpha)
        self.random_state = np.random.RandomState(seed)

    def get_lambda(self, batch_size: int) -> np.ndarray:
        """Weights for one batch: [lam_0, 1 - lam_0, lam_1, 1 - lam_1, ...] (float64)."""
        if batch_size <= 0 or batch_size % 2:
            raise GenreflowError(f"mixup needs an even batch size, got {batch_size}")
        lams = self.random_state.beta(self.alpha, self.alpha, size=batch_size // 2)
        return np.stack([lams, 1.0 - lams], axis=1).reshape(-1)

    def state_dict(self) -> dict:
        """Plain-typed state (loads with torch.load(weights_only=True)) to resume from."""
        name, keys, pos, has_gauss, cached = self.random_state.get_state()
        return {
            "alpha": self.alpha,
            "random_state": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        }

    def load_state_dict(self, state: dict) -> None:
        name, keys, pos, has_gauss, cached = state["random_state"]
        self.alpha = float(state["alpha"])
        keys = np.asarray(keys, dtype=np.uint32)
        self.random_state.set_state((name, keys, pos, has_gauss, cached))


class PannsCnn(LogmelFrontEnd):
    """The shared skeleton of Cnn6, Cnn10 and Cnn14; subclasses fill in `BLOCKS`.

    waveform -> frozen STFT -> frozen mel filter bank -> log (dB) -> bn0 over mel bins
    -> [SpecAugment, mixup: training only] -> conv blocks (each followed by dropout 0.2)
    -> mean over frequency -> max + mean over time -> dropout 0.5 -> fc1 + ReLU
    (= the embedding, returned after a further dropout 0.5) -> fc_audioset + sigmoid.

    `forward` takes waveforms or their log-mel: a log-mel packed by the front end skips
    it, and the network computes exactly what it would from the waveform.
    """

    # (output channels, average-pooling size) per block, in order.
    BLOCKS: ClassVar[tuple[tuple[int, tuple[int, int]], ...]] = ()
    BLOCK_TYPE: ClassVar[type[ConvBlock] | type[ConvBlock5x5]] = ConvBlock

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        window_size: int = WINDOW_SIZE,
        hop_size: int = HOP_SIZE,
        mel_bins: int = MEL_BINS,
        fmin: float = FMIN,
        fmax: float = FMAX,
        classes_num: int = AUDIOSET_CLASSES,
    ):
        super().__init__(sample_rate, window_size, hop_size, mel_bins, fmin, fmax)
        self.config["classes_num"] = classes_num
        self.pool_sizes = [pool for _, pool in self.BLOCKS]
        self.embedding_size = self.BLOCKS[-1][0]
        self.frequency_reduction = int(np.prod([pool[1] for pool in self.pool_sizes]))
        self.time_reduction = int(np.prod([pool[0] for pool in self.pool_sizes]))
        if mel_bins < self.frequency_reduction:
            raise GenreflowError(
                f"{type(self).__name__} pools the mel axis by {self.frequency_reduction}: "
                f"it needs at least that many mel bins, got {mel_bins}"
            )

        self.spec_augmenter = SpecAugmentation(**SPEC_AUGMENT)
        self.bn0 = nn.BatchNorm2d(mel_bins)

        in_channels = 1
        for index, (out_channels, _) in enumerate(self.BLOCKS, start=1):
            self.add_module(f"conv_block{index}", self.BLOCK_TYPE(in_channels, out_channels))
            in_channels = out_channels

        self.fc1 = nn.Linear(self.embedding_size, self.embedding_size)
        self.fc_audioset = nn.Linear(self.embedding_size, classes_num)

        init_bn(self.bn0)
        init_layer(self.fc1)
        init_layer(self.fc_audioset)

    @property
    def min_samples(self) -> int:
        """The shortest waveform the network accepts: enough frames for every time pool,
        and longer than half a window so that reflect padding is defined."""
        frames_needed = (self.time_reduction - 1) * self.config["hop_size"]
        return max(frames_needed, super().min_samples)

    def _checked_logmel(self, logmel: Tensor) -> Tensor:
        """A log-mel given to forward, as the front end would have made it (float32)."""
        expected = f"(batch, 1, frames, {self.config['mel_bins']})"
        if logmel.dim() != 4 or logmel.shape[1] != 1 or logmel.shape[3] != self.config["mel_bins"]:
            raise GenreflowError(
                f"{type(self).__name__} takes log-mels shaped {expected}, "
                f"got shape {tuple(logmel.shape)}"
            )
        if not logmel.is_floating_point():
            raise GenreflowError(f"{type(self).__name__} takes float log-mels, got {logmel.dtype}")
        if logmel.shape[2] < self.time_reduction:
            raise GenreflowError(
                f"{type(self).__name__} needs at least {self.time_reduction} log-mel frames "
                f"per clip, got {logmel.shape[2]}"
            )
        return logmel.float()

    def _check_spec_augment_fits(self, logmel: Tensor) -> None:
        # torchlibrosa draws a stripe start in [0, width - stripe) and fails with an
        # obscure "random_ expects 'from' < 'to'" when the stripe can exceed the axis.
        frames, bins = logmel.shape[2], logmel.shape[3]
        if frames < SPEC_AUGMENT["time_drop_width"] or bins < SPEC_AUGMENT["freq_drop_width"]:
            raise GenreflowError(
                f"SpecAugment in training needs at least {SPEC_AUGMENT['time_drop_width']} "
                f"frames (clips of {self.min_training_samples} samples) and "
                f"{SPEC_AUGMENT['freq_drop_width']} mel bins, got {frames} frames and "
                f"{bins} bins"
            )

    @property
    def min_training_samples(self) -> int:
        """The shortest clip training accepts: SpecAugment's time stripes must fit."""
        frames_needed = (SPEC_AUGMENT["time_drop_width"] - 1) * self.config["hop_size"]
        return max(self.min_samples, frames_needed)

    def forward(self, clips: Tensor, mixup_lambda: Tensor | None = None) -> dict[str, Tensor]:
        """Args:
            clips: waveforms (batch, samples) at the configured sample rate, or their
                log-mel as the front end makes it (`logmel()`: (batch, 1, frames, mel) in
                dB, any float dtype), which skips the front end. The rank tells them apart.
            mixup_lambda: (batch,) pair weights; used in training only, and halves the batch.

        Returns:
            'clipwise_output': (batch, classes) sigmoid probabilities;
            'embedding': (batch, embedding_size), the fc1 + ReLU features.
        """
        x = self._checked_logmel(clips) if clips.dim() == 4 else self.logmel(clips)
        # bn0 normalises each mel bin, so the mel axis becomes the channel axis for it.
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        if self.training:
            self._check_spec_augment_fits(x)
            x = self.spec_augmenter(x)
            if mixup_lambda is not None:
                x = do_mixup(x, mixup_lambda)  # (batch / 2, 1, frames, mel)

        for index, pool_size in enumerate(self.pool_sizes, start=1):
            x = getattr(self, f"conv_block{index}")(x, pool_size=pool_size)
            x = F.dropout(x, p=BLOCK_DROPOUT, training=self.training)
        # (batch, channels, frames / time_reduction, mel / frequency_reduction)

        x = torch.mean(x, dim=3)  # (batch, channels, frames')
        x = torch.max(x, dim=2).values + torch.mean(x, dim=2)  # (batch, channels)
        x = F.dropout(x, p=HEAD_DROPOUT, training=self.training)
        x = F.relu(self.fc1(x))
        # As published: the embedding handed to a transfer head gets a second dropout,
        # the AudioSet head reads fc1's output directly.
        embedding = F.dropout(x, p=HEAD_DROPOUT, training=self.training)
        clipwise_output = torch.sigmoid(self.fc_audioset(x))
        return {"clipwise_output": clipwise_output, "embedding": embedding}


class Cnn14(PannsCnn):
    """PANNs Cnn14: six double-conv blocks, 64 -> 2048 channels, a 2048-d embedding."""

    BLOCKS = (
        (64, (2, 2)),
        (128, (2, 2)),
        (256, (2, 2)),
        (512, (2, 2)),
        (1024, (2, 2)),
        (2048, (1, 1)),
    )
    BLOCK_TYPE = ConvBlock


class Cnn10(PannsCnn):
    """PANNs Cnn10: four double-conv blocks, 64 -> 512 channels, a 512-d embedding."""

    BLOCKS = ((64, (2, 2)), (128, (2, 2)), (256, (2, 2)), (512, (2, 2)))
    BLOCK_TYPE = ConvBlock


class Cnn6(PannsCnn):
    """PANNs Cnn6: four single 5x5-conv blocks, 64 -> 512 channels, a 512-d embedding."""

    BLOCKS = ((64, (2, 2)), (128, (2, 2)), (256, (2, 2)), (512, (2, 2)))
    BLOCK_TYPE = ConvBlock5x5


MODELS: dict[str, type[PannsCnn]] = {"Cnn14": Cnn14, "Cnn10": Cnn10, "Cnn6": Cnn6}
