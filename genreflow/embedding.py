"""The frozen base's half of the fast path: every clip through the Cnn14 base once.

With a frozen base the Cnn14 embedding of a clip never changes during training, yet the
seed's recipe pushes every clip through the whole network at every iteration of every
fold. Here each clip goes through the base exactly once (`embed_features`, eval mode, no
augmentation), and each fold trains only the 2048 -> 10 genre head on the stored
embeddings (genreflow.head): seconds on a CPU instead of hours on a GPU.

What this path gives up, compared with training through a frozen base:

- augmentation inside the base: SpecAugment on the log-mel and the base's dropout (both
  active in the seed's train mode even when the base is frozen) make every visit of a clip
  a slightly different embedding; here each clip has one, the eval-mode one;
- mixup on the log-mel: the seed mixes pairs of clips before the conv blocks. Mixup of
  embeddings (the head's `mixup`) is available as its replacement, but it is off by
  default: it is not the same thing (the base is non-linear), and it did not help
  (bench/README.md);
- the batch-norm statistics in the base: the seed's train mode updates bn running
  statistics even when the weights are frozen, so its "frozen" base drifts toward GTZAN's
  statistics; here the base is used exactly as loaded.

`embed_features(features, out)` writes, each file atomically (a temporary file beside it,
then os.replace): `out/embeddings.h5` (datasets `audio_name`, `embedding` (N, 2048)
float32, `target`, `fold`; the features' attributes plus `base_sha256`, `pretrained`,
`precision` (bf16 autocast where the hardware has it, as for training; fp32 gives the
base's own numbers), `features_fingerprint` (genreflow.features.FeaturesFingerprint, as
JSON), `genreflow_version`) and `out/base.pth`, the base that made them in the published
PANNs form `{'model': cnn14_state_dict}`. Killed at any moment, the same command continues
from the last finished batch (`out/embeddings.partial/`); rerun after it finished, it does
nothing and says so. `read_embeddings` reads embeddings.h5 back, checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor, nn

from genreflow import __version__, storage
from genreflow.atomic import write_atomic, write_path_atomic, write_text_atomic
from genreflow.audio import SAMPLE_RATE
from genreflow.data.genres import GENRES
from genreflow.errors import GenreflowError
from genreflow.features import (
    FeaturesFingerprint,
    check_fits_model,
    clip_names,
    features_fingerprint,
    model_input,
    read_index,
)
from genreflow.features.hdf5 import open_checked, plain, plain_attrs, require, shown
from genreflow.progress import progress_bar
from genreflow.runtime import (
    autocast_for,
    cpu_threads_for_training,
    freed_memory_kept,
    resolve_device,
    resolve_precision,
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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _FeaturesIndex:
    path: Path
    names: np.ndarray  # raw bytes, as stored
    names_dtype: np.dtype  # as stored, so that .asstr() works on the copy too
    target: np.ndarray  # (N, classes) float32, as stored
    folds: np.ndarray  # (N,) int32
    attrs: dict  # the stored attributes as plain values, copied into embeddings.h5
    fingerprint: FeaturesFingerprint
    checked_attrs: dict  # as genreflow.features.read_index gives them (representation, ...)

    @property
    def representation(self) -> str:
        return self.checked_attrs["representation"]

    @property
    def clips(self) -> int:
        return len(self.names)


def _read_features(features: str | os.PathLike) -> _FeaturesIndex:
    path = storage.input_path(features)  # gs:// and http(s):// downloaded once, to the cache
    # The packed file's own checks: datasets, shapes, genres, folds, representation.
    names, targets, folds, checked_attrs = read_index(path)
    fingerprint = features_fingerprint(names, targets, folds, checked_attrs)
    with open_checked(path, "features") as (path, hf):
        stored_names = hf["audio_name"][:]
        names_dtype = hf["audio_name"].dtype
        target = hf["target"][:].astype(np.float32)
        attrs = plain_attrs(hf)
    if int(attrs["sample_rate"]) != SAMPLE_RATE:
        raise GenreflowError(
            f"{path}: clips at {attrs['sample_rate']} Hz; Cnn14's front end needs {SAMPLE_RATE}"
        )
    if not len(names):
        raise GenreflowError(f"{path}: holds no clips")
    return _FeaturesIndex(
        path, stored_names, names_dtype, target, folds, attrs, fingerprint, checked_attrs
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
        with open_checked(embeddings, "embeddings") as (_, hf):
            made = {key: plain(hf.attrs.get(key, _BEFORE_ATTRIBUTE.get(key))) for key in request}
    except GenreflowError as exc:
        return False, f"unusable ({exc})"
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
        "features_fingerprint": index.fingerprint.as_json(),
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
    with open_checked(embeddings_path, "embeddings") as (_, hf):
        base_sha256 = plain(hf.attrs["base_sha256"])
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
    starts = range(0, index.clips, batch_size)
    done = [start for start in starts if _chunk_path(partial, start).is_file()]
    resumed_from = sum(min(batch_size, index.clips - start) for start in done)
    if resumed_from:
        _log(f"embed: resuming, {resumed_from} of {index.clips} clips already embedded")
    with (
        open_checked(index.path, "features") as (_, hf),
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
    features_version = plain(attrs.get("genreflow_version", ""))
    features_created = plain(attrs.get("created", ""))
    attrs.update(
        {
            "features_genreflow_version": features_version,
            "features_created": features_created,
            "features_fingerprint": index.fingerprint.as_json(),
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
    with open_checked(path, "embeddings") as (path, hf):
        require(
            hf,
            path,
            "an embeddings file from embed-features",
            ("audio_name", "embedding", "target", "fold"),
            ("base_sha256", "genres"),
        )
        names = clip_names(path, hf["audio_name"]).tolist()
        embedding = hf["embedding"][:].astype(np.float32, copy=False)
        target = hf["target"][:]
        folds = hf["fold"][:].astype(np.int32)
        attrs = plain_attrs(hf)
    n = len(names)
    problems = []
    if attrs["genres"] != list(GENRES):
        problems.append(f"genre order {shown(attrs['genres'], 200)} differs from {list(GENRES)}")
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
