"""The fold models as one module: waveforms in, the folds' averaged genre probabilities out.

- `load_ensemble(checkpoints)`: fine-tuned transfer checkpoints (genreflow.train), as a
  `TransferEnsemble`; `load_ensemble(heads, base=...)` (or `load_head_ensemble`): the
  frozen-base path's base.pth and head.pth files (genreflow.embedding, genreflow.head), as
  a `FrozenBaseEnsemble`, which runs the base once per clip for every head. What serves
  the pipeline's model (genreflow.serving) and `genreflow predict` load.
- `export_transfer_checkpoint(base, head, out)`: one frozen-base fold's model as a whole
  transfer checkpoint (`base.*` + `fc_transfer.*`), for tools that take one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from genreflow import storage
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.head import read_head


def load_fine_tuned(checkpoint: str, device: torch.device) -> tuple[nn.Module, dict, list[str]]:
    """A fine-tuned transfer model in eval mode, its metadata and the genres it names."""
    from genreflow.models.checkpoints import load_transfer_model

    model, metadata = load_transfer_model(checkpoint, device=device)
    # The seed's checkpoints carry no metadata; their genre order is GTZAN's, ours.
    genres = [str(g) for g in metadata.get("genres", GENRES)]
    classes = model.fc_transfer.out_features
    if len(genres) != classes:
        raise GenreflowError(
            f"{checkpoint}: its head has {classes} classes but it names {len(genres)} genres"
        )
    return model, metadata, genres


def check_same_genres(checkpoint: str, genres: list[str], first: str, expected: list[str]):
    if genres != expected:
        raise GenreflowError(
            f"{checkpoint}: genres {genres} differ from {first}'s {expected}; "
            "an ensemble needs one genre order"
        )


class TransferEnsemble(nn.Module):
    """Fine-tuned fold models as one module: waveforms -> their averaged probabilities.

    Always in eval mode (no dropout, no SpecAugment), whatever the caller asks.
    """

    def __init__(self, models: Sequence[nn.Module], metadata: Sequence[dict], genres: list[str]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.metadata = list(metadata)
        self.genres = list(genres)
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TransferEnsemble:
        return super().train(False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(batch, samples) float32 at 32 kHz -> (batch, genres) averaged probabilities."""
        return torch.stack([m(waveform)["clipwise_output"].exp() for m in self.models]).mean(0)


