"""The transfer model: a PANNs base with its AudioSet head kept, plus a new linear head.

The base keeps its 527-way AudioSet layer so the published checkpoints load into it
unchanged; the genre head (`fc_transfer`) reads the base's embedding and returns
log-probabilities. The attribute names (`base`, `fc_transfer`) are the seed's, so its
fine-tuned checkpoints (`base.*`, `fc_transfer.*`) load too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genreflow.errors import GenreflowError
from genreflow.models.cnn14 import AUDIOSET_CLASSES, MODELS, PannsCnn, init_layer


class Transfer(nn.Module):
    """A PANNs base (`MODELS[base_name]`) and a `classes_num`-way log-softmax head.

    Args:
        base_name: a key of `MODELS` ('Cnn14', 'Cnn10', 'Cnn6').
        classes_num: size of the new head.
        freeze_base: no gradients flow into the base (requires_grad is off for all of it);
            as in the seed, the base still follows train()/eval(), so SpecAugment,
            dropout and batch-norm statistics behave as in fine-tuning.
        **base_kwargs: audio parameters for the base (sample_rate, window_size, ...).
    """

    def __init__(
        self,
        base_name: str = "Cnn14",
        classes_num: int = 10,
        freeze_base: bool = False,
        **base_kwargs,
    ):
        super().__init__()
        if base_name not in MODELS:
            raise GenreflowError(
                f"unknown base model {base_name!r}; known: {', '.join(sorted(MODELS))}"
            )
        if "classes_num" in base_kwargs:
            raise GenreflowError(
                "the base keeps its AudioSet head (527 classes); classes_num is the new head's"
            )
        self.base: PannsCnn = MODELS[base_name](classes_num=AUDIOSET_CLASSES, **base_kwargs)
        self.fc_transfer = nn.Linear(self.base.embedding_size, classes_num)
        init_layer(self.fc_transfer)
        self.freeze_base = freeze_base
        if freeze_base:
            for param in self.base.parameters():
                param.requires_grad_(False)
        self.config = {**self.base.config, "classes_num": classes_num}

    def head_forward(self, embedding: Tensor) -> Tensor:
        """The new head alone: (batch, embedding_size) -> (batch, classes) log-probabilities.

        With a frozen base evaluated once per clip, training needs only this. The
        log-softmax runs in float32 whatever autocast chose for the linear layer: in bf16
        (8 significant bits) ten probabilities summed to 0.9967, not 1.
        """
        return torch.log_softmax(self.fc_transfer(embedding).float(), dim=-1)

    def forward(self, clips: Tensor, mixup_lambda: Tensor | None = None) -> dict[str, Tensor]:
        """Args:
            clips: waveforms (batch, samples), or their log-mel (batch, 1, frames, mel) as
                the base's front end makes it (see PannsCnn.forward).
            mixup_lambda: (batch,) pair weights, training only; halves the batch.

        Returns:
            'clipwise_output': (batch, classes) log-probabilities;
            'embedding': (batch, embedding_size), the base's embedding.
        """
        embedding = self.base(clips, mixup_lambda)["embedding"]
        return {"clipwise_output": self.head_forward(embedding), "embedding": embedding}


class TransferCnn14(Transfer):
    """The seed's Transfer_Cnn14: Cnn14 (527-way head kept) plus a linear genre head."""

    def __init__(self, classes_num: int = 10, freeze_base: bool = False, **cnn14_kwargs):
        super().__init__("Cnn14", classes_num=classes_num, freeze_base=freeze_base, **cnn14_kwargs)


def build_transfer(
    base_name: str = "Cnn14", classes_num: int = 10, freeze_base: bool = False, **base_kwargs
) -> Transfer:
    """A transfer model for `base_name`: a `TransferCnn14` for Cnn14, else a `Transfer`."""
    if base_name == "Cnn14":
        return TransferCnn14(classes_num=classes_num, freeze_base=freeze_base, **base_kwargs)
    return Transfer(base_name, classes_num=classes_num, freeze_base=freeze_base, **base_kwargs)
