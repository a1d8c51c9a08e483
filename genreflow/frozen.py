"""The frozen-base fast path: embed every clip once, then train only the genre head.

With a frozen base the Cnn14 embedding of a clip never changes during training, yet the
seed's recipe pushes every clip through the whole network at every iteration of every
fold. Here each clip goes through the base exactly once (`embed_features`, eval mode, no
augmentation), and each fold trains the 2048 -> 10 linear head on the stored embeddings
(`train_head`): seconds on a CPU instead of hours on a GPU.

What this path gives up, compared with training through a frozen base:

- augmentation inside the base: SpecAugment on the log-mel and the base's dropout (both
  active in the seed's train mode even when the base is frozen) make every visit of a clip
  a slightly different embedding; here each clip has one, the eval-mode one;
- mixup on the log-mel: the seed mixes pairs of clips before the conv blocks. Mixup of
  embeddings (`mixup=True`) is available as its replacement, but it is off by default: it
  is not the same thing (the base is non-linear), and it did not help (bench/README.md);
- the batch-norm statistics in the base: the seed's train mode updates bn running
  statistics even when the weights are frozen, so its "frozen" base drifts toward GTZAN's
  statistics; here the base is used exactly as loaded.

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

Outputs, each written atomically (a temporary file beside it, then os.replace):

- `embed_features(features, out)`: `out/embeddings.h5` (datasets `audio_name`, `embedding`
  (N, 2048) float32, `target`, `fold`; the features' attributes plus `base_sha256`,
  `pretrained`, `precision` (bf16 autocast where the hardware has it, as for training;
  fp32 gives the base's own numbers), `features_fingerprint`, `genreflow_version`) and
  `out/base.pth`, the base that made them in the published PANNs form
  `{'model': cnn14_state_dict}`. Killed at any
  moment, the same command continues from the last finished batch
  (`out/embeddings.partial/`); rerun after it finished, it does nothing and says so.
- `train_head(embeddings, fold, out)`: `metrics.csv`, `predictions.csv`, `summary.json`
  in the formats of `genreflow.fold_result` (`"path": "frozen-base"`), and `head.pth`, the
  selected head (`{'iteration', 'model': {'fc_transfer.weight', 'fc_transfer.bias'},
  'genreflow'}`, iteration = the summary's selected_iteration). It takes seconds, so it
  has no resume: a rerun trains again, with the same result.
- `load_head_ensemble(base, heads)`: the base and the fold heads as one module mapping
  waveforms to genre probabilities (base once, heads' probabilities averaged).
- `export_transfer_checkpoint(base, head, out)`: one fold's model as a whole transfer
  checkpoint (`base.*` + `fc_transfer.*`), for tools that take one (`genreflow predict`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from genreflow import __version__, storage
from genreflow.atomic import write_atomic, write_path_atomic, write_text_atomic
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.fold_result import (  # noqa: F401 (the fold folder's names, re-exported)
    FROZEN_BASE,
    HEAD,
    METRICS,
    METRICS_COLUMNS,
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
from genreflow.recipe import RECIPE_VERSION, HeadConfig, check_recipe_version
from genreflow.runtime import (
    autocast_for,
    cpu_threads_for_training,
    freed_memory_kept,
    one_thread,
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

EMBEDDINGS, BASE, PARTIAL = "embeddings.h5", "base.pth", "embeddings.partial"
BASE_MODEL = "Cnn14"
EMBEDDING_SIZE = 2048

# torch.compile of the base (inductor with frozen weights: batch norm folded into the
# convolutions, weights pre-packed for oneDNN) ran Cnn14's bf16 eval forward about 1.4x
# faster than eager bf16 on 2 CPU cores, for about a minute of compiling
# (bench/bench_embed.py, bench/README.md). `compile_base="auto"` compiles where that was
# measured (a CPU, bf16) and only when the step embeds enough audio to repay the minute.
COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_MIN_AUDIO_SECONDS = 3 * 3600

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


def _plain(value: object) -> object:
    """An HDF5 attribute as a plain Python value (JSON- and checkpoint-safe)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- embed -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _FeaturesIndex:
    path: Path
    names: np.ndarray  # raw bytes, as stored
    names_dtype: np.dtype  # as stored, so that .asstr() works on the copy too
    target: np.ndarray  # (N, classes) float32, as stored
    folds: np.ndarray  # (N,) int32
    attrs: dict  # raw HDF5 attribute values, copied into embeddings.h5
    fingerprint: str
    checked_attrs: dict  # as genreflow.features.read_index gives them (representation, ...)

    @property
    def representation(self) -> str:
        return self.checked_attrs["representation"]

    @property
    def clips(self) -> int:
        return len(self.names)


