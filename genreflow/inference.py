"""Embeddings and genre predictions of audio files, from published or fine-tuned checkpoints.

Files are read as packing reads them (decoded, mono, 32 kHz); a file is cut into
consecutive clips of the checkpoint's clip length (the last one zero-padded, see
genreflow.audio.load_segments), each clip goes through the model in eval mode, and the
file's output is the mean over its clips. Several checkpoints (the ten fold models)
form an ensemble: their per-file probabilities are averaged.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from genreflow.audio import CLIP_SECONDS, SAMPLE_RATE, clip_samples, load_segments
from genreflow.data.genres import GENRES
from genreflow.ensemble import check_same_genres, load_fine_tuned
from genreflow.errors import GenreflowError
from genreflow.limits import exceeded, limit, over
from genreflow.runtime import resolve_device

# Clips per forward pass: bounds memory on long files. Cnn14's activations for 4 clips of
# 30 s peak at about 600 MB, for 8 at 1.2 GB, and 4 run as fast per clip on a CPU.
BATCH_CLIPS = 4

# A served model's requests arrive on several threads (MLflow's server runs each in a
# thread pool). One is computed at a time: on a CPU, requests computed side by side finish
# no sooner, and each would hold its own audio and activations; a waiting one holds only
# its rows' bytes.
_ONE_REQUEST_AT_A_TIME = threading.Lock()


def _check_files(files: Sequence[str]) -> list[str]:
    files = [str(f) for f in files]
    if not files:
        raise GenreflowError("no audio files given")
    for file in files:
        if not Path(file).is_file():
            raise GenreflowError(f"{file}: no such audio file")
    return files


def _clip_samples_for(metadata: dict, clip_seconds: float | None, checkpoint: str) -> int:
    """The clip length to cut files into: the caller's, else the checkpoint's, else 30 s."""
    model_config = metadata.get("model_config") or {}
    rate = metadata.get("sample_rate", model_config.get("sample_rate", SAMPLE_RATE))
    if int(rate) != SAMPLE_RATE:
        raise GenreflowError(
            f"{checkpoint}: expects {rate} Hz audio, but genreflow decodes at {SAMPLE_RATE} Hz"
        )
    if clip_seconds is not None:
        return clip_samples(clip_seconds)
    if metadata.get("clip_samples"):
        return int(metadata["clip_samples"])
    return clip_samples(CLIP_SECONDS)


def _mean_over_clips(model, file: str, samples: int, device: torch.device, pick) -> np.ndarray:
    """pick(model output) averaged over the file's consecutive clips, in float64."""
    return _mean_over_segments(model, load_segments(file, samples), device, pick)


@torch.inference_mode()
def _mean_over_segments(model, segments: np.ndarray, device: torch.device, pick) -> np.ndarray:
    """pick(model output) averaged over a file's clips (load_segments' rows), in float64."""
    total = None
    for start in range(0, len(segments), BATCH_CLIPS):
        batch = torch.from_numpy(segments[start : start + BATCH_CLIPS]).to(device)
        value = pick(model(batch)).double().sum(0).cpu().numpy()
        total = value if total is None else total + value
    return total / len(segments)


def _embedding(output: dict) -> torch.Tensor:
    return output["embedding"]


def _probabilities(output: dict) -> torch.Tensor:
    # The transfer head returns log-softmax.
    return output["clipwise_output"].exp()


