"""The head's half of the frozen-base fast path: one fold's 2048 -> 10 genre head, trained
on the embeddings genreflow.embedding stored, in seconds on a CPU.

The head recipe (`genreflow.recipe.HeadConfig`, `DEFAULT_RECIPE` here):

- standardise each embedding dimension by the training folds' mean and standard deviation
  (fc1 + ReLU outputs differ in scale by orders of magnitude across dimensions, which
  makes gradient descent on raw embeddings slow and lr-sensitive); dimensions constant on
  the training folds (dead ReLUs) are left unscaled and get no weight;
- full batch (the whole training set is a few MB, and it leaves no sampling noise), AdamW
  with lr 1e-3 for 1000 steps and decoupled weight decay 1.0, the seed's clip_nll loss on
  log-softmax (genreflow.losses: the seed's own reduction, a mean over clips x genres, as
  its freeze_base mode trains fc_transfer with), a zero-initialised head (the problem is
  convex; zero keeps it deterministic). Which rows train, which choose and which are reported is
  genreflow.splits' decision (`protocol`, `selection`, as in genreflow.train): the head is
  evaluated every `eval_every` steps and the one with the best validation accuracy (ties:
  the earlier) is saved and reported on the test rows;
- afterwards the standardisation is folded into the linear layer (W' = W / std,
  b' = b - W' mean), so the saved `fc_transfer` applies to raw embeddings, exactly as the
  seed's Transfer_Cnn14 head does, and fits a `base.*` + `fc_transfer.*` checkpoint.

How it was chosen (a grid over lr, steps, weight decay and mixup on a synthetic set):
bench/README.md, "How the head's recipe was chosen".

`train_head(config)` writes `metrics.csv`, `predictions.csv`, `summary.json` in the formats
of `genreflow.fold_result` (`"path": "frozen-base"`), and `head.pth`, the selected head
(`{'iteration', 'model': {'fc_transfer.weight', 'fc_transfer.bias'}, 'genreflow'}`,
iteration = the summary's selected_iteration), each atomically. It takes seconds, so it
has no resume: a rerun trains again, with the same result. `read_head` reads a head.pth.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from genreflow import __version__
from genreflow.atomic import write_atomic
from genreflow.data.genres import GENRES
from genreflow.embedding import BASE_MODEL, EmbeddingsFile, read_embeddings
from genreflow.errors import GenreflowError
from genreflow.fold_result import (
    FROZEN_BASE,
    HEAD,
    Progress,
    summarise,
    write_metrics,
    write_predictions,
    write_summary,
)
from genreflow.losses import NAME as LOSS
from genreflow.losses import clip_nll
from genreflow.recipe import HeadConfig, check_recipe_version
from genreflow.runtime import one_thread
from genreflow.splits import Split, check_protocol, make_split, split_sha256

# A dimension whose standard deviation on the training folds is below this is treated as
# constant (a ReLU that never fires): it is not scaled, and the head learns nothing from it.
CONSTANT_STD = 1e-6
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


# The recipe: how a head is trained, not which data it sees.
DEFAULT_RECIPE = {
    field.name: field.default
    for field in dataclasses.fields(HeadConfig)
    if field.name not in ("embeddings", "fold", "out", "protocol", "selection")
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_head_config(config: HeadConfig) -> None:
    positive = {
        "iterations": config.iterations,
        "eval_every": config.eval_every,
    }
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GenreflowError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int):
        raise GenreflowError(f"batch size must be an integer, got {config.batch_size!r}")
    if config.batch_size < 0:
        raise GenreflowError(f"batch size must be 0 (full batch) or positive: {config.batch_size}")
    check_protocol(config.protocol, config.selection, config.fold)
    check_recipe_version(config.recipe_version)
    if not config.lr > 0:
        raise GenreflowError(f"learning rate must be positive, got {config.lr}")
    if not config.weight_decay >= 0:
        raise GenreflowError(f"weight decay must be >= 0, got {config.weight_decay}")
    if config.mixup and not config.mixup_alpha > 0:
        raise GenreflowError(f"mixup alpha must be positive, got {config.mixup_alpha}")


def _standardisation(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training-set mean and scale per dimension (float64); constant dimensions scale by 1."""
    mean = train.mean(axis=0, dtype=np.float64)
    std = train.std(axis=0, dtype=np.float64)
    return mean, np.where(std > CONSTANT_STD, std, 1.0)