def _features_fingerprint(names, target, folds, attrs: dict) -> str:
    """What identifies a packed file without reading its waveforms: names, labels, folds
    and every attribute (a repack writes a new `created`, so it gets a new fingerprint)."""
    digest = hashlib.sha256()
    digest.update(b"\0".join(bytes(n) for n in names))
    digest.update(np.ascontiguousarray(target, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(folds, dtype=np.int32).tobytes())
    plain = {key: _plain(value) for key, value in attrs.items()}
    digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _read_features(features: str | os.PathLike) -> _FeaturesIndex:
    from genreflow.audio import SAMPLE_RATE
    from genreflow.features import read_index

    path = storage.input_path(features)  # gs:// and http(s):// downloaded once, to the cache
    # The packed file's own checks: datasets, shapes, genres, folds, representation.
    checked_attrs = read_index(path)[3]
    with h5py.File(path, "r") as hf:
        names = hf["audio_name"][:]
        names_dtype = hf["audio_name"].dtype
        target = hf["target"][:].astype(np.float32)
        folds = hf["fold"][:].astype(np.int32)
        attrs = {key: _plain(value) for key, value in hf.attrs.items()}
    if int(attrs["sample_rate"]) != SAMPLE_RATE:
        raise GenreflowError(
            f"{path}: clips at {attrs['sample_rate']} Hz; Cnn14's front end needs {SAMPLE_RATE}"
        )
    if not len(names):
        raise GenreflowError(f"{path}: holds no clips")
    fingerprint = _features_fingerprint(names, target, folds, attrs)
    return _FeaturesIndex(
        path, names, names_dtype, target, folds, attrs, fingerprint, checked_attrs
    )


def _build_base(pretrained: str | None, pretrained_sha256: str | None, seed: int):
    """The Cnn14 base in eval mode, from a checkpoint or seeded random weights."""
    from genreflow.models.checkpoints import load_pretrained
    from genreflow.models.transfer import TransferCnn14

    # Seeded without touching the caller's global random state. Built as the transfer
    # model so that both checkpoint forms load: the published base, or one of our
    # fine-tuned ones (whose base is then used).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TransferCnn14(classes_num=len(GENRES), freeze_base=True)
    if pretrained:
        load_pretrained(model, pretrained, sha256=pretrained_sha256)
    base = model.base
    if not pretrained:
        _log(
            "\n"
            "!!! WARNING: no pretrained checkpoint given: the Cnn14 base is RANDOMLY\n"
            f"!!! INITIALISED (seed {seed}). Its embeddings are random features, good for a\n"
            "!!! demo and for tests, far below a pretrained PANNs base. For real use pass\n"
            "!!! --pretrained with Cnn14_mAP=0.431.pth (PANNs release, Zenodo 3987831).\n"
        )
    for param in base.parameters():
        param.requires_grad_(False)
    return base.eval()


def _base_checkpoint_bytes(base: nn.Module) -> bytes:
    buffer = io.BytesIO()
    state = {key: value.detach().cpu() for key, value in base.state_dict().items()}
    torch.save({"model": state}, buffer)
    return buffer.getvalue()


def _chunk_path(partial: Path, start: int) -> Path:
    return partial / f"rows_{start:08d}.npy"


def _read_manifest(partial: Path) -> dict | None:
    try:
        return json.loads((partial / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


# What an embeddings.h5 written before an attribute existed was made with.
_BEFORE_ATTRIBUTE = {"precision": "fp32"}


def _finished_matches(embeddings: Path, request: dict) -> tuple[bool, str]:
    """Whether a finished embeddings.h5 was made for this request; if not, why."""
    try:
        with h5py.File(embeddings, "r") as hf:
            made = {key: _plain(hf.attrs.get(key, _BEFORE_ATTRIBUTE.get(key))) for key in request}
    except OSError as exc:
        return False, f"unreadable ({exc})"
    differ = [key for key in request if made[key] != request[key]]
    if differ:
        return False, "made with other " + ", ".join(
            f"{key} ({made[key]!r}, now {request[key]!r})" for key in differ
        )
    return True, ""


def embed_features(
    features: str | os.PathLike,
    out: str | os.PathLike,
    *,
    pretrained: str | None = None,
    pretrained_sha256: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    compile_base: str = "auto",
    seed: int = 0,
) -> dict:
    """Push every packed clip through the Cnn14 base once and store the embeddings.

    Args:
        features: a packed features.h5 (genreflow.features): a path, file://, http(s)://
            or gs:// URI.
        out: folder for `embeddings.h5` and `base.pth`.
        pretrained: checkpoint for the base (path, file://, http(s)://, gs://): published
            PANNs form or one of our fine-tuned checkpoints (its base is used). None: a
            randomly initialised base seeded with `seed`, announced loudly on stderr.
        pretrained_sha256: expected sha256 of the pretrained file.
        batch_size: clips per forward pass; also the unit of resumption.
        device: auto, cpu or cuda[:N].
        precision: auto, fp32 or bf16, as for training (genreflow.runtime.resolve_precision):
            auto is bf16 autocast where the CPU or GPU computes in bf16 natively, fp32
            elsewhere. bf16 embeddings differ from fp32 ones by bf16 rounding (per clip,
            cosine similarity at least 0.9995 and relative error at most 2%:
            tests/test_frozen.py); fp32 gives the base's own numbers, bit for bit.
        compile_base: on: torch.compile the base (bf16 only; where compiling fails, say
            so and go on without); off: never; auto: on a CPU in bf16 when the clips hold
            at least COMPILE_MIN_AUDIO_SECONDS of audio.
        seed: seeds the random base when there is no pretrained checkpoint.

    Returns:
        A summary: paths, clips, base_sha256, pretrained, precision, seconds,
        clips_per_second, resumed_from (rows already done), already_done, compiled
        (whether the compiled base made the embeddings this call computed).

    Raises:
        GenreflowError: missing or inconsistent features, a checkpoint that does not fit,
            an `out` that holds embeddings made from other inputs.
    """
    from genreflow.features import check_fits_model

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenreflowError(f"batch size must be a positive integer, got {batch_size!r}")
    if compile_base not in COMPILE_CHOICES:
        raise GenreflowError(
            f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile_base!r}"
        )
    index = _read_features(features)
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GenreflowError(f"{out}: exists and is not a folder")
    # Recorded in the embeddings file and the step's result: never a signature or password.
    source = storage.redacted(pretrained) if pretrained else f"random-init(seed={seed})"
    request = {
        "features_fingerprint": index.fingerprint,
        "pretrained": source,
        "precision": precision,
    }
    result = {"embeddings": str(out / EMBEDDINGS), "base": str(out / BASE), "clips": index.clips}
    result.update(pretrained=source, precision=precision)
    if (out / EMBEDDINGS).is_file():
        base_sha256 = _check_finished(out, request)
        _log(f"embed: nothing to do, {out / EMBEDDINGS} already holds these clips' embeddings")
        return {
            **result,
            "base_sha256": base_sha256,
            "seconds": 0.0,
            "clips_per_second": 0.0,
            "resumed_from": index.clips,
            "already_done": True,
            "compiled": False,
        }

    base, manifest = _start_or_resume(
        out, index, request, (pretrained, pretrained_sha256), batch_size=batch_size, seed=seed
    )
    check_fits_model(index.path, index.checked_attrs, base)
    base.to(torch_device)
    _log(
        f"embed: {index.clips} clips through the {BASE_MODEL} base ({source}), "
        f"{torch_device.type} {'bf16 autocast' if precision == 'bf16' else 'fp32'}, "
        f"batch {manifest['batch_size']}"
    )
    audio_seconds = index.clips * int(index.attrs["clip_samples"]) / int(index.attrs["sample_rate"])
    compiled = compile_base == "on" or (
        compile_base == "auto"
        and torch_device.type == "cpu"
        and audio_seconds >= COMPILE_MIN_AUDIO_SECONDS
    )
    if compiled and precision != "bf16":
        # Compiling folds batch norm into the convolutions: other fp32 numbers than the
        # base's own, which fp32 promises.
        _log("embed: not compiling the base in fp32 (it would change the fp32 numbers)")
        compiled = False
    started = time.monotonic()
    # As a training step: threads capped at the CPU quota, and each batch's activations
    # (hundreds of MB) reuse the previous batch's memory instead of faulting in fresh pages.
    with cpu_threads_for_training(), freed_memory_kept():
        embedder = _Embedder(base, torch_device, precision, manifest["batch_size"], compiled)
        resumed_from = _embed_chunks(
            embedder, index, out / PARTIAL, manifest["batch_size"], torch_device
        )
    seconds = time.monotonic() - started
    computed = index.clips - resumed_from
    embedding = _gathered_chunks(out / PARTIAL, index.clips, manifest["batch_size"])
    _write_embeddings(out / EMBEDDINGS, index, embedding, manifest)
    shutil.rmtree(out / PARTIAL)
    rate = computed / seconds if seconds > 0 else 0.0
    _log(f"embed: {computed} clips in {seconds:.1f} s ({rate:.1f} clips/s) -> {out / EMBEDDINGS}")
    return {
        **result,
        "base_sha256": manifest["base_sha256"],
        "seconds": seconds,
        "clips_per_second": rate,
        "resumed_from": resumed_from,
        "already_done": False,
        "compiled": embedder.compiled,
    }


def _check_finished(out: Path, request: dict) -> str:
    """A finished embeddings.h5 in `out` must be this request's, beside the base that made
    it; returns that base's sha256."""
    embeddings_path, base_path = out / EMBEDDINGS, out / BASE
    matches, why = _finished_matches(embeddings_path, request)
    if not matches:
        raise GenreflowError(
            f"{embeddings_path}: already there but {why}; "
            "choose another --out or remove that folder"
        )
    if not base_path.is_file():
        raise GenreflowError(f"{embeddings_path} is there but {base_path} is missing")
    with h5py.File(embeddings_path, "r") as hf:
        base_sha256 = _plain(hf.attrs["base_sha256"])
    if storage.sha256_of(base_path) != base_sha256:
        raise GenreflowError(
            f"{base_path} is not the base that made {embeddings_path} (sha256 differs); "
            "remove the folder and embed again"
        )
    shutil.rmtree(out / PARTIAL, ignore_errors=True)  # left behind by a kill after the rename
    return base_sha256


def _start_or_resume(
    out: Path,
    index: _FeaturesIndex,
    request: dict,
    pretrained: tuple[str | None, str | None],
    *,
    batch_size: int,
    seed: int,
) -> tuple[nn.Module, dict]:
    """The base and the manifest of the run in out/embeddings.partial: the interrupted run
    of this very request, resumed, or a new one from `pretrained` (checkpoint, sha256);
    anything else there is discarded, loudly. The manifest says base_sha256, batch_size
    and clips, beside the request."""
    base_path, partial = out / BASE, out / PARTIAL
    manifest = _read_manifest(partial) if partial.is_dir() else None
    resuming = False
    if manifest is not None:
        same_request = all(manifest.get(key) == value for key, value in request.items())
        base_ok = base_path.is_file() and manifest.get("base_sha256") == storage.sha256_of(
            base_path
        )
        if same_request and base_ok and manifest.get("clips") == index.clips:
            resuming = True
        else:
            _log(f"embed: discarding {partial}: it was started with other inputs")
    if not resuming and partial.exists():
        shutil.rmtree(partial)

    out.mkdir(parents=True, exist_ok=True)
    # Temporary files of a run killed mid-write (a base.pth is 330 MB): ours by their names.
    for name in (BASE, EMBEDDINGS):
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink()
    if resuming:
        # The base is read back from base.pth, so a resumed run uses the very same weights.
        if manifest["batch_size"] != batch_size:
            _log(
                f"embed: resuming with batch size {manifest['batch_size']}, "
                f"the one the interrupted run used (asked: {batch_size})"
            )
        return _build_base(str(base_path), manifest["base_sha256"], seed), manifest
    base = _build_base(*pretrained, seed)
    if index.attrs["clip_samples"] < base.min_samples:
        raise GenreflowError(
            f"{index.path}: clips of {index.attrs['clip_samples']} samples are shorter "
            f"than the {base.min_samples} Cnn14 needs"
        )
    payload = _base_checkpoint_bytes(base)
    write_atomic(base_path, lambda f: f.write(payload))
    partial.mkdir()
    manifest = {**request, "base_sha256": hashlib.sha256(payload).hexdigest()}
    manifest.update(batch_size=batch_size, clips=index.clips)
    # The manifest lands last: it is the commit point of a started run.
    write_text_atomic(partial / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return base, manifest


class _Embedder:
    """A batch of the model's input (float32 waveforms or log-mel, features.model_input) ->
    (batch, 2048) embeddings, in the precision asked for, through the eager base or its
    compiled form.

    The compiled form sees one batch shape only (a short last batch is padded with zeros,
    whose rows are dropped: in eval mode every clip is computed on its own), so it
    compiles once, in its first call. Where that call fails (inductor needs a C++ compiler
    on a CPU), it says so and the eager base does the work.
    """

    def __init__(self, base: nn.Module, device, precision: str, batch_size: int, compiled: bool):
        self.base, self.batch_size = base, batch_size
        self.amp = autocast_for(device, precision)
        self.compiled, self._calls = compiled, 0
        if compiled:
            import torch._inductor.config as inductor_config

            self._frozen_weights = lambda: inductor_config.patch(freezing=True)
            base.to(memory_format=torch.channels_last)  # the layout it was measured in
            self._compiled_base = torch.compile(base)

    def __call__(self, batch: Tensor) -> Tensor:
        if not self.compiled:
            with self.amp():
                return self.base(batch)["embedding"]
        rows = len(batch)
        if rows < self.batch_size:
            batch = torch.cat([batch, batch.new_zeros(self.batch_size - rows, *batch.shape[1:])])
        self._calls += 1
        started = time.monotonic()
        try:
            with self.amp(), self._frozen_weights():
                embedding = self._compiled_base(batch)["embedding"][:rows]
        except RuntimeError as exc:  # torch._dynamo's and inductor's errors are RuntimeErrors
            if self._calls > 1:
                raise
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _log(f"embed: torch.compile failed ({reason}); going on without it")
            self.compiled = False
            return self(batch[:rows])
        if self._calls == 1:
            seconds = time.monotonic() - started
            _log(f"embed: compiled the base in its first batch ({seconds:.0f} s)")
        return embedding


def _embed_chunks(
    embedder: _Embedder, index: _FeaturesIndex, partial: Path, batch_size: int, device
) -> int:
    """Embed every batch of rows not yet in `partial` (one .npy file per batch, written
    atomically: the unit of resumption); returns the clips that were already there."""
    from genreflow.features import model_input
    from genreflow.progress import progress_bar

    starts = range(0, index.clips, batch_size)
    done = [start for start in starts if _chunk_path(partial, start).is_file()]
    resumed_from = sum(min(batch_size, index.clips - start) for start in done)
    if resumed_from:
        _log(f"embed: resuming, {resumed_from} of {index.clips} clips already embedded")
    with (
        h5py.File(index.path, "r") as hf,
        progress_bar(index.clips, desc="embed", unit="clip", initial=resumed_from) as progress,
        torch.inference_mode(),
    ):
        clips = hf[index.representation]
        for start in starts:
            chunk = _chunk_path(partial, start)
            if chunk.is_file():
                continue
            stop = min(start + batch_size, index.clips)
            # Rows in order: one contiguous HDF5 read per batch.
            batch = model_input(index.representation, clips[start:stop], device)
            embedding = embedder(batch).float().cpu().numpy()
            write_atomic(chunk, lambda f, e=embedding: np.save(f, e))
            progress.update(stop - start)
    return resumed_from


def _gathered_chunks(partial: Path, clips: int, batch_size: int) -> np.ndarray:
    """The (clips, EMBEDDING_SIZE) embeddings, read back from the batches' files."""
    embedding = np.empty((clips, EMBEDDING_SIZE), dtype=np.float32)
    for start in range(0, clips, batch_size):
        rows = np.load(_chunk_path(partial, start))
        stop = min(start + batch_size, clips)
        if rows.shape != (stop - start, EMBEDDING_SIZE):
            raise GenreflowError(
                f"{_chunk_path(partial, start)}: shape {rows.shape}, expected "
                f"({stop - start}, {EMBEDDING_SIZE}); remove {partial} and run again"
            )
        embedding[start:stop] = rows
    return embedding


def _write_embeddings(
    path: Path, index: _FeaturesIndex, embedding: np.ndarray, manifest: dict
) -> None:
    """embeddings.h5: the features' names, targets, folds and attributes, plus what made
    the embeddings."""
    attrs = dict(index.attrs)
    features_version = _plain(attrs.get("genreflow_version", ""))
    features_created = _plain(attrs.get("created", ""))
    attrs.update(
        {
            "features_genreflow_version": features_version,
            "features_created": features_created,
            "features_fingerprint": index.fingerprint,
            "base_model": BASE_MODEL,
            "base_sha256": manifest["base_sha256"],
            "pretrained": manifest["pretrained"],
            "precision": manifest["precision"],
            "embedding_size": EMBEDDING_SIZE,
            "batch_size": manifest["batch_size"],
            "genreflow_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )

    def write_h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as hf:
            hf.create_dataset("audio_name", data=index.names, dtype=index.names_dtype)
            hf.create_dataset("embedding", data=embedding)
            hf.create_dataset("target", data=index.target)
            hf.create_dataset("fold", data=index.folds)
            for key, value in attrs.items():
                hf.attrs[key] = value

    write_path_atomic(path, write_h5)


# --- train the head ----------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingsFile:
    """A finished embeddings.h5, read whole (N x 2048 float32: 8 MB for GTZAN)."""

    path: Path
    names: list[str]
    embedding: np.ndarray  # (N, 2048) float32
    targets: np.ndarray  # (N,) genre indices
    folds: np.ndarray  # (N,) int32
    attrs: dict  # plain values


def read_embeddings(path: str | os.PathLike) -> EmbeddingsFile:
    """Read and check an embeddings.h5 written by `embed_features` (a path or a URI: gs://
    and http(s):// are downloaded once, into the cache)."""
    path = storage.input_path(path)
    if not path.is_file():
        raise GenreflowError(f"{path}: embeddings file not found")
    try:
        hf = h5py.File(path, "r")
    except OSError as exc:
        raise GenreflowError(f"{path}: not a readable HDF5 file ({exc})") from None
    with hf:
        missing = [d for d in ("audio_name", "embedding", "target", "fold") if d not in hf]
        missing += [f"attribute {a}" for a in ("base_sha256", "genres") if a not in hf.attrs]
        if missing:
            raise GenreflowError(
                f"{path}: not an embeddings file from embed-features, missing " + ", ".join(missing)
            )
        names = [n.decode("utf-8") for n in hf["audio_name"][:]]
        embedding = hf["embedding"][:].astype(np.float32, copy=False)
        target = hf["target"][:]
        folds = hf["fold"][:].astype(np.int32)
        attrs = {key: _plain(value) for key, value in hf.attrs.items()}
    n = len(names)
    problems = []
    if attrs["genres"] != list(GENRES):
        problems.append(f"genre order {attrs['genres']} differs from {list(GENRES)}")
    if embedding.ndim != 2 or embedding.shape[0] != n:
        problems.append(f"embedding has shape {embedding.shape}, expected ({n}, D)")
    if target.shape != (n, len(GENRES)):
        problems.append(f"target has shape {target.shape}, expected ({n}, {len(GENRES)})")
    elif n and not (np.isin(target, (0, 1)).all() and (target.sum(axis=1) == 1).all()):
        problems.append("target rows are not one-hot")
    if folds.shape != (n,):
        problems.append(f"fold has shape {folds.shape}, expected ({n},)")
    if not problems and not np.isfinite(embedding).all():
        problems.append("embedding holds non-finite values")
    if problems:
        raise GenreflowError(f"{path}: inconsistent embeddings file: {'; '.join(problems)}")
    return EmbeddingsFile(path, names, embedding, target.argmax(axis=1), folds, attrs)


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
    embeddings: str | os.PathLike,
    fold: int,
    out: str | os.PathLike,
    *,
    iterations: int = DEFAULT_RECIPE["iterations"],
    batch_size: int = DEFAULT_RECIPE["batch_size"],
    lr: float = DEFAULT_RECIPE["lr"],
    weight_decay: float = DEFAULT_RECIPE["weight_decay"],
    mixup: bool = DEFAULT_RECIPE["mixup"],
    mixup_alpha: float = DEFAULT_RECIPE["mixup_alpha"],
    eval_every: int = DEFAULT_RECIPE["eval_every"],
    seed: int = DEFAULT_RECIPE["seed"],
    protocol: str = DEFAULT_PROTOCOL,
    selection: str = DEFAULT_SELECTION,
    recipe_version: int = RECIPE_VERSION,
    on_evaluation: Callable[[dict], object] | None = None,
) -> dict:
    """Train the genre head on stored embeddings of the training rows, keep the head that
    does best on the validation rows, report it on the test rows (genreflow.splits).

    Args:
        embeddings: an embeddings.h5 from `embed_features`: a path or a gs:// (http(s)://)
            URI.
        fold: cv10: the test fold (1..10). filtered: the repetition number (>= 1), which
            seeds the run with seed + fold - 1.
        out: folder for metrics.csv, predictions.csv, summary.json and head.pth.
        iterations: optimiser steps.
        batch_size: clips per step; 0 = all training clips (full batch).
        lr, weight_decay: AdamW's learning rate and decoupled weight decay.
        mixup, mixup_alpha: mix pairs of standardised embeddings (and their targets)
            with weights from Beta(alpha, alpha).
        eval_every: evaluate on the validation and test rows every this many steps (and
            at the end).
        seed: seeds mini-batch sampling and mixup; same seed, same result on a CPU.
        protocol: "cv10" or "filtered" (the fault-filtered lists).
        selection: "validation" chooses the head on rows neither trained on nor reported
            (cv10: the next fold); "heldout" on the test rows, as the seed did.
        recipe_version: genreflow.recipe.RECIPE_VERSION (the only one this code trains).
        on_evaluation: given each evaluation's metrics.csv row as it happens (the fold's
            live curve: genreflow.tracking.LiveLog).

    Returns:
        summary.json's content.
    """
    config = HeadConfig(
        embeddings=str(embeddings),
        fold=fold,
        out=str(out),
        iterations=iterations,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        mixup=mixup,
        mixup_alpha=mixup_alpha,
        eval_every=eval_every,
        seed=seed,
        protocol=protocol,
        selection=selection,
        recipe_version=recipe_version,
    )
    _check_head_config(config)
    data = read_embeddings(embeddings)
    split = make_split(
        data.names,
        data.folds,
        protocol=protocol,
        fold=fold,
        selection=selection,
        source=str(data.path),
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GenreflowError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _log(
        f"fold {fold} ({protocol}): training the head on {len(split.train)} embeddings, "
        f"choosing on {len(split.valid)} ({'test rows' if split.valid_is_test else 'validation'}),"
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
        "embeddings_fingerprint": data.attrs.get("features_fingerprint", ""),
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


# --- the ensemble ------------------------------------------------------------------------
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
