"""The two training recipes, defined once: every knob, its default and what it means.

- `TrainConfig`: one fold fine-tuned through the whole Cnn14 (genreflow.train), with the
  seed's recipe as its defaults (qiuqiangkong/panns_transfer_to_gtzan: Adam lr 1e-4,
  batch 32, mixup, evaluation every 200 of 10,000 iterations).
- `HeadConfig`: one fold's genre head on stored embeddings of a frozen base
  (genreflow.head), with its own recipe (full batch, AdamW lr 1e-3, weight decay 1, 1000
  steps): the seed's fine-tuning defaults are far from right for a 2048 -> 10 linear head.

Each is saved as it is into every checkpoint's metadata and every summary.json (`config`).
The knobs marked with `knob()` are derived from here by the command's options (`genreflow
train`, `genreflow train-head`: `add_options`) and by the pipeline's parameters
(`PIPELINE_RECIPE`): the fine-tune recipe under its own names, the head's under head_*
names, so that a pipeline run with freeze_base=true trains its heads with the head's
recipe, never with the fine-tune defaults. Nothing here imports torch: compiling the
pipeline and `genreflow --help` stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from genreflow.splits import DEFAULT_PROTOCOL, DEFAULT_SELECTION

PRECISIONS = ("auto", "fp32", "bf16")

# What the same knobs train changes with the code now and then; the version says which code,
# and is part of every config (so of checkpoints, summaries, resume state, the fold runs'
# params and the fold key): a fold of another version is never resumed or reused as this one.
RECIPE_VERSIONS = {
    1: "clip_nll summed over genres (10x the seed's loss); genreflow before recipe 2",
    2: "the seed's clip_nll, a mean over clips x genres (genreflow.losses)",
}
RECIPE_VERSION = 2
FINE_TUNE_PREFIX, HEAD_PREFIX = "", "head_"


def knob(default, help: str, *, metavar: str | None = None, choices=None, pipeline: bool = True):
    """A recipe field: its default, its help text (the command's and the pipeline's), and
    whether the pipeline takes it as a parameter."""
    metadata = {"help": help, "metavar": metavar, "choices": choices, "pipeline": pipeline}
    return field(default=default, metadata={"knob": metadata})


@dataclass
class TrainConfig:
    """One fold's fine-tuning run. Saved into every checkpoint's metadata and summary.json."""

    features: str
    fold: int
    out: str
    pretrained: str | None = None
    pretrained_sha256: str | None = None
    freeze_base: bool = False
    iterations: int = knob(10000, "optimiser steps", metavar="N")
    batch_size: int = knob(32, "clips per step (mixup draws twice as many)", metavar="B")
    lr: float = knob(1e-4, "Adam's learning rate", metavar="X")
    mixup: bool = knob(True, "mixup with alpha 1 on pairs of clips")
    mixup_alpha: float = knob(1.0, "mixup's Beta(A, A)", metavar="A", pipeline=False)
    eval_every: int = knob(200, "evaluate and checkpoint every N iterations", metavar="N")
    # How a run checkpoints, not what it trains (so not a pipeline parameter): the resume
    # state (1.3 GB for the whole Cnn14) is written at the first evaluation, then at the
    # first one at least this long after the last, so that a kill loses at most this much
    # work plus one evaluation interval; 0 writes it at every evaluation (genreflow.resume).
    resume_every_seconds: float = knob(
        300.0,
        "write the resume state at most this often (0: at every evaluation)",
        metavar="S",
        pipeline=False,
    )
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    # auto: bf16 autocast where the hardware computes in bf16 natively (CUDA with bf16,
    # CPUs with AVX512-BF16/AMX or Arm BF16), fp32 elsewhere; see runtime.resolve_precision.
    # The pipeline's `precision` also sets the frozen-base embed's (SHARED_PARAMETERS).
    precision: str = knob(
        "auto",
        "bf16 autocast or fp32; auto: bf16 where the GPU or CPU computes in bf16 natively "
        "(CPU flags avx512_bf16, amx_bf16), else fp32",
        choices=PRECISIONS,
    )
    # genreflow.splits: cv10 | filtered, and validation | heldout (what chooses best.pth).
    protocol: str = DEFAULT_PROTOCOL
    selection: str = DEFAULT_SELECTION
    recipe_version: int = RECIPE_VERSION


@dataclass
class HeadConfig:
    """One fold's head training. Saved into head.pth's metadata and into summary.json.

    batch_size 0 means the whole training set at every step (full batch).
    """

    embeddings: str
    fold: int
    out: str
    iterations: int = knob(1000, "optimiser steps", metavar="N")
    batch_size: int = knob(0, "clips per step; 0 = all (full batch)", metavar="B")
    lr: float = knob(1e-3, "AdamW's learning rate", metavar="X")
    weight_decay: float = knob(1.0, "AdamW's decoupled weight decay", metavar="X")
    mixup: bool = knob(False, "mixup on pairs of standardised embeddings")
    mixup_alpha: float = knob(1.0, "mixup's Beta(A, A)", metavar="A", pipeline=False)
    eval_every: int = knob(100, "evaluate every N steps (and at the end)", metavar="N")
    seed: int = 0
    # genreflow.splits: which rows train, choose the head and are reported.
    protocol: str = DEFAULT_PROTOCOL
    selection: str = DEFAULT_SELECTION
    recipe_version: int = RECIPE_VERSION


def recipe_version_of(config: dict) -> int:
    """The recipe version a recorded config (summary.json's, resume.pt's, a checkpoint's)
    was trained under: 1 where none is recorded (before versions were)."""
    return int(config.get("recipe_version", 1))


def recipe_label(version: int) -> str:
    """`recipe N (what it means)`, for reports and comparisons."""
    return f"recipe {version} ({RECIPE_VERSIONS.get(version, 'unknown to this genreflow')})"


def check_recipe_version(version: int) -> None:
    """This code trains only its own recipe version."""
    from genreflow.errors import GenreflowError

    if version != RECIPE_VERSION:
        raise GenreflowError(
            f"recipe_version {version!r}: this genreflow trains only {recipe_label(RECIPE_VERSION)}"
        )


def knobs(config: type) -> list[dataclasses.Field]:
    """The recipe fields of TrainConfig or HeadConfig, in their order."""
    return [f for f in dataclasses.fields(config) if "knob" in f.metadata]


def defaults(config: type) -> dict:
    """The recipe's defaults: knob name -> default."""
    return {f.name: f.default for f in knobs(config)}


def field_type(config: type, name: str) -> type:
    """A field's type (bool, int, float or str)."""
    return typing.get_type_hints(config)[name]


# Pipeline parameters that both paths use: the fine-tune's training step and the frozen
# base's embed step compute in the same `precision`.
SHARED_PARAMETERS = ("precision",)

# The pipeline's recipe parameters: (parameter name, config, field name), fine-tune first.
PIPELINE_RECIPE: tuple[tuple[str, type, str], ...] = tuple(
    (prefix + f.name, config, f.name)
    for prefix, config in ((FINE_TUNE_PREFIX, TrainConfig), (HEAD_PREFIX, HeadConfig))
    for f in knobs(config)
    if f.metadata["knob"]["pipeline"]
)


def pipeline_parameters() -> list[tuple[str, type, object]]:
    """(name, type, default) of every recipe parameter the pipeline takes."""
    return [
        (name, field_type(config, field_name), defaults(config)[field_name])
        for name, config, field_name in PIPELINE_RECIPE
    ]


def recipe_arguments(config: type, parameters: dict) -> dict:
    """The `config` recipe's fields from the pipeline's parameters (head_* for HeadConfig)."""
    return {
        field_name: parameters[name]
        for name, owner, field_name in PIPELINE_RECIPE
        if owner is config
    }


def other_path_parameters(freeze_base: bool) -> tuple[str, ...]:
    """The recipe parameters that a pipeline run with this freeze_base does not use."""
    unused = TrainConfig if freeze_base else HeadConfig
    return tuple(
        name
        for name, config, _ in PIPELINE_RECIPE
        if config is unused and name not in SHARED_PARAMETERS
    )


def check_pipeline_arguments(arguments: dict, given: dict) -> None:
    """Refuse recipe arguments that the run would ignore: `given` (what a person set) must
    not hold the fine-tune recipe when freeze_base is on (the heads train with head_*),
    nor head_* when it is off. `arguments` are all of the run's arguments (values, or
    --param text).

    Raises:
        ValueError: naming each such argument and the one that applies instead.
    """
    freeze_base = arguments.get("freeze_base", False)
    if isinstance(freeze_base, str):  # --param text, typed later against the pipeline
        freeze_base = freeze_base.strip().lower() == "true"
    ignored = [name for name in other_path_parameters(freeze_base) if name in given]
    if not ignored:
        return
    if freeze_base:
        instead = ", ".join(HEAD_PREFIX + name for name in ignored)
        why = f"with freeze_base the heads train with the head recipe ({instead})"
    else:
        instead = ", ".join(name.removeprefix(HEAD_PREFIX) for name in ignored)
        why = f"without freeze_base the whole Cnn14 is fine-tuned ({instead})"
    raise ValueError(f"{', '.join(ignored)}: not used by this run; {why}")


# --- the command's options ---------------------------------------------------------------
def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """One option per recipe field of `config` (--iterations, --batch-size, ...), with
    the field's type, default and help."""
    for f in knobs(config):
        meta = f.metadata["knob"]
        kind = field_type(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            on_off = "on" if f.default else "off"
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f"{meta['help']} (default {on_off})",
            )
            continue
        parser.add_argument(
            flag,
            type=kind,
            default=f.default,
            metavar=meta["metavar"],
            choices=meta["choices"],
            help=f"{meta['help']} (default {f.default})",
        )


def from_options(config: type, args: argparse.Namespace, **fields) -> object:
    """`config` built from the parsed options of `add_options` and the other `fields`."""
    return config(**{f.name: getattr(args, f.name) for f in knobs(config)}, **fields)