def load_ensemble(
    checkpoints: Sequence[str | os.PathLike],
    *,
    base: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The fold models as one module mapping (batch, samples) waveforms to (batch, genres)
    probabilities, averaged over the folds; every model is held in memory (a Cnn14 is
    330 MB), unlike `predict`, which loads one at a time.

    Args:
        checkpoints: fine-tuned transfer checkpoints; or, with `base`, the head.pth files
            of the frozen-base path (genreflow.head), all trained on that base.
        base: the frozen-base path's base.pth.
        device: where the module lives.
    """
    checkpoints = [os.fspath(c) for c in checkpoints]
    if not checkpoints:
        raise GenreflowError("an ensemble needs at least one checkpoint")
    if base is not None:
        return load_head_ensemble(base, checkpoints, device=device)
    models, metadata, genres = [], [], None
    for checkpoint in checkpoints:
        model, meta, names = load_fine_tuned(checkpoint, torch.device(device))
        genres = genres or names
        check_same_genres(checkpoint, names, checkpoints[0], genres)
        models.append(model)
        metadata.append(meta)
    return TransferEnsemble(models, metadata, genres)


class FrozenBaseEnsemble(nn.Module):
    """The frozen base and the fold heads: waveforms -> genre probabilities.

    The base runs once per clip; each head turns the embedding into probabilities and the
    heads' probabilities are averaged (the 10 fold models as one ensemble). Always in eval
    mode: the base's dropout and SpecAugment never switch on.
    """

    def __init__(self, base: nn.Module, heads: Sequence[nn.Linear], metadata: Sequence[dict]):
        super().__init__()
        if not heads:
            raise GenreflowError("an ensemble needs at least one head")
        self.base = base
        self.heads = nn.ModuleList(heads)
        self.metadata = list(metadata)
        self.genres = list(GENRES)
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBaseEnsemble:
        # Inference only: keep the base's dropout and SpecAugment off whatever the caller asks.
        return super().train(False)

    def embed(self, waveform: Tensor) -> Tensor:
        """(batch, samples) float32 at 32 kHz -> (batch, 2048) embeddings."""
        return self.base(waveform)["embedding"]

    def head_probabilities(self, embedding: Tensor) -> Tensor:
        """(batch, 2048) embeddings -> (heads, batch, genres) probabilities."""
        return torch.stack([torch.softmax(head(embedding), dim=-1) for head in self.heads])

    def forward(self, waveform: Tensor) -> Tensor:
        """(batch, samples) float32 at 32 kHz -> (batch, genres) averaged probabilities."""
        return self.head_probabilities(self.embed(waveform)).mean(dim=0)


def load_head_ensemble(
    base_path: str | os.PathLike,
    head_paths: Sequence[str | os.PathLike],
    *,
    device: str | torch.device = "cpu",
) -> FrozenBaseEnsemble:
    """The base.pth from `embed_features` and head.pth files from `train_head`, as one
    module; every head must have been trained on embeddings of this very base.

    Raises:
        GenreflowError: a missing or foreign file, or a head trained on another base.
    """
    from genreflow.models.checkpoints import load_pretrained
    from genreflow.models.cnn14 import Cnn14

    head_paths = list(head_paths)
    if not head_paths:
        raise GenreflowError("load_head_ensemble: no head files given")
    base_file = Path(base_path)
    if not base_file.is_file():
        raise GenreflowError(f"{base_file}: base checkpoint not found")
    base_sha256 = storage.sha256_of(base_file)
    heads, metadata = [], []
    for path in head_paths:
        weight, bias, meta = read_head(path)
        if meta.get("base_sha256") != base_sha256:
            raise GenreflowError(
                f"{path}: trained on embeddings of the base with sha256 "
                f"{meta.get('base_sha256')}, not of {base_file} (sha256 {base_sha256})"
            )
        head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        heads.append(head)
        metadata.append(meta)
    base = Cnn14()
    load_pretrained(base, base_file, sha256=base_sha256)
    if base.embedding_size != heads[0].in_features:
        raise GenreflowError(
            f"{head_paths[0]}: head reads {heads[0].in_features}-d embeddings, "
            f"the base makes {base.embedding_size}-d ones"
        )
    return FrozenBaseEnsemble(base, heads, metadata).to(device)


def export_transfer_checkpoint(
    base_path: str | os.PathLike, head_path: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Write base.pth + head.pth as one checkpoint in the seed's transfer form
    (`{'iteration', 'model': base.* + fc_transfer.*, 'genreflow'}`), which
    `load_transfer_model` and everything built on it read like any fine-tuned fold.

    Raises:
        GenreflowError: a missing or foreign file, or a head trained on another base.
    """
    from genreflow.models.checkpoints import load_pretrained, save_checkpoint
    from genreflow.models.transfer import TransferCnn14

    base_file = Path(base_path)
    if not base_file.is_file():
        raise GenreflowError(f"{base_file}: base checkpoint not found")
    base_sha256 = storage.sha256_of(base_file)
    weight, bias, metadata = read_head(head_path)
    if metadata.get("base_sha256") != base_sha256:
        raise GenreflowError(
            f"{head_path}: trained on embeddings of the base with sha256 "
            f"{metadata.get('base_sha256')}, not of {base_file} (sha256 {base_sha256})"
        )
    model = TransferCnn14(classes_num=len(GENRES), freeze_base=True)
    load_pretrained(model, base_file, sha256=base_sha256)
    with torch.no_grad():
        model.fc_transfer.weight.copy_(weight)
        model.fc_transfer.bias.copy_(bias)
    iteration = int(torch.load(head_path, weights_only=True).get("iteration", 0))
    save_checkpoint(out, model, iteration=iteration, metadata=metadata)
    return Path(out)
