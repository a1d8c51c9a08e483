"""One fold: fine-tune Cnn14 on the training rows, choose the checkpoint, report on the test rows.

Reads top to bottom like nanoGPT's train.py: config, data, model, optimiser, loop,
evaluation, checkpoint; it is one file past the 600 lines a module keeps to for that
reason, so that the loop is read in one place. The defaults are the recipe of the seed
(qiuqiangkong/panns_transfer_to_gtzan, pytorch/main.py and runme.sh): Adam with lr 1e-4,
betas (0.9, 0.999), eps 1e-8, no weight decay, amsgrad; batch 32; mixup with alpha 1 on
pairs of clips (the sampler draws twice the batch and the model mixes them two by two);
the clip_nll loss (genreflow.losses: a mean over batch x classes, as the seed's);
evaluation every 200 iterations; 10000 iterations.

Which rows train, which choose the checkpoint and which are reported is genreflow.splits'
decision (`protocol`, `selection`): by default 10-fold CV with fold K reported and the
next fold held back to choose the checkpoint on, so no test clip takes part in the
choice. selection "heldout" chooses on fold K itself, as the seed did; protocol
"filtered" uses the fault-filtered lists (fold = repetition, seed + fold - 1).

What it writes to `out/`, each file atomically (temporary file, then os.replace):

- `last.pth`, `best.pth`: the seed's transfer form `{'iteration', 'model'}` plus our
  metadata under `'genreflow'`. `best.pth` is the selected checkpoint: the best
  validation accuracy (ties: the earlier one); `last.pth` the final model.
- `metrics.csv`: iteration, train_loss (mean since the previous evaluation),
  valid_accuracy (what chooses), test_accuracy (the test rows, watched only), seconds
  (wall time since the run began, resumes included).
- `predictions.csv`: the test rows as best.pth classifies them, one row per clip:
  audio_name, fold (the run's fold), genre, then one probability column per genre in
  GENRES order.
- `summary.json`: fold, path, protocol, selection, iterations, final_accuracy (best.pth
  on the test rows: the number to report), valid_accuracy and selected_iteration (of
  best.pth), peak_test_accuracy and peak_test_iteration (the highest test accuracy seen
  during training: the seed's optimistic number, never a result), n_train, n_test (test
  rows), split (genreflow.splits.Split.counts), split_sha256, data_sha256 (the packed
  file's source_sha256), seeds (every seed the run used), clips_per_second (clips drawn
  per second of training steps, forward + backward + Adam; with mixup two clips make one
  example), wall_seconds, device, precision, config, features (a fingerprint),
  genreflow_version.
- `resume.pt`, while the run goes on: everything a resume needs (model, optimiser,
  sampler position, every random state, metrics so far), written last at an evaluation,
  the first one and then every `resume_every_seconds` (genreflow.resume). Killed at any
  moment, the same command continues from it and ends exactly where an uninterrupted run
  would (bit for bit on the CPU). summary.json marks a finished run; resume.pt is removed
  then, and the same command does nothing.

For a gs:// output the checkpoints are uploaded in the background (genreflow.publisher):
the loop never waits for the network, only the fold's end does. The end of each run logs
where its wall time went (data, steps, evaluation, checkpoint writes, the wait for the
uploads: `PhaseClock`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from genreflow import __version__, resume, storage
from genreflow.atomic import publish_copy
from genreflow.audio import SAMPLE_RATE
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.features import FeaturesFingerprint, features_fingerprint, read_index
from genreflow.fold_result import (
    BEST,
    FINE_TUNE,
    METRICS,
    PREDICTIONS,
    SUMMARY,
    Progress,
    summarise,
    write_metrics,
    write_predictions,
    write_summary,
)
from genreflow.losses import NAME as LOSS
from genreflow.losses import clip_nll
from genreflow.progress import format_duration
from genreflow.publisher import Publisher, UploadStats
from genreflow.recipe import TrainConfig, check_recipe_version
from genreflow.resume import RESUME
from genreflow.runtime import (
    PRECISIONS,
    autocast_for,
    cpu_threads_for_training,
    freed_memory_kept,
    resolve_device,
    resolve_precision,
)
from genreflow.splits import (
    DEFAULT_PROTOCOL,
    DEFAULT_SELECTION,
    Split,
    check_protocol,
    make_split,
    split_sha256,
)

LAST = "last.pth"

# The seed's optimiser, spelled out so that it lands in every checkpoint's metadata.
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": True}


# --- config ------------------------------------------------------------------------------
# TrainConfig (genreflow.recipe) is the one plain structure a run is told everything by.
def _check_config(config: TrainConfig) -> None:
    positive = {
        "--iterations": config.iterations,
        "--eval-every": config.eval_every,
        "--batch-size": config.batch_size,
        "log_every": config.log_every,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise GenreflowError(f"{name} must be a whole number >= 1, got {value!r}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise GenreflowError(f"--lr must be a positive number, got {config.lr!r}")
    every = config.resume_every_seconds
    if not (isinstance(every, (int, float)) and math.isfinite(every) and every >= 0):
        raise GenreflowError(f"--resume-every-seconds must be a number >= 0, got {every!r}")
    if config.mixup and not config.mixup_alpha > 0:
        raise GenreflowError(f"mixup_alpha must be > 0, got {config.mixup_alpha!r}")
    if config.precision not in PRECISIONS:
        raise GenreflowError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}"
        )
    check_protocol(config.protocol, config.selection, config.fold)
    check_recipe_version(config.recipe_version)


# --- data --------------------------------------------------------------------------------
@dataclass
class FoldIndex:
    """What the HDF5 index says, and the run's split of its rows."""

    names: list[str]
    targets: np.ndarray  # (N,) int label indices
    folds: np.ndarray  # (N,) int
    attrs: dict
    split: Split
    # Recorded in every checkpoint, summary.json and resume.pt: a resume must read the
    # very features its run started on.
    fingerprint: FeaturesFingerprint

    @property
    def train_rows(self) -> np.ndarray:
        return self.split.train

    @property
    def clip_samples(self) -> int:
        return int(self.attrs["clip_samples"])

    @property
    def representation(self) -> str:
        """What the file holds its clips as: "waveform" or "logmel" (genreflow.features)."""
        return str(self.attrs["representation"])

    @property
    def data_sha256(self) -> str:
        """The checksum of the archive the features were packed from ("" when unknown)."""
        return str(self.attrs.get("source_sha256", "") or "")


