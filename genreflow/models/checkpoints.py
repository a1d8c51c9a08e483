"""Load and save model checkpoints in the two forms the PANNs world uses.

- Published (the PANNs release on Zenodo): `{'model': state_dict}` with a base model's own
  keys (`conv_block1.conv1.weight`, ..., `fc_audioset.bias`) and the 527 AudioSet classes.
- Transfer (the seed's fine-tuned files and ours): `{'iteration': int, 'model':
  state_dict}` with keys `base.*` and `fc_transfer.*`. Ours add `'genreflow': metadata`
  beside them (plain types only) and may carry more entries (optimizer state, ...).

Every file is read with `torch.load(weights_only=True)`: tensors and plain data only, so a
checkpoint cannot run code. Every load is strict: a checkpoint that does not fit the model
is an error naming the missing keys, the unexpected keys and the shape mismatches.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genreflow import storage
from genreflow.atomic import write_atomic
from genreflow.errors import GenreflowError
from genreflow.models.cnn14 import MODELS, PannsCnn
from genreflow.models.transfer import Transfer, build_transfer


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A checkpoint from the PANNs release, Zenodo record 3987831."""

    architecture: str
    filename: str
    url: str
    md5: str
    size: int | None = None


ZENODO_RECORD = "https://zenodo.org/records/3987831/files/"

# Zenodo publishes an md5 (not a sha256) per file. Cnn14's md5 and size are recorded
# alike by several independent projects that verify their downloads with them (e.g.
# Labbeti/dcase2022task6a, dcase2022task6a/nn/urls.py); Cnn10's and Cnn6's come from that
# project alone. None could be checked against the files from here (no network).
PUBLISHED_CHECKPOINTS: dict[str, PublishedCheckpoint] = {
    "Cnn14": PublishedCheckpoint(
        "Cnn14",
        "Cnn14_mAP=0.431.pth",
        ZENODO_RECORD + "Cnn14_mAP%3D0.431.pth?download=1",
        md5="541141fa2ee191a88f24a3219fff024e",
        size=327_428_481,
    ),
    "Cnn10": PublishedCheckpoint(
        "Cnn10",
        "Cnn10_mAP=0.380.pth",
        ZENODO_RECORD + "Cnn10_mAP%3D0.380.pth?download=1",
        md5="bfb1f1f9968938fa8ef4012b8471f5f6",
    ),
    "Cnn6": PublishedCheckpoint(
        "Cnn6",
        "Cnn6_mAP=0.343.pth",
        ZENODO_RECORD + "Cnn6_mAP%3D0.343.pth?download=1",
        md5="e25e26b84585b14c7754c91e48efc9be",
    ),
}

# How many key names an error message lists before it says "... and N more".
_LISTED_KEYS = 8
# Top-level entries save_checkpoint owns; `extra` may not overwrite them.
_RESERVED = ("iteration", "model", "genreflow")


# --- reading -----------------------------------------------------------------------------
def _published_for(source: str) -> PublishedCheckpoint | None:
    """The published checkpoint a Zenodo URL names, if any (to verify it by default)."""
    if "zenodo.org/" not in source:
        return None
    name = storage.file_name_of(source)
    return next((c for c in PUBLISHED_CHECKPOINTS.values() if c.filename == name), None)


