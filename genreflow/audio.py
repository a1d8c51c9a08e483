"""Audio as Cnn14 expects it: 32 kHz mono, fixed-length clips, and the log-mel recipe.

The constants match the published PANNs checkpoints (audioset_tagging_cnn, Cnn14 at
32 kHz); change them and the pretrained weights no longer fit the features.
"""

from __future__ import annotations

SAMPLE_RATE = 32000
CLIP_SECONDS = 30.0

# torchlibrosa Spectrogram + LogmelFilterBank, as PANNs' Cnn14 builds them.
WINDOW_SIZE = 1024
HOP_SIZE = 320
MEL_BINS = 64
FMIN = 50
FMAX = 14000
