"""The pipeline's first and last steps: open its MLflow parent run, which every fold nests
under, and close it with the pipeline's true final state (the DAG's exit handler)."""

from __future__ import annotations

from dataclasses import dataclass, field

from genreflow.fold_result import FINE_TUNE, FROZEN_BASE
from genreflow.splits import DEFAULT_PROTOCOL, DEFAULT_SELECTION
from genreflow.tracking.addresses import pipeline_addresses, ui_hint
from genreflow.tracking.client import DEFAULT_EXPERIMENT
from genreflow.tracking.names import (
    DATA_SHA256_TAG,
    PATH_TAG,
    PIPELINE_RUN_TAG,
    PROTOCOL_TAG,
    RUN_URL_TAG,
    SELECTION_TAG,
)
from genreflow.tracking.runs import close_pipeline_run, start_pipeline_run


@dataclass
class ParentRun:
    """The opened parent run: its id ("" when tracking is off), where to look at it in the
    MLflow UI, and the same as Markdown (what the KFP run shows)."""

    run_id: str
    markdown: str
    addresses: dict[str, str] = field(default_factory=dict)


def open_run(
    tracking_uri: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    pipeline_run: str = "",
    pipeline_run_id: str = "",
    kfp_ui: str = "",
    images: str = "",
    profile: str = "custom",
    protocol: str = DEFAULT_PROTOCOL,
    selection: str = DEFAULT_SELECTION,
    source: str = "",
    sha256: str = "",
    pretrained: str = "",
    freeze_base: bool = False,
    clip_seconds: float = 30.0,
    seed: int = 0,
    representation: str = "waveform",
    recipe: dict | None = None,
) -> ParentRun:
    """Open the parent run of one pipeline run, tagged and with the pipeline's parameters.

    Args:
        tracking_uri: MLflow ("" = no tracking: nothing is opened).
        experiment: the MLflow experiment.
        pipeline_run: the KFP run's name: the parent's name and a tag to filter on.
        pipeline_run_id: the KFP run's id: a tag, by which `close_run` finds the run.
        kfp_ui: the KFP UI's address ("" = unknown): the parent links to the run's page.
        images: the images the steps run in (digests where the build gave them), a tag.
        profile: the recipe profile's name (demo, seed, custom), a tag.
        protocol, selection: cv10 or filtered; validation or heldout (tags and params).
        source, sha256, pretrained, freeze_base, clip_seconds, seed, representation: the
            pipeline's parameters, logged as params (sha256 as the data.sha256 tag).
        recipe: the pipeline's recipe parameters (genreflow.recipe.PIPELINE_RECIPE's
            names); only the recipe of the path the run takes is logged.
    """
    from genreflow.data.download import expected_checksums
    from genreflow.recipe import other_path_parameters

    if not tracking_uri:
        print("MLflow tracking is off (no tracking URI)")
        return ParentRun("", "MLflow tracking was off for this run (no tracking URI).\n")
    unused = set(other_path_parameters(freeze_base))
    params = {
        "protocol": protocol,
        "selection": selection,
        "source": source,
        "pretrained": pretrained or "random-init",
        "freeze_base": freeze_base,
        "clip_seconds": clip_seconds,
        "seed": seed,
        "representation": representation,
        **{name: value for name, value in (recipe or {}).items() if name not in unused},
    }
    kfp_ui = kfp_ui.rstrip("/")
    tags = {
        PIPELINE_RUN_TAG: pipeline_run,
        **({RUN_URL_TAG: f"{kfp_ui}/#/runs/details/{pipeline_run_id}"} if kfp_ui else {}),
        "images": images,
        "profile": profile,
        PROTOCOL_TAG: protocol,
        SELECTION_TAG: selection,
        # The checksum itself where it is known ("original", an official URL).
        DATA_SHA256_TAG: expected_checksums(source, sha256 or None)[0] or "unpinned",
        "model": "Cnn14",
        "freeze_base": freeze_base,
        PATH_TAG: FROZEN_BASE if freeze_base else FINE_TUNE,
    }
    run_id = start_pipeline_run(
        tracking_uri,
        experiment,
        run_name=pipeline_run or None,
        pipeline_run_id=pipeline_run_id,
        params=params,
        tags=tags,
    )
    addresses = pipeline_addresses(tracking_uri, run_id)
    hint = ui_hint(tracking_uri)
    markdown = (
        f"# MLflow\n\nParent run `{run_id}` of experiment `{experiment}`:\n\n"
        + "".join(f"- {what}: {address}\n" for what, address in addresses.items())
        + (f"\n({hint})\n" if hint else "")
    )
    return ParentRun(run_id, markdown, addresses)


def close_run(tracking_uri: str, pipeline_run_id: str, state: str) -> str | None:
    """End the parent run of the pipeline run `pipeline_run_id` with its final `state`
    (SUCCEEDED: FINISHED; FAILED; CANCELED: KILLED), and any fold run a killed pod left
    RUNNING; the parent's id (None: tracking off, or no parent was opened)."""
    if not tracking_uri:
        return None
    return close_pipeline_run(tracking_uri, pipeline_run_id, state)