def read_fold_index(
    features: str,
    fold: int,
    *,
    protocol: str = DEFAULT_PROTOCOL,
    selection: str = DEFAULT_SELECTION,
) -> FoldIndex:
    """Read the features file's index and split it (genreflow.splits.make_split); every
    check happens here, before training."""
    names, targets, folds, attrs = read_index(features)
    fingerprint = features_fingerprint(names, targets, folds, attrs)
    targets = np.asarray(targets, dtype=np.int64)
    folds = np.asarray(folds, dtype=np.int64)
    if int(attrs["sample_rate"]) != SAMPLE_RATE:
        raise GenreflowError(
            f"{features}: packed at {attrs['sample_rate']} Hz, but Cnn14 and its pretrained "
            f"weights expect {SAMPLE_RATE} Hz; pack the dataset again"
        )
    names = [str(n) for n in names]
    split = make_split(
        names, folds, protocol=protocol, fold=fold, selection=selection, source=features
    )
    return FoldIndex(names, targets, folds, attrs, split, fingerprint)


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PackedClips:
    """The packed clips of the given rows (int16 waveforms or float16 log-mel, as the file
    holds them), read from the HDF5 file once.

    They are held in memory when they take at most `max_memory_bytes` (default: half of
    what the machine has available); otherwise one handle stays open and each batch reads
    its rows in sorted order, which is what h5py needs for a fancy-indexed read.
    """

    def __init__(self, features: str, rows: np.ndarray, *, max_memory_bytes: int | None = None):
        from genreflow.features import representation_of

        self.rows = np.unique(np.asarray(rows, dtype=np.int64))
        self._file = h5py.File(features, "r")
        self.representation = representation_of(self._file, features)
        dataset = self._file[self.representation]
        if max_memory_bytes is None:
            max_memory_bytes = _available_memory_bytes() // 2
        row_shape = dataset.shape[1:]
        needed = len(self.rows) * int(np.prod(row_shape)) * dataset.dtype.itemsize
        self._memory: np.ndarray | None = None
        self._dataset = dataset
        if needed <= max_memory_bytes:
            self._memory = np.empty((len(self.rows), *row_shape), dtype=dataset.dtype)
            # Chunks keep the peak at one copy of the clips plus one chunk.
            step = 64
            for start in range(0, len(self.rows), step):
                self._memory[start : start + step] = dataset[self.rows[start : start + step]]
            self.close()

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self._memory is not None:
            return self._memory[np.searchsorted(self.rows, rows)]
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._dataset[unique][inverse]

    def on_device(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """The clips of `rows` as the model takes them, on `device`."""
        from genreflow.features import model_input

        return model_input(self.representation, self[rows], device)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._dataset = None


class EpochSampler:
    """The seed's training sampler: a shuffled epoch order, reshuffled when it runs out.

    It has its own seeded generator and keeps its position, so a resume continues the
    same sequence of batches. (The seed's sampler advances its pointer before reading it,
    so its first epoch skips one clip; this one does not.)
    """

    def __init__(self, rows: np.ndarray, seed: int):
        self.generator = np.random.default_rng(seed)
        self.order = self.generator.permutation(np.asarray(rows, dtype=np.int64))
        self.position = 0

    def next_batch(self, size: int) -> np.ndarray:
        batch = np.empty(size, dtype=np.int64)
        for i in range(size):
            if self.position >= len(self.order):
                self.generator.shuffle(self.order)
                self.position = 0
            batch[i] = self.order[self.position]
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "order": torch.from_numpy(self.order.copy()),
            "position": self.position,
            "generator": self.generator.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.order = state["order"].numpy().astype(np.int64)
        self.position = int(state["position"])
        self.generator.bit_generator.state = state["generator"]


# --- model and optimiser -----------------------------------------------------------------
def prepare_for_training(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """Move the model to `device` in train mode, in the memory format that is fastest there."""
    model.to(device)
    model.train()
    if device.type == "cuda":
        # Every batch has the same shape: let cuDNN pick its fastest kernels once.
        torch.backends.cudnn.benchmark = True
        if precision == "bf16":
            # Tensor cores read NHWC: channels_last saves a transpose around every conv
            # (the documented expectation: PyTorch's channels-last tutorial, NVIDIA's cuDNN
            # convolution performance guide). Not yet measured on a GPU here: `make
            # gpu-check` (bench/gpu_check.py, DEFAULT_ON_CUDA) times this against fp32,
            # plain bf16 and torch.compile and says which wins. On the CPU it gave nothing
            # (0.8-1.0x, bench/README.md), so the CPU keeps the default format.
            model.to(memory_format=torch.channels_last)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """The seed's Adam over the trainable parameters (a frozen base adds none), fused:
    one kernel over every parameter instead of a dozen passes over each tensor (0.06 s
    instead of the for-loop's 0.26 s for Cnn14's 81 M parameters on 2 cores)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(trainable, lr=lr, **ADAM, fused=True)
    except RuntimeError:  # torch before 2.4 fuses on CUDA only: the same update, slower
        return torch.optim.Adam(trainable, lr=lr, **ADAM)


def training_step(model, optimizer, batch, target, mixup_lambda, amp) -> torch.Tensor:
    """One step of the seed's recipe: forward (mixing clips two by two when mixup_lambda
    is given), clip_nll on the (mixed) one-hot targets, backward, Adam. Returns the loss."""
    from genreflow.models.cnn14 import do_mixup

    with amp():
        output = model(batch, mixup_lambda)
    if mixup_lambda is not None:
        target = do_mixup(target, mixup_lambda)
    loss = clip_nll(output["clipwise_output"], target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


# --- evaluation --------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(model, clips: PackedClips, rows: np.ndarray, *, batch_size: int, device, amp):
    """Per-clip genre probabilities (len(rows), len(GENRES)) of the model in eval mode."""
    was_training = model.training
    model.eval()
    probabilities = []
    for start in range(0, len(rows), batch_size):
        batch = clips.on_device(rows[start : start + batch_size], device)
        with amp():
            log_probs = model(batch)["clipwise_output"]
        probabilities.append(normalized_probabilities(log_probs))
    model.train(was_training)
    return np.concatenate(probabilities)


def normalized_probabilities(log_probs: torch.Tensor) -> np.ndarray:
    """float64 probabilities whose rows sum to 1 (to float64 rounding), from log-softmax
    output in any dtype: written as text, they must pass aggregate's sum check."""
    probabilities = log_probs.detach().double().exp().cpu().numpy()
    return probabilities / probabilities.sum(axis=1, keepdims=True)


# --- checkpoint --------------------------------------------------------------------------
def _metadata(config: TrainConfig, index: FoldIndex) -> dict:
    """What a checkpoint says about itself, beside the seed's {'iteration', 'model'}."""
    return {
        "genres": list(GENRES),
        "sample_rate": SAMPLE_RATE,
        "clip_samples": index.clip_samples,
        "fold": config.fold,
        # The checkpoint is logged and registered: its URIs without signatures or passwords.
        "config": storage.redacted_values(dataclasses.asdict(config)),
        "recipe": {
            "model": "TransferCnn14",
            "optimizer": "Adam",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in ADAM.items()},
            "loss": LOSS,
        },
        "features": index.fingerprint.as_dict(),
        "genreflow_version": __version__,
    }


