"""The fold ensemble as a servable MLflow model: audio files in, genre and probabilities out.

The contract (the model's signature and input example say the same):

- input: a DataFrame with a column `audio`, one audio file's bytes per row (in MLflow's
  JSON `dataframe_split` / `dataframe_records`, base64 strings), any format, sample rate
  and channel count that `genreflow pack` decodes;
- output: a DataFrame with `genre` (the most probable genre's name) and one column per
  genre with its probability, in GTZAN's genre order. A file longer than the ensemble's
  clip is cut into clips and their probabilities averaged, as `genreflow predict` does
  (one code path: `genreflow.inference.ensemble_probabilities`);
- a row that cannot be decoded (not base64, not audio, empty, over a limit of
  genreflow.limits) fails the request with a one-line error naming every such row (HTTP 400
  from `mlflow models serve`, which goes on serving); a request holds at most
  GENREFLOW_MAX_REQUEST_ROWS rows and GENREFLOW_MAX_REQUEST_SECONDS of audio.

It is logged as a model from code (`genreflow/mlflow_model.py`, run when the model loads),
with this package bundled through `code_paths`, so no pickled object ties it to one
version of genreflow and MLflow's environment managers rebuild its environment from
`requirements.txt`.

The model stands alone: every checkpoint it needs (each fold's best.pth, or the frozen-base
path's head.pth files and the base they share) is stored inside it, with its SHA-256
checked when it loads, so a copy of the model (another registry, a plain folder, an image
from `mlflow models build-docker`) serves with no tracking server. The checkpoints are
stored once: `log_ensemble` moves them out of the fold runs into the model, and each fold
run keeps its metrics and a pointer to its checkpoint in the model
(genreflow.tracking.models.move_checkpoints).

Its requirements install PyTorch's CPU build by default: torch is pinned to the version that
logged it with PyTorch's CPU wheel index as an extra index (`TORCH_INDEX`), since a bare
`torch` from PyPI is the multi-GB CUDA build. For the CUDA build, install it into the serving
environment first (`pip install torch==X --index-url https://download.pytorch.org/whl/cu128`):
pip then keeps it, as it satisfies the pin.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc

from genreflow import storage
from genreflow.errors import GenreflowError

_log = logging.getLogger(__name__)

AUDIO = "audio"
GENRE = "genre"
# The model's name beside its run (the LoggedModel) and its folder in the model.
MODEL_NAME = "fold-ensemble"
BASE_ARTIFACT = "base"
# The fold checkpoints' folder in the model: fold01/best.pth, fold02/head.pth, ...
FOLDS_ARTIFACT = "folds"
# Run by MLflow when the model loads: builds a GenreEnsembleModel (models from code).
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# Where pip finds PyTorch's CPU build (an extra index: every other package is PyPI's).
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# The distributions the serving code imports, pinned to the versions that logged the
# model (torchlibrosa needs librosa; audioread decodes what libsndfile cannot).
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchlibrosa",
    "librosa",
    "numpy",
    "pandas",
    "soundfile",
    "soxr",
    "audioread",
    "h5py",
)
# Not bundled: the KFP side, which installs inside the package but is never imported here.
NOT_BUNDLED = ("components", "pipelines", "__pycache__", "*.pyc")


class GenreEnsembleModel(mlflow.pyfunc.PythonModel):
    """The fold models as one MLflow model (see the module's docstring for the contract)."""

    def load_context(self, context) -> None:
        from genreflow.ensemble import load_ensemble
        from genreflow.runtime import resolve_device

        config = context.model_config
        self.genres = [str(g) for g in config["genres"]]
        self.clip_samples = int(config["clip_samples"])
        self.device = resolve_device(str(config.get("device", "auto")))
        artifacts = context.artifacts
        checkpoints = [_member_file(m, artifacts) for m in config["members"]]
        self.ensemble = load_ensemble(
            checkpoints, base=artifacts.get(BASE_ARTIFACT), device=self.device
        )

    def probabilities(self, files: Sequence[str | os.PathLike], names=None):
        """(files, genres) probabilities; see genreflow.inference.ensemble_probabilities."""
        from genreflow.inference import ensemble_probabilities

        return ensemble_probabilities(
            self.ensemble, files, clip_samples=self.clip_samples, device=self.device, names=names
        )

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        try:
            rows = _audio_rows(model_input)
            with tempfile.TemporaryDirectory(prefix="genreflow-rows-") as folder:
                files = []
                for i, data in enumerate(rows):
                    # No suffix: the decoder is chosen by the bytes alone (genreflow.audio).
                    files.append(Path(folder) / f"row-{i}")
                    files[-1].write_bytes(data)
                probabilities = self.probabilities(files, [f"row {i}" for i in range(len(rows))])
        except GenreflowError as exc:
            # MLflow answers a request that raises this with HTTP 400 and its message.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as exc:
            # Anything else is ours to fix: the trace goes to the server's log, not to the
            # client (MLflow would send it back in the answer).
            _log.exception("predicting failed")
            raise MlflowException(
                f"internal error while predicting ({type(exc).__name__}); the server's log "
                "has the details",
                error_code=INTERNAL_ERROR,
            ) from exc
        table = pd.DataFrame(probabilities, columns=self.genres)
        table.insert(0, GENRE, [self.genres[int(i)] for i in probabilities.argmax(axis=1)])
        return table


def _audio_rows(model_input) -> list[bytes]:
    """The `audio` column's bytes, row by row: base64 text (what JSON carries), checked
    row by row, or bytes (a table built in Python); every row that holds neither is named.
    """
    import pandas as pd

    from genreflow.inference import check_request_rows

    if not isinstance(model_input, pd.DataFrame) or AUDIO not in model_input.columns:
        raise GenreflowError(
            f"the input must be a table with a column '{AUDIO}' (one audio file's bytes per "
            "row, base64 in JSON)"
        )
    values = model_input[AUDIO].tolist()
    check_request_rows(len(values))
    rows, errors = [], []
    for i, value in enumerate(values):
        if isinstance(value, str):
            try:
                rows.append(_base64(value))
            except ValueError as exc:  # binascii.Error
                errors.append(f"row {i}: not base64 ({exc})")
        elif isinstance(value, (bytes, bytearray)):
            rows.append(bytes(value))
        else:
            errors.append(f"row {i}: no audio file's bytes (got {type(value).__name__})")
    if errors:
        raise GenreflowError("; ".join(errors))
    return rows


def _base64(text: str) -> bytes:
    """Strict base64: only its alphabet and padding, with line breaks allowed (MLflow's own
    client and input example wrap at 76 characters)."""
    return base64.b64decode("".join(text.split()), validate=True)


def _member_file(member: dict, artifacts: dict) -> str:
    """A fold's checkpoint in the model, checked against the SHA-256 recorded when it was
    logged (a copied model is trusted only if its weights are the ones logged)."""
    path = Path(artifacts[FOLDS_ARTIFACT]) / member["path"]
    if not path.is_file():
        raise GenreflowError(f"fold {member['fold']}'s checkpoint {path}: not in the model")
    found = storage.sha256_of(path)
    if found != member["sha256"]:
        raise GenreflowError(
            f"fold {member['fold']}'s checkpoint {path}: SHA-256 {found}, but the model was "
            f"logged with {member['sha256']}"
        )
    return str(path)


# --- logging -----------------------------------------------------------------------------
@dataclass
class LoggedEnsemble:
    model_id: str
    model_uri: str  # models:/<model_id>
    stored: dict[str, int]  # every file the model carries -> its bytes
    moved: list[str]  # the fold runs whose checkpoints now live in the model only


def requirements() -> list[str]:
    """REQUIREMENTS pinned to what is installed here, PyTorch's CPU index first (pip passes
    option lines of requirements.txt on). A local build tag (torch's +cpu) is left out of
    the pin: `torch==X` matches X+cpu on PyTorch's index, and X+cu128 already installed.
    The model serves with the full mlflow (its scoring server), at the version whose client
    logged it."""
    from genreflow.tracking.client import installed_version

    pins = [f"--extra-index-url {TORCH_INDEX}"]
    for name in REQUIREMENTS:
        found = installed_version(name)
        pins.append(f"{name}=={found.split('+')[0]}" if found else name)
    return pins


def input_example():
    """One row: a second of a 440 Hz tone as 16-bit WAV bytes, at 44.1 kHz stereo (any
    rate and channel count is accepted)."""
    import io

    import numpy as np
    import pandas as pd
    import soundfile

    rate = 44100
    tone = 0.1 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone, tone], axis=1), rate, format="WAV", subtype="PCM_16")
    return pd.DataFrame({AUDIO: [buffer.getvalue()]})


