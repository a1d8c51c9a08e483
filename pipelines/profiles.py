"""Named sets of pipeline arguments: what `genreflow run --profile NAME` passes.

A profile holds only what differs from the pipeline's defaults; the recipe comes from
genreflow.recipe (`profile_arguments` spells it out, for the path the profile takes).

- seed: the recipe of qiuqiangkong/panns_transfer_to_gtzan (runme.sh and main.py): the
  published Cnn14_mAP=0.431.pth, the whole network fine-tuned with the fine-tune recipe's
  defaults (Adam lr 1e-4, batch 32, mixup, 10,000 iterations, 30 s clips), and the seed's
  model selection: it watched the held-out fold while training (`selection="heldout"`),
  so its numbers compare with the published ones. A GPU job (about 30 minutes a fold on
  a V100).
- demo: the embedded default. A synthetic GTZAN-shaped set of short clips and the
  frozen-base fast path with the head's recipe (full batch, AdamW, weight decay 1), so
  the whole 10-fold DAG finishes in minutes on two CPU cores. The published weights
  cannot be fetched here, so the base is a seeded random Cnn14 (pretrained "").
"""

from __future__ import annotations

from genreflow import recipe
from genreflow.errors import GenreflowError
from genreflow.storage import refuse_credentials_in

# Zenodo record 3987831 (the PANNs release), as named in the seed's runme.sh.
PANNS_CNN14_URL = "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"

PROFILES: dict[str, dict] = {
    "seed": dict(pretrained=PANNS_CNN14_URL, selection="heldout"),
    "demo": dict(freeze_base=True, clip_seconds=2.0),
}
# The synthetic set the demo makes when no --source is given: GTZAN's 1000 file names, so
# both protocols run on it (the fault-filtered lists name clips up to genre.00099).
DEMO_SYNTH = dict(clips_per_genre=100, seconds=2.0, seed=0)


def profile_arguments(name: str) -> dict:
    """The profile's arguments with the recipe of the path it takes written out (the
    fine-tune recipe, or with freeze_base the head's), so a run records all of it."""
    if name not in PROFILES:
        raise GenreflowError(f"--profile {name}: known profiles: {', '.join(PROFILES)}")
    differences = PROFILES[name]
    freeze_base = bool(differences.get("freeze_base", False))
    unused = recipe.other_path_parameters(freeze_base)
    spelled_out = {
        parameter: default
        for parameter, _, default in recipe.pipeline_parameters()
        if parameter not in unused
    }
    return {"freeze_base": freeze_base, **spelled_out, **differences}


def run_arguments(profile: str | None, given: dict) -> dict:
    """A run's arguments: the profile's (none: only `given`), then what a person gave.

    Raises:
        GenreflowError: an unknown profile, or a recipe argument the run would ignore (the
            fine-tune recipe with freeze_base on, head_* with it off).
    """
    arguments = {**(profile_arguments(profile) if profile else {}), **given}
    refuse_credentials_in(arguments)  # KFP shows every argument: no password in a URI
    try:
        recipe.check_pipeline_arguments(arguments, given)
    except ValueError as exc:
        raise GenreflowError(str(exc)) from None
    return arguments