def _load_pretrained_checked(config: TrainConfig, model, index: FoldIndex) -> None:
    """Load --pretrained into the model; a checkpoint of ours must match the features."""
    from genreflow.models.checkpoints import load_checkpoint, load_pretrained

    # Published checkpoints carry no audio metadata (Cnn14 takes any clip length); ours
    # and fine-tuned ones say what they were trained on.
    metadata = load_checkpoint(config.pretrained, sha256=config.pretrained_sha256).get("genreflow")
    if isinstance(metadata, dict):
        model_config = metadata.get("model_config") or {}
        expected = {
            "sample_rate": metadata.get("sample_rate", model_config.get("sample_rate")),
            "clip_samples": metadata.get("clip_samples"),
        }
        have = {"sample_rate": int(index.attrs["sample_rate"]), "clip_samples": index.clip_samples}
        for key, want in expected.items():
            if want is not None and int(want) != have[key]:
                raise GenreflowError(
                    f"{config.pretrained}: was trained with {key} {want}, but "
                    f"{config.features} has {key} {have[key]}; pack the features to match"
                )
    load_pretrained(model, config.pretrained, sha256=config.pretrained_sha256)


def _build_model(config: TrainConfig, index: FoldIndex, seed: int, *, pretrained: bool):
    """The transfer model, seeded (torch and Python) so that two runs of one config start
    from the same weights; --pretrained loaded unless `pretrained` is False (a resume)."""
    from genreflow.models.transfer import TransferCnn14

    torch.manual_seed(seed)
    random.seed(seed)
    model = TransferCnn14(classes_num=len(GENRES), freeze_base=config.freeze_base)
    if index.clip_samples < model.base.min_training_samples:
        raise GenreflowError(
            f"{config.features}: clips of {index.clip_samples} samples are too short to train "
            f"Cnn14 (SpecAugment needs at least {model.base.min_training_samples})"
        )
    if pretrained and config.pretrained:
        _load_pretrained_checked(config, model, index)
    return model