def fold_standardisation(
    weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """W, b acting on (x - mean) / scale -> W', b' acting on raw x, in float64."""
    folded_weight = weight.astype(np.float64) / scale[None, :]
    folded_bias = bias.astype(np.float64) - folded_weight @ mean
    return folded_weight, folded_bias


def train_head(
    config: HeadConfig, *, on_evaluation: Callable[[dict], object] | None = None
) -> dict:
    """Train the genre head on stored embeddings of the training rows, keep the head that
    does best on the validation rows, report it on the test rows (genreflow.splits).

    Args:
        config: the embeddings.h5 (a path or a gs:// or http(s):// URI), the fold (cv10:
            the test fold, 1..10; filtered: the repetition, >= 1, which seeds the run with
            seed + fold - 1), the output folder and the recipe (genreflow.recipe.HeadConfig).
        on_evaluation: given each evaluation's metrics.csv row as it happens (the fold's
            live curve: genreflow.tracking.LiveLog).

    Returns:
        summary.json's content.
    """
    # Paths as text: the config is saved into head.pth, which loads with weights_only.
    config = dataclasses.replace(
        config, embeddings=os.fspath(config.embeddings), out=os.fspath(config.out)
    )
    _check_head_config(config)
    data = read_embeddings(config.embeddings)
    split = make_split(
        data.names,
        data.folds,
        protocol=config.protocol,
        fold=config.fold,
        selection=config.selection,
        source=str(data.path),
    )
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise GenreflowError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    chooser = "test rows" if split.valid_is_test else "validation"
    _log(
        f"fold {config.fold} ({config.protocol}): training the head on {len(split.train)} "
        f"embeddings, choosing on {len(split.valid)} ({chooser}),"
        f" {len(split.test)} test clips, {len(split.excluded)} excluded "
        f"(frozen base, {data.attrs.get('pretrained', '?')})"
    )

    with one_thread():
        return _train_head(config, data, split, out, on_evaluation)


def _train_head(
    config: HeadConfig,
    data: EmbeddingsFile,
    split: Split,
    out: Path,
    on_evaluation: Callable[[dict], object] | None = None,
) -> dict:
    """Reads like genreflow.train's loop: data, model, optimiser, loop, evaluation, checkpoint."""
    started = time.monotonic()
    # Data: standardised with the training rows' statistics only; the valid and test rows
    # shape nothing.
    mean, scale = _standardisation(data.embedding[split.train])
    x = torch.from_numpy(((data.embedding - mean) / scale).astype(np.float32))
    y = torch.eye(len(GENRES))[torch.from_numpy(data.targets)]
    x_train, y_train = x[split.train], y[split.train]
    # One seeded stream for mini-batches and mixup; nothing else here is random.
    seed = split.seed(config.seed)
    rng = np.random.default_rng(seed)
    full_batch = config.batch_size == 0 or config.batch_size >= len(split.train)

    # Model: a zero-initialised linear head (the problem is convex; zero keeps it
    # deterministic). Optimiser: AdamW with decoupled weight decay.
    head = nn.Linear(data.embedding.shape[1], len(GENRES))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(
        head.parameters(),
        lr=config.lr,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        weight_decay=config.weight_decay,
    )

    def accuracy_on(rows: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.inference_mode():
            probabilities = torch.softmax(head(x[rows]), dim=-1).double().numpy()
        return float(np.mean(probabilities.argmax(axis=1) == data.targets[rows])), probabilities

    progress, selected = Progress(), None
    loss_sum, loss_count = 0.0, 0
    while progress.iteration < config.iterations:
        step_start = time.monotonic()
        xb, yb = (x_train, y_train) if full_batch else _sample(x_train, y_train, rng, config)
        if config.mixup:
            xb, yb = _mix(xb, yb, rng, config.mixup_alpha)
        loss = _head_step(head, optimizer, xb, yb)
        progress.iteration += 1
        progress.clips += len(xb)
        progress.train_seconds += time.monotonic() - step_start
        loss_sum, loss_count = loss_sum + loss, loss_count + 1
        if progress.iteration % config.eval_every and progress.iteration != config.iterations:
            continue

        # Evaluation: the valid rows choose; the test rows are only watched.
        progress.seconds = time.monotonic() - started
        if progress.evaluate(
            split, accuracy_on, train_loss=loss_sum / loss_count, seconds=progress.seconds
        ):
            selected = (head.weight.detach().clone(), head.bias.detach().clone())
        loss_sum, loss_count = 0.0, 0
        if on_evaluation is not None:
            on_evaluation(progress.metrics[-1])

    # Checkpoint: the selected head, the standardisation folded into it.
    weight, bias = fold_standardisation(selected[0].numpy(), selected[1].numpy(), mean, scale)
    checkpoint = {
        "iteration": progress.best["iteration"],
        "model": {
            "fc_transfer.weight": torch.from_numpy(weight.astype(np.float32)),
            "fc_transfer.bias": torch.from_numpy(bias.astype(np.float32)),
        },
        "genreflow": _head_metadata(config, data, split, full_batch),
    }
    write_atomic(out / HEAD, lambda f: torch.save(checkpoint, f))
    return _head_report(config, data, split, out, progress, seed=seed, started=started)


def _sample(x: Tensor, y: Tensor, rng: np.random.Generator, config: HeadConfig):
    """A mini-batch of config.batch_size training rows, drawn with replacement."""
    pick = torch.from_numpy(rng.integers(len(x), size=config.batch_size))
    return x[pick], y[pick]


def _mix(x: Tensor, y: Tensor, rng: np.random.Generator, alpha: float) -> tuple[Tensor, Tensor]:
    """Each clip mixed with a random partner; the weight drawn per clip from Beta(alpha, alpha)."""
    partner = torch.from_numpy(rng.permutation(len(x)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=(len(x), 1))).to(x.dtype)
    return lam * x + (1 - lam) * x[partner], lam * y + (1 - lam) * y[partner]


def _head_step(head: nn.Linear, optimizer, x: Tensor, y: Tensor) -> float:
    """One step: the seed's clip_nll on log-softmax, backward, AdamW. Returns the loss."""
    loss = clip_nll(torch.log_softmax(head(x), dim=-1), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _head_metadata(config: HeadConfig, data: EmbeddingsFile, split: Split, full_batch: bool):
    """What head.pth says about itself, beside the seed's {'iteration', 'model'}."""
    return {
        "path": FROZEN_BASE,
        "genres": list(GENRES),
        "fold": config.fold,
        "protocol": split.protocol,
        "selection": split.selection,
        "base_model": BASE_MODEL,
        "base_sha256": data.attrs["base_sha256"],
        "pretrained": data.attrs.get("pretrained", ""),
        # The features the embeddings were made from (genreflow.features.FeaturesFingerprint).
        "features": _features_of(data),
        "sample_rate": data.attrs.get("sample_rate"),
        "clip_samples": data.attrs.get("clip_samples"),
        "source_sha256": data.attrs.get("source_sha256", "") or "",
        "n_train": int(len(split.train)),
        "config": dataclasses.asdict(config),
        "recipe": {
            "trains": "fc_transfer only, on embeddings of the frozen base (eval mode)",
            "optimizer": "AdamW",
            "betas": list(ADAM_BETAS),
            "eps": ADAM_EPS,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "batch_size": "full" if full_batch else config.batch_size,
            "iterations": config.iterations,
            "mixup": "embeddings" if config.mixup else "none",
            "mixup_alpha": config.mixup_alpha if config.mixup else None,
            "loss": LOSS,
            "standardisation": "training rows' mean/std, folded into fc_transfer",
            "selection": f"best {'test' if split.valid_is_test else 'validation'} accuracy",
        },
        "genreflow_version": __version__,
    }


def _features_of(data: EmbeddingsFile) -> dict | None:
    """The fingerprint of the features the embeddings were made from; None for an
    embeddings file that records none (one not written by embed_features)."""
    recorded = data.attrs.get("features_fingerprint")
    return json.loads(recorded) if recorded else None


def _head_report(
    config: HeadConfig,
    data: EmbeddingsFile,
    split: Split,
    out: Path,
    progress: Progress,
    *,
    seed: int,
    started: float,
) -> dict:
    """metrics.csv, predictions.csv (the selected head on the test rows), summary.json."""
    test = split.test
    write_metrics(out, progress.metrics)
    probabilities = progress.best["test_probabilities"]
    names = [data.names[row] for row in test]
    write_predictions(out, names, data.targets[test], probabilities, config.fold)
    summary = summarise(
        split=split,
        progress=progress,
        test_targets=data.targets[test],
        fold=config.fold,
        path=FROZEN_BASE,
        iterations=config.iterations,
        split_sha256=split_sha256(split.protocol),
        data_sha256=str(data.attrs.get("source_sha256", "") or ""),
        seeds={"config": config.seed, "sampler": seed},
        clips_per_second=progress.clips / progress.train_seconds if progress.train_seconds else 0.0,
        wall_seconds=time.monotonic() - started,
        device="cpu",
        base_sha256=data.attrs["base_sha256"],
        pretrained=data.attrs.get("pretrained", ""),
        config=dataclasses.asdict(config),
        genreflow_version=__version__,
    )
    summary = write_summary(out, summary)
    _log(
        f"fold {config.fold}: done, test accuracy {summary['final_accuracy']:.3f} of the head "
        f"of step {summary['selected_iteration']} (chosen on "
        f"{'the test rows' if split.valid_is_test else 'validation'}), {config.iterations} "
        f"steps in {summary['wall_seconds']:.2f} s; outputs in {out}"
    )
    return summary


def read_head(path: str | os.PathLike) -> tuple[Tensor, Tensor, dict]:
    """(weight (10, 2048), bias (10,), metadata) of a head.pth written by `train_head`."""
    from genreflow.models.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(path)
    state, metadata = checkpoint["model"], checkpoint.get("genreflow") or {}
    if set(state) != {"fc_transfer.weight", "fc_transfer.bias"}:
        raise GenreflowError(
            f"{path}: not a head from train-head: expected the keys fc_transfer.weight and "
            f"fc_transfer.bias, found {sorted(state)[:8]}"
        )
    weight, bias = state["fc_transfer.weight"], state["fc_transfer.bias"]
    if weight.dim() != 2 or weight.shape[0] != len(GENRES) or bias.shape != (len(GENRES),):
        raise GenreflowError(
            f"{path}: fc_transfer has shape {tuple(weight.shape)} / {tuple(bias.shape)}, "
            f"expected ({len(GENRES)}, D) / ({len(GENRES)},)"
        )
    if metadata.get("genres") != list(GENRES):
        raise GenreflowError(
            f"{path}: genres {metadata.get('genres')} differ from genreflow's {list(GENRES)}"
        )
    return weight.float(), bias.float(), metadata