def _resolve(source: str | os.PathLike, sha256: str | None, md5: str | None) -> Path:
    """A local file for a path, file://, http(s):// or gs:// source (remote: cached once)."""
    source = os.fspath(source)
    if sha256 is None and md5 is None:
        published = _published_for(source)
        if published is not None:
            md5 = published.md5
    return storage.cached(source, sha256=sha256, md5=md5)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GenreflowError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise GenreflowError(f"{path}: is a directory, not a checkpoint file") from None
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" not in message:
            raise GenreflowError(
                f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                f"{_first_line(exc)}"
            ) from None
        # torch's long message names the offending global on its "WeightsUnpickler" line.
        detail = next(
            (
                line.split("error:", 1)[-1].strip()
                for line in message.splitlines()
                if "WeightsUnpickler" in line
            ),
            "",
        )
        raise GenreflowError(
            f"{path}: refused: it holds pickled Python objects beyond tensors and plain data, "
            "and checkpoints are loaded with weights_only=True so that they cannot run code"
            + (f" ({detail})" if detail else "")
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, OSError) as exc:
        # A truncated zip raises RuntimeError; bytes that are no checkpoint at all reach
        # the legacy reader and fail with whatever it trips on first (KeyError, ...).
        raise GenreflowError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key prefix nn.DataParallel ('module.') or torch.compile ('_orig_mod.') adds
    when every key carries it: the same weights, saved from a wrapped model."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def load_checkpoint(
    path: str | os.PathLike, *, sha256: str | None = None, md5: str | None = None
) -> dict:
    """Read a checkpoint (a path, file://, http(s):// or gs://) with weights_only=True.

    Returns:
        The checkpoint dict; its 'model' entry is a state dict (str -> Tensor) with any
        DataParallel/torch.compile key prefix removed.

    Raises:
        GenreflowError: the file is missing, unreadable, holds arbitrary pickled objects,
            or is not a dict with a 'model' state dict.
    """
    local = _resolve(path, sha256, md5)
    checkpoint = _torch_load(local)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        found = (
            f"top-level keys {sorted(map(str, checkpoint))[:_LISTED_KEYS]}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise GenreflowError(
            f"{path}: not a PANNs-style checkpoint: expected a dict with a 'model' state dict, "
            f"found {found}"
        )
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise GenreflowError(
            f"{path}: its 'model' entry is not a state dict (names mapped to tensors)"
        )
    return {**checkpoint, "model": _strip_wrapper_prefix(state)}


def _is_transfer_state(state: dict[str, torch.Tensor]) -> bool:
    return any(key.startswith("base.") for key in state)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    more = len(keys) - _LISTED_KEYS
    return shown + (f", ... and {more} more" if more > 0 else "")