def signature(genres: Sequence[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        # Text, not binary: MLflow would decode binary base64 itself, leniently (it skips
        # what is not base64) and for the whole column at once; _audio_rows checks each row.
        inputs=Schema([ColSpec("string", AUDIO)]),
        outputs=Schema([ColSpec("string", GENRE), *(ColSpec("double", g) for g in genres)]),
    )


def _bundle(workdir: Path) -> Path:
    """The genreflow package's source, copied for code_paths (no caches, no KFP side)."""
    package = Path(__file__).resolve().parent
    out = workdir / "code" / package.name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(package, out, ignore=shutil.ignore_patterns(*NOT_BUNDLED))
    return out


def _stage_members(checkpoints: dict[int, str | Path], folder: Path) -> list[dict]:
    """fold -> checkpoint laid out as folder/fold01/best.pth, ... (hard links where the
    file system allows: a fine-tuned checkpoint is 330 MB); the model config's members."""
    shutil.rmtree(folder, ignore_errors=True)
    members = []
    for fold, path in sorted(checkpoints.items()):
        path = Path(path)
        relative = f"fold{fold:02d}/{path.name}"
        (folder / relative).parent.mkdir(parents=True)
        try:
            os.link(path, folder / relative)
        except OSError:  # another file system, or no hard links
            shutil.copyfile(path, folder / relative)
        members.append({"fold": fold, "path": relative, "sha256": storage.sha256_of(path)})
    return members


def log_ensemble(
    tracking_uri: str,
    run_id: str,
    checkpoints: dict[int, str | Path],
    *,
    clip_samples: int,
    base: str | Path | None = None,
    workdir: str | Path,
    tags: dict[str, str] | None = None,
) -> LoggedEnsemble:
    """Log the fold checkpoints (fold -> best.pth, or head.pth beside the frozen `base`)
    as one model of the run `run_id` (the pipeline's parent), a LoggedModel in MLflow 3
    with `tags`, every checkpoint inside it; then move the fold runs' copies into it
    (their runs point to the model instead)."""
    from genreflow.data.genres import GENRES
    from genreflow.tracking.client import tracked
    from genreflow.tracking.models import log_pyfunc_model, model_files, move_checkpoints

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    members = _stage_members(checkpoints, workdir / FOLDS_ARTIFACT)
    artifacts = {FOLDS_ARTIFACT: str(workdir / FOLDS_ARTIFACT)}
    if base is not None:
        artifacts[BASE_ARTIFACT] = str(base)
    config = {
        "genres": list(GENRES),
        "clip_samples": clip_samples,
        "device": "auto",
        "members": members,
    }

    def log() -> str:
        return log_pyfunc_model(
            tracking_uri,
            run_id,
            name=MODEL_NAME,
            tags=tags or {},
            python_model=str(MODEL_CODE),
            code_paths=[str(_bundle(workdir))],
            artifacts=artifacts,
            model_config=config,
            signature=signature(GENRES),
            input_example=input_example(),
            pip_requirements=requirements(),
            metadata={"genres": list(GENRES), "clip_samples": clip_samples},
        )

    model_id = tracked(f"logging the fold ensemble to {tracking_uri}", log, keep=str(workdir))
    stored = model_files(tracking_uri, model_id)
    # Where MLflow put each checkpoint in the model (artifacts/folds/fold01/best.pth).
    in_model = {}
    for member in members:
        suffix = f"{FOLDS_ARTIFACT}/{member['path']}"
        path = next(p for p in stored if p == suffix or p.endswith("/" + suffix))
        in_model[member["fold"]] = (path, member["sha256"])
    moved = move_checkpoints(tracking_uri, run_id, model_id, in_model)
    shutil.rmtree(workdir / FOLDS_ARTIFACT, ignore_errors=True)
    return LoggedEnsemble(model_id, f"models:/{model_id}", stored, moved)