# --- the run -----------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_fold(
    config: TrainConfig,
    *,
    on_evaluation: Callable[[dict], object] | None = None,
    clock: PhaseClock | None = None,
) -> dict:
    """Train one fold and write its outputs to config.out; returns summary.json's content.
    `on_evaluation` is given each evaluation's metrics.csv row as it happens (the fold's
    live curve: genreflow.tracking.LiveLog); `clock`, when given, is the PhaseClock the run
    fills in (where this start's wall time went; `make gpu-check` reads it).

    Rerun with the same config after an interruption, it resumes from the last
    checkpoint; rerun after it finished, it does nothing and returns the summary.

    config.features may be a gs:// (or http(s)://) URI: it is downloaded once into the
    cache. config.out may be gs://BUCKET/PREFIX: the run works in a local folder in the
    cache kept for that URI (so a rerun on the same machine resumes from it), uploads
    resume.pt (and best.pth when it changed) whenever it writes a resume state, in the
    background (genreflow.publisher: training goes on meanwhile, the end waits for it), and
    uploads every output, summary.json last, when it ends. A rerun that finds no local
    state, such as a pod rescheduled onto another node, first pulls what the prefix holds:
    a finished run's summary.json, else resume.pt and best.pth.
    """
    clock = clock or PhaseClock()
    with storage.output_folder(config.out, commit=SUMMARY, transient=(RESUME,)) as folder:
        if folder.uri is not None and not any(
            (folder.path / name).is_file() for name in (SUMMARY, RESUME)
        ):
            _log(f"fold {config.fold}: no local state in {folder.path}; looking in {folder.uri}")
            if not folder.pull(SUMMARY) and folder.pull(RESUME):
                folder.pull(BEST)
        with cpu_threads_for_training(), freed_memory_kept(), Publisher(folder) as publisher:
            summary = _train_fold_in(
                config,
                folder.path,
                on_checkpoint=publisher.submit,
                on_evaluation=on_evaluation,
                clock=clock,
            )
            with clock.timing("upload_wait"):
                publisher.close()  # a failed upload fails the try; summary.json is written
        clock.uploads = publisher.stats
        if clock.trained:
            _log(f"fold {config.fold}: {clock.line()}")
        return summary


