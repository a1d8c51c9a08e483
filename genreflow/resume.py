"""A fine-tuning run's resume state: what `resume.pt` holds, and when a folder may be resumed.

`resume.pt` is written last at every evaluation of an unfinished run: the model, the
optimiser, the sampler's position, every random state, the metrics so far and the
selected evaluation, the run's config and a fingerprint of its features. Killed at any
moment, the same command continues from it and ends exactly where an uninterrupted run
would (bit for bit on the CPU). Plain types and tensors only, so that it loads with
torch.load(weights_only=True).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from genreflow.atomic import write_atomic
from genreflow.errors import GenreflowError
from genreflow.fold_result import SUMMARY, Progress, current_names, read_summary
from genreflow.recipe import recipe_version_of

RESUME = "resume.pt"

# A resumed run must agree with the saved one on everything that changes its outputs;
# paths, device and precision may change, and an unfinished run may be given more iterations.
RESULT_FIELDS = (
    "fold",
    "pretrained",
    "pretrained_sha256",
    "freeze_base",
    "batch_size",
    "lr",
    "mixup",
    "mixup_alpha",
    "eval_every",
    "seed",
    "protocol",
    "selection",
    "recipe_version",
)


def state(progress: Progress, model, optimizer, sampler, mixup, config, fingerprint) -> dict:
    """resume.pt's content at this point of the run: `sampler` is the run's EpochSampler,
    `mixup` its Mixup (None without), `config` its TrainConfig, `fingerprint` its features'."""
    return {
        "iteration": progress.iteration,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "random": random_states(mixup),
        "metrics": progress.metrics,
        "best": progress.best,
        "seconds": progress.seconds,
        "train_seconds": progress.train_seconds,
        "clips": progress.clips,
        "config": dataclasses.asdict(config),
        "features": fingerprint,
    }


def save(out: Path, content: dict) -> None:
    write_atomic(out / RESUME, lambda f: torch.save(content, f))


def restore(saved: dict, *, model, optimizer, sampler, mixup) -> Progress:
    """Put a run back where `saved` (resume.pt's content) left it."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    sampler.load_state_dict(saved["sampler"])
    restore_random_states(saved["random"], mixup)
    return Progress(
        iteration=saved["iteration"],
        metrics=[current_names(row) for row in saved["metrics"]],  # older names too
        best=saved["best"],
        seconds=saved["seconds"],
        train_seconds=saved["train_seconds"],
        clips=saved["clips"],
    )


# --- random states -----------------------------------------------------------------------
def random_states(mixup) -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if mixup is not None:
        states["mixup"] = mixup.state_dict()
    return states


def restore_random_states(states: dict, mixup) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuples(states["python"]))
    # A run moved to another machine keeps going; only its CUDA draws differ then.
    if "cuda" in states and torch.cuda.is_available():
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
    if mixup is not None:
        mixup.load_state_dict(states["mixup"])


def _as_tuples(value):
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


# --- what a folder holds -----------------------------------------------------------------
def check_same_run(out: Path, saved: dict, config, fingerprint: dict) -> None:
    """A run found in `out` must be this config's on the same features, or it is an error."""
    there = {**saved["config"], "recipe_version": recipe_version_of(saved["config"])}
    differ = [f for f in RESULT_FIELDS if there.get(f) != getattr(config, f)]
    if differ:
        details = ", ".join(
            f"{f}={there.get(f)!r} there, {getattr(config, f)!r} now" for f in differ
        )
        raise GenreflowError(
            f"{out}: holds a run with other settings ({details}); rerun with the same "
            "settings to resume, or choose another --out"
        )
    if saved["features"] != fingerprint:
        raise GenreflowError(
            f"{out}: holds a run on other features ({saved['features']}) than "
            f"{config.features} ({fingerprint}); choose another --out"
        )


def finished_run(out: Path, config, fingerprint: dict) -> dict | None:
    """The summary of a finished run of this config in `out`, or None."""
    path = out / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = read_summary(out)
        check_same_run(out, summary, config, fingerprint)
    except (ValueError, KeyError, TypeError) as exc:
        raise GenreflowError(f"{path}: unreadable summary ({exc}); choose another --out") from exc
    if summary["iterations"] != config.iterations:
        raise GenreflowError(
            f"{out}: holds a run finished at iteration {summary['iterations']}; for "
            f"--iterations {config.iterations} choose another --out (the resume state is "
            "removed when a run finishes)"
        )
    return summary


def load(out: Path, config, fingerprint: dict) -> dict | None:
    """The state saved at the last evaluation of an unfinished run in `out`, or None."""
    path = out / RESUME
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises, the file is unusable
        raise GenreflowError(
            f"{path}: unreadable resume state ({exc}); delete it to start over"
        ) from exc
    check_same_run(out, saved, config, fingerprint)
    if saved["iteration"] >= config.iterations:
        raise GenreflowError(
            f"{out}: already trained to iteration {saved['iteration']}, past "
            f"--iterations {config.iterations}; choose another --out"
        )
    return saved


def remove_partial_writes(out: Path, names) -> None:
    """Temporary files a killed run left behind (a checkpoint is 330 MB)."""
    if not out.is_dir():
        return
    for name in names:
        for partial in out.glob(f".{name}.*.tmp"):
            partial.unlink(missing_ok=True)