def embed(
    checkpoint: str,
    files: Sequence[str],
    *,
    clip_seconds: float | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Cnn14 embeddings, one row per file in the order given.

    Args:
        checkpoint: a published PANNs checkpoint (`{'model': cnn14_state_dict}`), or a
            fine-tuned one (ours or the seed's); a path, file://, http(s):// or gs:// URI.
        files: audio files in any format packing reads.
        clip_seconds: clip length files are cut into; default: the checkpoint's (ours
            record it), else 30 s.
        device: 'auto', 'cpu' or 'cuda'.

    Returns:
        float32 array (len(files), embedding size): 2048 for Cnn14. A file longer than
        one clip gets the mean of its clips' embeddings.
    """
    from genreflow.models.checkpoints import load_model

    files = _check_files(files)
    torch_device = resolve_device(device)
    model, metadata = load_model(checkpoint, device=torch_device)
    samples = _clip_samples_for(metadata, clip_seconds, str(checkpoint))
    rows = [_mean_over_clips(model, file, samples, torch_device, _embedding) for file in files]
    return np.stack(rows).astype(np.float32)


def predict(
    checkpoints: Sequence[str],
    files: Sequence[str],
    *,
    clip_seconds: float | None = None,
    device: str = "auto",
) -> list[dict]:
    """Genre probabilities per file from one fine-tuned checkpoint or an ensemble of them.

    For each checkpoint, a file's probabilities are the mean over its clips of the model's
    softmax output; the ensemble's are the mean over checkpoints.

    Args:
        checkpoints: fine-tuned transfer checkpoints (ours or the seed's); all must name
            the same genres.
        files: audio files in any format packing reads.
        clip_seconds: clip length; default: each checkpoint's own (ours record it), else 30 s.
        device: 'auto', 'cpu' or 'cuda'.

    Returns:
        One dict per file, in order: {'file', 'genre' (the most probable),
        'probabilities': {genre: probability}}.
    """
    checkpoints = [str(c) for c in checkpoints]
    if not checkpoints:
        raise GenreflowError("no checkpoint given")
    files = _check_files(files)
    torch_device = resolve_device(device)

    genres: list[str] | None = None
    total = np.zeros(0)
    # One model in memory at a time: ten Cnn14s would hold 3 GB; decoding a file again
    # per model costs far less than the model's forward pass.
    for checkpoint in checkpoints:
        model, metadata, names = load_fine_tuned(checkpoint, torch_device)
        if genres is None:
            genres = names
            total = np.zeros((len(files), len(genres)))
        check_same_genres(checkpoint, names, checkpoints[0], genres)
        samples = _clip_samples_for(metadata, clip_seconds, checkpoint)
        for i, file in enumerate(files):
            total[i] += _mean_over_clips(model, file, samples, torch_device, _probabilities)
        del model

    return _results(files, genres, total / len(checkpoints))


def predict_model(model_uri: str, files: Sequence[str], *, device: str = "auto") -> list[dict]:
    """Genre probabilities per file from a fold ensemble logged to MLflow by the pipeline
    (genreflow.serving): the same code that serves it.

    Args:
        model_uri: `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `runs:/RUN_ID/model`;
            MLFLOW_TRACKING_URI says which server.
        files: audio files in any format packing reads.
        device: 'auto', 'cpu' or 'cuda'.
    """
    import mlflow.pyfunc

    files = _check_files(files)
    resolve_device(device)  # a bad name fails before the download
    try:
        logged = mlflow.pyfunc.load_model(model_uri, model_config={"device": device})
    except GenreflowError:
        raise
    except Exception as exc:  # MLflow raises many types for a missing or foreign model
        raise GenreflowError(f"{model_uri}: cannot load the model ({exc})") from exc
    model = logged.unwrap_python_model()
    if not hasattr(model, "probabilities"):
        raise GenreflowError(f"{model_uri}: not a genreflow fold ensemble")
    return _results(files, model.genres, model.probabilities(files))


def ensemble_probabilities(
    ensemble: nn.Module,
    files: Sequence[str | os.PathLike],
    *,
    clip_samples: int,
    device: torch.device,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """(files, genres) probabilities from a fold ensemble (genreflow.ensemble) for one
    request of the served model: each file cut into clips as `predict` cuts it, the
    ensemble's probabilities averaged over the clips.

    A request holds at most GENREFLOW_MAX_REQUEST_ROWS files and
    GENREFLOW_MAX_REQUEST_SECONDS of audio, each file counted in whole clips (the audio the
    model runs on). Every file is decoded before the model runs, so one error names every
    file that cannot be (as `names[i]` where given, e.g. "row 3" for a served request, else
    its path); past the seconds limit, the files left are not decoded, and the error says so.

    Raises:
        GenreflowError: too many files, or the files that cannot be decoded, each with the
            reason.
    """
    from genreflow.audio import AudioDecodeError, cut_clips, load_audio

    files = list(files)
    check_request_rows(len(files))
    label = [str(name) for name in names] if names else [str(file) for file in files]
    budget = limit("GENREFLOW_MAX_REQUEST_SECONDS") * SAMPLE_RATE  # samples, as clips
    with _ONE_REQUEST_AT_A_TIME:
        segments, errors, used = [], [], 0
        for i, file in enumerate(files):
            left = budget - used
            try:
                clips = cut_clips(
                    load_audio(file, request_seconds_left=left / SAMPLE_RATE), clip_samples
                )
            except AudioDecodeError as exc:
                errors.append(f"{label[i]}: {exc.reason}")
                over_budget = exc.limit == "GENREFLOW_MAX_REQUEST_SECONDS"
            else:
                over_budget = clips.size > left
                if over_budget:
                    errors.append(
                        f"{label[i]}: "
                        + over(
                            "GENREFLOW_MAX_REQUEST_SECONDS",
                            f"{len(clips)} clip(s) of {clip_samples / SAMPLE_RATE:g} s, more "
                            f"than the {left / SAMPLE_RATE:g} s left of the request",
                        )
                    )
                used += clips.size
                segments.append(clips)
            if over_budget:
                if i + 1 < len(files):
                    rest = label[i + 1] if i + 2 == len(files) else f"{label[i + 1]} to {label[-1]}"
                    errors.append(f"{rest}: not decoded (the request is over its audio limit)")
                break
        if errors:
            raise GenreflowError("; ".join(errors))
        rows = [_mean_over_segments(ensemble, s, device, lambda p: p) for s in segments]
    return np.stack(rows) if rows else np.zeros((0, len(GENRES)))


def check_request_rows(count: int) -> None:
    """Refuse a request of more than GENREFLOW_MAX_REQUEST_ROWS files, before any is read."""
    if count > limit("GENREFLOW_MAX_REQUEST_ROWS"):
        raise exceeded("the request", "GENREFLOW_MAX_REQUEST_ROWS", f"{count} files")


def _results(files: list[str], genres: list[str], probabilities: np.ndarray) -> list[dict]:
    return [
        {
            "file": file,
            "genre": genres[int(np.argmax(row))],
            "probabilities": {genre: float(p) for genre, p in zip(genres, row, strict=True)},
        }
        for file, row in zip(files, probabilities, strict=True)
    ]


def format_table(results: list[dict]) -> str:
    """A plain-text table: file, predicted genre, then every genre's probability."""
    if not results:
        return ""
    genres = list(results[0]["probabilities"])
    file_width = max(len("file"), *(len(r["file"]) for r in results))
    genre_width = max(len("genre"), *(len(g) for g in genres))
    widths = [max(len(g), 5) for g in genres]
    header = [f"{'file':<{file_width}}", f"{'genre':<{genre_width}}"]
    header += [f"{g:>{w}}" for g, w in zip(genres, widths, strict=True)]
    lines = ["  ".join(header)]
    for result in results:
        cells = [f"{result['file']:<{file_width}}", f"{result['genre']:<{genre_width}}"]
        cells += [
            f"{result['probabilities'][g]:>{w}.3f}" for g, w in zip(genres, widths, strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