def _train_fold_in(
    config: TrainConfig,
    out: Path,
    on_checkpoint: Callable[..., object] | None = None,
    on_evaluation: Callable[[dict], object] | None = None,
    clock: PhaseClock | None = None,
) -> dict:
    """train_fold, writing to the local folder `out`; on_checkpoint(*names) is called with
    the files each resume state vouches for, the commit point (resume.pt) last: best.pth
    when it changed since the last call, and resume.pt."""
    clock = clock or PhaseClock()
    from genreflow.features import check_fits_model
    from genreflow.models.checkpoints import save_checkpoint
    from genreflow.models.cnn14 import Mixup

    # Config: every check that can fail happens before the first step.
    _check_config(config)
    features = str(storage.input_path(config.features))
    index = read_fold_index(
        features, config.fold, protocol=config.protocol, selection=config.selection
    )
    fingerprint = index.fingerprint.as_dict()
    device = resolve_device(config.device)
    finished, saved = _existing_run(config, out, fingerprint)
    if finished is not None:
        return finished

    # Data: the index is read; now the clips of the split, once.
    split = index.split
    seed = split.seed(config.seed)
    clips = PackedClips(features, np.concatenate([split.train, split.valid, split.test]))
    one_hot = np.eye(len(GENRES), dtype=np.float32)[index.targets]
    sampler = EpochSampler(split.train, seed)
    mixup = Mixup(config.mixup_alpha, seed=seed + 1) if config.mixup else None
    clips_per_step = config.batch_size * 2 if config.mixup else config.batch_size

    # Model: seeded so that two runs of one config start from the same weights.
    model = _build_model(config, index, seed, pretrained=saved is None)
    precision = resolve_precision(config.precision, device)
    prepare_for_training(model, device, precision)
    amp = autocast_for(device, precision)

    # Optimiser.
    optimizer = make_optimizer(model, config.lr)

    progress = Progress()
    if saved is not None:
        progress = resume.restore(
            saved, model=model, optimizer=optimizer, sampler=sampler, mixup=mixup
        )
        _log(f"fold {config.fold}: resuming from iteration {progress.iteration} in {out}")
    del saved
    # Packed log-mel must come from the model's own front end, as loaded or resumed.
    check_fits_model(features, index.attrs, model)
    out.mkdir(parents=True, exist_ok=True)
    metadata = _metadata(config, index)
    _log_start(config, index, seed, device, precision, clips)

    def accuracy_on(rows: np.ndarray) -> tuple[float, torch.Tensor]:
        probabilities = evaluate(
            model, clips, rows, batch_size=config.batch_size, device=device, amp=amp
        )
        accuracy = float(np.mean(probabilities.argmax(1) == index.targets[rows]))
        return accuracy, torch.from_numpy(probabilities)

    seconds_before, started, started_at = progress.seconds, time.monotonic(), progress.iteration
    loss_sum, loss_count = 0.0, 0
    rate = _Rate()
    resumable_at = None  # when this start last wrote the resume state (None: not yet)
    best_changed = (out / BEST).is_file()  # a resumed run sends its best.pth once more
    while progress.iteration < config.iterations:
        # One step of the seed's recipe.
        step_start = time.monotonic()
        with clock.timing("data"):
            rows = sampler.next_batch(clips_per_step)
            batch = clips.on_device(rows, device)
            target = torch.from_numpy(one_hot[rows]).to(device)
            mixup_lambda = _mixup_weights(mixup, clips_per_step, device)
        with clock.timing("steps"):  # .item() waits for the GPU: the step's whole time
            loss = training_step(model, optimizer, batch, target, mixup_lambda, amp).item()
        clock.clips += clips_per_step
        progress.iteration += 1
        progress.train_seconds += time.monotonic() - step_start
        progress.clips += clips_per_step
        loss_sum, loss_count = loss_sum + loss, loss_count + 1
        rate.count(clips_per_step)
        last = progress.iteration == config.iterations
        if progress.iteration % config.log_every == 0 or last:
            # Evaluations included: the wall time per iteration so far, times those left.
            done = progress.iteration - started_at
            left = (time.monotonic() - started) / done * (config.iterations - progress.iteration)
            _log(
                f"fold {config.fold} iter {progress.iteration}/{config.iterations} "
                f"loss {loss:.4f} {rate.per_second():.1f} clips/s, {format_duration(left)} left"
            )
        if progress.iteration % config.eval_every != 0 and not last:
            continue

        # Evaluation: the valid rows choose, the test rows are watched.
        progress.seconds = seconds_before + time.monotonic() - started
        with clock.timing("evaluation"):
            improved = progress.evaluate(
                split, accuracy_on, train_loss=loss_sum / loss_count, seconds=progress.seconds
            )
        loss_sum, loss_count = 0.0, 0
        _log_evaluation(config.fold, progress)
        if on_evaluation is not None:
            on_evaluation(progress.metrics[-1])

        # Checkpoint. The commit point is resume.pt while the run goes on and summary.json
        # at the end: each is written after everything it vouches for, and whatever a
        # killed run wrote past its last commit point is rewritten identically on resume
        # (best.pth put back as resume.pt knew it: genreflow.resume).
        with clock.timing("checkpoint"):
            write_metrics(out, progress.metrics)
            save_checkpoint(out / LAST, model, iteration=progress.iteration, metadata=metadata)
            if improved:
                publish_copy(out / LAST, out / BEST)
                best_changed = True
            due = resumable_at is None or (
                time.monotonic() - resumable_at >= config.resume_every_seconds
            )
            if not last and due:
                state = resume.state(
                    progress, model, optimizer, sampler, mixup, config, fingerprint
                )
                resume.save(out, state)
                del state
                resumable_at = time.monotonic()
                if on_checkpoint is not None:
                    on_checkpoint(*([BEST] if best_changed else []), RESUME)
                best_changed = False
        rate.restart()  # the logged rate is of training steps, not of checkpointing

    clips.close()
    return _report(config, out, index, progress, seed=seed, device=device, precision=precision)


