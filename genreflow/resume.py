"""A fine-tuning run's resume state: what `resume.pt` holds, and when a folder may be resumed.

`resume.pt` is written last at an evaluation of an unfinished run, on a schedule
(TrainConfig.resume_every_seconds: the first evaluation, then the first one at least that
long after the last state; 0: every evaluation): the model, the optimiser, the sampler's
position, every random state, the metrics so far and the selected evaluation, the run's
config and a fingerprint of its features. Killed at any moment, the same command continues
from it and ends exactly where an uninterrupted run would (bit for bit on the CPU), having
lost at most the work since that state. Plain types and tensors only, so that it loads
with torch.load(weights_only=True).

best.pth is written at every improvement, so by the time of a kill it may be newer than the
resume state. Each state therefore keeps a hard link to the best.pth it vouches for
(`.best-at-N.pth`, hidden, never published), which a resume puts back: a resumed run that
does not improve where the killed one did (a GPU is not bit-exact) still ends with the
checkpoint its summary names.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import torch

from genreflow.atomic import publish_copy, write_atomic
from genreflow.errors import GenreflowError
from genreflow.fold_result import BEST, SUMMARY, Progress, current_names, read_summary
from genreflow.recipe import recipe_version_of

RESUME = "resume.pt"
KEPT_BEST = ".best-at-{iteration}.pth"  # the best.pth a resume state vouches for

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
    """Write resume.pt, after a hard link to the best.pth it vouches for (no second write);
    the links of earlier states go once it is in place."""
    kept = out / KEPT_BEST.format(iteration=content["best"]["iteration"])
    if not kept.exists() and (out / BEST).is_file():
        publish_copy(out / BEST, kept)
    write_atomic(out / RESUME, lambda f: torch.save(content, f))
    _remove_kept_best(out, but=kept)


def restore_best(out: Path, saved: dict) -> None:
    """Put back the best.pth that `saved` (resume.pt's content) vouches for, where a later
    evaluation of the killed run replaced it. A state pulled from gs:// comes with the
    best.pth uploaded beside it instead, and has no link here."""
    kept, best = out / KEPT_BEST.format(iteration=saved["best"]["iteration"]), out / BEST
    # Already the same file: renaming a link over its twin would do nothing (rename(2)),
    # leaving the temporary link behind.
    if kept.is_file() and not (best.is_file() and os.path.samefile(kept, best)):
        publish_copy(kept, best)


def discard(out: Path) -> None:
    """Remove the resume state of a finished run: resume.pt (1.3 GB for a fully
    fine-tuned Cnn14) and its kept best.pth."""
    (out / RESUME).unlink(missing_ok=True)
    _remove_kept_best(out)


def _remove_kept_best(out: Path, but: Path | None = None) -> None:
    for path in out.glob(KEPT_BEST.format(iteration="*")):
        if path != but:
            path.unlink(missing_ok=True)


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