def _fit(module: nn.Module, state: dict[str, torch.Tensor], *, source: str, what: str) -> None:
    """Load `state` into `module` strictly, or raise naming everything that does not fit.

    Only BatchNorm's `num_batches_tracked` counters may be absent (files from PyTorch
    before 0.4.1 lack them; they are step counters, not weights): they start at zero.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listed(mismatched)}")
    if problems:
        raise GenreflowError(f"{source} does not fit {what}: " + "; ".join(problems))
    filled = {k: torch.zeros_like(v) for k, v in expected.items() if k not in state}
    module.load_state_dict({**state, **filled}, strict=True)


def load_pretrained(
    model: Transfer | PannsCnn,
    source: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
) -> None:
    """Load weights into `model` in place, strictly.

    Args:
        model: a transfer model (`TransferCnn14`, `Transfer`) or a bare base (`Cnn14`, ...).
        source: a path, file://, http(s):// (downloaded once into the cache) or gs:// URI.
            A published checkpoint (`{'model': cnn14_state_dict}`) loads into the base of
            a transfer model; a transfer checkpoint (`base.*`, `fc_transfer.*`) loads
            into the whole transfer model. Zenodo URLs of the PANNs release are checked
            against the published md5 unless a checksum is given.
        sha256, md5: expected checksum of the file.

    Raises:
        GenreflowError: naming the file and the missing keys, unexpected keys and shape
            mismatches when the checkpoint does not fit; nothing is loaded then.
    """
    state = load_checkpoint(source, sha256=sha256, md5=md5)["model"]
    source = os.fspath(source)
    if isinstance(model, Transfer):
        if _is_transfer_state(state):
            _fit(model, state, source=source, what=f"the transfer model {type(model).__name__}")
        else:
            base_name = type(model.base).__name__
            _fit(model.base, state, source=source, what=f"the {base_name} base")
    elif isinstance(model, PannsCnn):
        if _is_transfer_state(state):
            raise GenreflowError(
                f"{source} is a fine-tuned transfer checkpoint (base.*, fc_transfer.*): load it "
                f"into a transfer model (load_transfer_model), not a bare {type(model).__name__}"
            )
        _fit(model, state, source=source, what=type(model).__name__)
    else:
        raise TypeError(f"load_pretrained takes a PANNs model, got {type(model).__name__}")


# --- building models from a checkpoint ---------------------------------------------------
def infer_architecture(state: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """The `MODELS` name whose conv blocks match a base state dict's keys.

    Raises:
        GenreflowError: none matches; the message names `source` and what its state holds.
    """
    blocks = {key.split(".", 1)[0] for key in state if key.startswith("conv_block")}
    convs = 2 if any(key.endswith(".conv2.weight") for key in state) else 1
    for name, cls in MODELS.items():
        wanted = {f"conv_block{i}" for i in range(1, len(cls.BLOCKS) + 1)}
        if blocks == wanted and convs == cls.BLOCK_TYPE.CONVS:
            return name
    keys = list(state)
    held = ", ".join(keys[:4]) + (f", ... ({len(keys)} tensors)" if len(keys) > 4 else "")
    expected = "; ".join(
        f"{name}: conv_block1..{len(cls.BLOCKS)}, {cls.BLOCK_TYPE.CONVS} conv(s) each"
        for name, cls in MODELS.items()
    )
    found = f"conv blocks {', '.join(sorted(blocks))}" if blocks else "no conv_block* keys"
    raise GenreflowError(
        f"{source}: not a PANNs model this code knows: its state dict holds {held or 'nothing'} "
        f"({found}); expected one of {expected}"
    )


# Audio parameters a checkpoint's shapes do not determine; ours record them in metadata.
_AUDIO_KEYS = ("sample_rate", "hop_size", "fmin", "fmax")


def _base_kwargs(base_state: dict[str, torch.Tensor], metadata: dict) -> dict[str, Any]:
    """Audio parameters for the base: shapes decide window size and mel bins; our metadata's
    'model_config' supplies the rest, else the genreflow.audio defaults."""
    kwargs: dict[str, Any] = {}
    config = metadata.get("model_config") if isinstance(metadata, dict) else None
    if isinstance(config, dict):
        kwargs.update({key: config[key] for key in _AUDIO_KEYS if key in config})
    stft = base_state.get("spectrogram_extractor.stft.conv_real.weight")
    if stft is not None:
        kwargs["window_size"] = int(stft.shape[-1])
    mel = base_state.get("logmel_extractor.melW")
    if mel is not None:
        kwargs["mel_bins"] = int(mel.shape[-1])
    return kwargs


def _transfer_from(checkpoint: dict, source: str) -> tuple[Transfer, dict]:
    state = checkpoint["model"]
    if not _is_transfer_state(state):
        raise GenreflowError(
            f"{source} is a PANNs base checkpoint without a transfer head (no base.* keys): "
            "start training from it (--pretrained) or load it with load_model"
        )
    head = state.get("fc_transfer.weight")
    if head is None or head.dim() != 2:
        raise GenreflowError(f"{source}: a transfer checkpoint without fc_transfer.weight")
    metadata = checkpoint.get("genreflow") or {}
    base_state = {key[len("base.") :]: value for key, value in state.items() if key[:5] == "base."}
    model = build_transfer(
        infer_architecture(base_state, source),
        classes_num=int(head.shape[0]),
        **_base_kwargs(base_state, metadata),
    )
    _fit(model, state, source=source, what=f"the transfer model {type(model).__name__}")
    return model, dict(metadata)


def load_transfer_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    sha256: str | None = None,
    md5: str | None = None,
) -> tuple[Transfer, dict]:
    """A fine-tuned transfer model from a checkpoint, in eval mode on `device`.

    The base architecture and the head's class count come from the state dict's keys and
    shapes (`fc_transfer.weight` is (classes, embedding)); audio parameters from our
    metadata when present. A Cnn14 base gives a `TransferCnn14`.

    Returns:
        (model, metadata): metadata is our 'genreflow' entry, {} for a seed-made checkpoint.
    """
    checkpoint = load_checkpoint(source, sha256=sha256, md5=md5)
    model, metadata = _transfer_from(checkpoint, os.fspath(source))
    return model.to(device).eval(), metadata


def load_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    sha256: str | None = None,
    md5: str | None = None,
) -> tuple[Transfer | PannsCnn, dict]:
    """Whatever model a checkpoint holds, in eval mode: a transfer model for a fine-tuned
    checkpoint, else the bare base (`Cnn14`, ...) for a published one. Both return an
    'embedding' from forward(), which is what embedding extraction needs.
    """
    checkpoint = load_checkpoint(source, sha256=sha256, md5=md5)
    state = checkpoint["model"]
    if _is_transfer_state(state):
        model, metadata = _transfer_from(checkpoint, os.fspath(source))
        return model.to(device).eval(), metadata
    metadata = checkpoint.get("genreflow") or {}
    kwargs = _base_kwargs(state, metadata)
    head = state.get("fc_audioset.weight")
    if head is not None:
        kwargs["classes_num"] = int(head.shape[0])
    model = MODELS[infer_architecture(state, os.fspath(source))](**kwargs)
    _fit(model, state, source=os.fspath(source), what=type(model).__name__)
    return model.to(device).eval(), dict(metadata)


# --- writing -----------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself, not a DataParallel/DDP or torch.compile wrapper around it."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _check_plain(value: Any, where: str, *, tensors: bool) -> None:
    """Raise unless `value` is built from what weights_only loading accepts."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if tensors and isinstance(value, torch.Tensor):
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", tensors=tensors)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise GenreflowError(
                    f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys"
                )
            _check_plain(item, f"{where}[{key!r}]", tensors=tensors)
        return
    allowed = "str, int, float, bool, None, list, dict" + (" and tensors" if tensors else "")
    raise GenreflowError(
        f"{where} is a {type(value).__name__}: checkpoints hold only {allowed}, "
        "so that they load with weights_only=True"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    iteration: int,
    metadata: dict,
    extra: dict | None = None,
) -> None:
    """Write `{'iteration', 'model', 'genreflow'}` atomically (a temporary file beside
    `path`, then os.replace): a reader never sees a half-written checkpoint.

    Args:
        path: the local file to write; missing parent folders are created.
        model: a transfer model (keys `base.*`, `fc_transfer.*`) or a bare base; wrappers
            (DataParallel, torch.compile) are unwrapped so the keys stay the published ones.
        iteration: training iterations done.
        metadata: plain data only (str/int/float/bool/None/list/dict); stored under
            'genreflow' with 'model_config' (the architecture and audio parameters the
            model was built with) added, which load_transfer_model reads back.
        extra: more top-level entries, e.g. {'optimizer': optimizer.state_dict()};
            tensors and plain data only.
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        raise GenreflowError(f"iteration must be an int, got {iteration!r}")
    if not isinstance(metadata, dict):
        raise GenreflowError(f"metadata must be a dict, got a {type(metadata).__name__}")
    _check_plain(metadata, "metadata", tensors=False)
    extra = dict(extra or {})
    clash = [key for key in extra if key in _RESERVED]
    if clash:
        raise GenreflowError(f"extra entries may not replace {', '.join(clash)}")
    _check_plain(extra, "extra", tensors=True)

    model = _unwrap(model)
    config = getattr(model, "config", None)
    genreflow_entry = dict(metadata)
    if isinstance(config, dict):
        given = genreflow_entry.get("model_config")
        if given is not None and given != config:
            raise GenreflowError(
                f"metadata['model_config'] {given} disagrees with the model's own {config}"
            )
        genreflow_entry["model_config"] = dict(config)
    payload = {
        "iteration": iteration,
        "model": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "genreflow": genreflow_entry,
        **extra,
    }

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(payload, f))