def _existing_run(
    config: TrainConfig, out: Path, fingerprint: dict
) -> tuple[dict | None, dict | None]:
    """What `out` holds of this run: (summary.json's content, None) when it finished,
    (None, resume.pt's content) when it was interrupted, (None, None) when it is new."""
    if out.exists() and not out.is_dir():
        raise GenreflowError(f"{out}: exists and is not a folder")
    finished = resume.finished_run(out, config, fingerprint)
    if finished is not None:
        # Killed between writing summary.json and removing resume.pt: finish the job.
        resume.discard(out)
        _log(f"fold {config.fold}: already trained to iteration {config.iterations} in {out}")
        return finished, None
    saved = resume.load(out, config, fingerprint)
    kept_best = resume.KEPT_BEST.format(iteration="*")
    resume.remove_partial_writes(
        out, (LAST, BEST, RESUME, METRICS, PREDICTIONS, SUMMARY, kept_best)
    )
    if saved is not None:
        resume.restore_best(out, saved)
    return None, saved


def _mixup_weights(mixup, clips: int, device: torch.device) -> torch.Tensor | None:
    """The batch's mixup weights (pairs of clips, lam and 1 - lam), or None without mixup."""
    if mixup is None:
        return None
    return torch.from_numpy(mixup.get_lambda(clips).astype(np.float32)).to(device)


def _seeds(config: TrainConfig, seed: int) -> dict:
    """Every seed the run uses, for summary.json."""
    seeds = {"config": config.seed, "torch": seed, "python": seed, "sampler": seed}
    if config.mixup:
        seeds["mixup"] = seed + 1
    return seeds


PHASES = ("data", "steps", "evaluation", "checkpoint", "upload_wait")


