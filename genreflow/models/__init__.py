"""PANNs models (Cnn14, Cnn10, Cnn6), the transfer model, and checkpoint load/save."""

from genreflow.models.checkpoints import (
    PUBLISHED_CHECKPOINTS,
    PublishedCheckpoint,
    infer_architecture,
    load_checkpoint,
    load_model,
    load_pretrained,
    load_transfer_model,
    save_checkpoint,
)
from genreflow.models.cnn14 import (
    AUDIOSET_CLASSES,
    MODELS,
    Cnn6,
    Cnn10,
    Cnn14,
    Mixup,
    PannsCnn,
    do_mixup,
)
from genreflow.models.transfer import Transfer, TransferCnn14, build_transfer

__all__ = [
    "AUDIOSET_CLASSES",
    "MODELS",
    "PUBLISHED_CHECKPOINTS",
    "Cnn6",
    "Cnn10",
    "Cnn14",
    "Mixup",
    "PannsCnn",
    "PublishedCheckpoint",
    "Transfer",
    "TransferCnn14",
    "build_transfer",
    "do_mixup",
    "infer_architecture",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "load_transfer_model",
    "save_checkpoint",
]
