"""Run the cross-validation pipeline on this machine through kfp.local: the embedded default.

The DAG is the one a cluster runs. kfp.local's subprocess runner executes each component
in this Python environment instead of its image, runs the loop's iterations one after
another instead of in parallel, and ignores GPU requests (with a warning).
"""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

from genreflow.pipelines.profiles import DEMO_SYNTH, PROFILES, run_arguments


def demo_source(workspace: Path) -> tuple[str, str]:
    """Make (once) the synthetic GTZAN-shaped archive the demo runs on: (file:// URL, sha256)."""
    from genreflow.data.synth import make_synthetic_gtzan

    archive, sha256 = make_synthetic_gtzan(workspace / "source", **DEMO_SYNTH)
    return archive.resolve().as_uri(), sha256


def run_local(
    workspace: str | Path,
    *,
    profile: str = "demo",
    source: str | None = None,
    sha256: str = "",
    tracking_uri: str | None = None,
    overrides: dict | None = None,
    cache: bool = True,
) -> dict:
    """Run the whole DAG locally; return the aggregate report (report.json, plus
    `results_dir`: where it and the other report files are).

    Args:
        workspace: holds the synthetic source, the KFP outputs, the cache and mlflow.db.
        profile: a name in PROFILES (demo, seed).
        source: the dataset; default for the demo profile: a synthetic set made here.
        sha256: the source archive's checksum ("" = none, or the synthetic set's own).
        tracking_uri: MLflow; default MLFLOW_TRACKING_URI or workspace/mlflow.db.
        overrides: pipeline arguments that replace the profile's (e.g. folds, iterations);
            a recipe argument the run would not use is an error (see profiles.run_arguments).
        cache: reuse unchanged download/pack/embed results from earlier runs.
    """
    from kfp import local

    from genreflow.pipelines.cv import build_pipeline
    from genreflow.tracking import default_tracking_uri

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    if source is None:
        if profile != "demo":
            raise ValueError(f"profile {profile!r} needs --source (the GTZAN archive or folder)")
        source, sha256 = demo_source(workspace)
    given = {
        "source": source,
        "sha256": sha256,
        "profile": profile,
        "tracking_uri": tracking_uri or default_tracking_uri(workspace),
        **(overrides or {}),
    }
    arguments = run_arguments(profile, given)
    print(f"genreflow run: profile {profile}, arguments {json.dumps(arguments)}", file=sys.stderr)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workspace / "kfp"),
        enable_caching=cache,
        cache_root=str(workspace / "kfp-cache"),
    )
    # kfp.local swaps builtins.print for an indenting one while a task runs and can leave
    # it swapped; numba (librosa), imported later in this process, then fails to start.
    original_print = builtins.print
    runs = workspace / "kfp"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    try:
        build_pipeline()(**arguments)
    finally:
        builtins.print = original_print
    # A pipeline returns no output from inside an exit handler: the run's outputs are
    # read where kfp.local puts them, <pipeline root>/<run>/<task>/<output>.
    (run,) = set(runs.iterdir()) - before
    found = sorted(run.glob("aggregate*/results/report.json"))  # either branch's aggregate
    if len(found) != 1:
        raise RuntimeError(f"{run}: expected one aggregate report, found {len(found)}")
    report = json.loads(found[0].read_text())
    report["results_dir"] = str(found[0].parent)
    started = json.loads((run / "start-run" / "executor_output.json").read_text())
    report["mlflow_run_id"] = started["parameterValues"]["Output"]
    return report