@dataclass
class PhaseClock:
    """Where one start of a run spends its wall time (a resumed run's earlier starts are
    not counted): seconds in each of PHASES (reading and moving batches, the training
    steps, evaluations, writing checkpoints, the fold's end waiting for its uploads), the
    clips drawn, and what the background uploads did."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    clips: int = 0
    uploads: UploadStats = field(default_factory=UploadStats)
    started: float = field(default_factory=time.monotonic)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] += time.monotonic() - began

    @property
    def trained(self) -> bool:
        return self.clips > 0

    def wall_seconds(self) -> float:
        return time.monotonic() - self.started

    def shares(self) -> dict[str, float]:
        """Each phase's fraction of the wall time so far; "other" is the rest (loading the
        data and the model, the report)."""
        wall = max(self.wall_seconds(), 1e-9)
        shares = {phase: seconds / wall for phase, seconds in self.seconds.items()}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares

    def line(self) -> str:
        """The log line: clips/s over the wall time, the shares, the uploads."""
        wall = self.wall_seconds()
        shares = ", ".join(f"{share:.0%} {phase}" for phase, share in self.shares().items())
        up = self.uploads
        return (
            f"{wall:.1f} s, {self.clips / max(wall, 1e-9):.2f} clips/s overall ({shares}); "
            f"uploaded {up.files} files, {up.bytes / 1e6:.0f} MB in {up.seconds:.1f} s in the "
            f"background ({up.dropped} superseded, {up.failed} failed)"
        )


class _Rate:
    """Clips per second of training steps since the last restart (for the log)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.clock, self.clips = time.monotonic(), 0

    def count(self, clips: int) -> None:
        self.clips += clips

    def per_second(self) -> float:
        now = time.monotonic()
        rate = self.clips / max(now - self.clock, 1e-9)
        self.clock, self.clips = now, 0
        return rate


def _log_start(config, index: FoldIndex, seed: int, device, precision: str, clips) -> None:
    split = index.split
    chooser = "the test rows (selection heldout)" if split.valid_is_test else "validation"
    _log(
        f"fold {config.fold} ({split.protocol}): {len(split.train)} training clips, "
        f"{len(split.valid)} to choose on ({chooser}), {len(split.test)} test clips, "
        f"{len(split.excluded)} excluded, {len(split.missing)} missing; "
        f"{index.clip_samples / SAMPLE_RATE:g} s each; seed {seed}; "
        f"{device.type} {'bf16 autocast' if precision == 'bf16' else 'fp32'}; "
        f"{index.representation} clips "
        f"{'in memory' if clips.in_memory else 'read from disk per batch'}"
    )


def _log_evaluation(fold: int, progress: Progress) -> None:
    latest, best = progress.metrics[-1], progress.best
    _log(
        f"fold {fold} iter {latest['iteration']}: valid accuracy {latest['valid_accuracy']:.3f} "
        f"(best {best['valid_accuracy']:.3f} at {best['iteration']}), "
        f"test accuracy {latest['test_accuracy']:.3f}"
    )


def _report(
    config: TrainConfig,
    out: Path,
    index: FoldIndex,
    progress: Progress,
    *,
    seed: int,
    device: torch.device,
    precision: str,
) -> dict:
    """The run's end: best.pth (the selected checkpoint) on the test rows, written as
    predictions.csv and summary.json; the resume state goes."""
    split, test = index.split, index.split.test
    probabilities = progress.best["test_probabilities"].numpy()
    names = [index.names[row] for row in test]
    write_predictions(out, names, index.targets[test], probabilities, config.fold)
    summary = summarise(
        split=split,
        progress=progress,
        test_targets=index.targets[test],
        fold=config.fold,
        path=FINE_TUNE,
        iterations=progress.iteration,
        split_sha256=split_sha256(split.protocol),
        data_sha256=index.data_sha256,
        seeds=_seeds(config, seed),
        clips_per_second=progress.clips / progress.train_seconds if progress.train_seconds else 0.0,
        wall_seconds=progress.seconds,
        device=device.type,
        precision=precision,
        config=dataclasses.asdict(config),
        features=index.fingerprint.as_dict(),
        genreflow_version=__version__,
    )
    summary = write_summary(out, summary)
    # The resume state (the model again, plus Adam's moments: 1.3 GB for a fully
    # fine-tuned Cnn14) has no use once the run is done.
    resume.discard(out)
    _log(
        f"fold {config.fold}: done, test accuracy {summary['final_accuracy']:.3f} of the "
        f"checkpoint of iteration {summary['selected_iteration']} (chosen on "
        f"{'the test rows' if split.valid_is_test else 'validation'}), "
        f"{summary['clips_per_second']:.1f} clips/s; outputs in {out}"
    )
    return summary
