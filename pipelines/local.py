"""Run the cross-validation pipeline on this machine through kfp.local: the embedded default.

The DAG is the one a cluster runs. kfp.local's subprocess runner executes each component
in this Python environment instead of its image, runs the loop's iterations one after
another instead of in parallel, and ignores GPU requests (with a warning).
"""

from __future__ import annotations

import builtins
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from genreflow.pipelines.profiles import DEMO_SYNTH, PROFILES, run_arguments
from genreflow.storage import redacted_text

RUNNERS = ("subprocess", "docker")


# The kfp releases whose DockerRunner internals _wait_for_every_container was read from and
# checked against (docker_task_handler.run_docker_container, its signature and its
# add_latest_tag_if_not_present). 2.16.0 to 2.17.3 take a removed container for a success
# (kubeflow/pipelines#13332, open; fixes proposed in #13402 and #13907); 2.15.0 to 2.15.2 read
# the status right but never remove a container. The range starts at pyproject's kfp floor
# (2.17.0, the run TTL); a later release may fix or move this code.
PATCHED_KFP = ((2, 17, 0), (2, 17, 3))


def _kfp_version() -> tuple[int, ...]:
    from importlib.metadata import version

    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version("kfp"))
    return tuple(int(part) for part in match.groups()) if match else ()


def _wait_for_every_container() -> bool:
    """Make kfp.local's DockerRunner read each container's exit status for certain, on the
    kfp releases in PATCHED_KFP; elsewhere leave kfp's own, say so, and return False.

    kfp 2.16 and 2.17's docker_task_handler.run_docker_container start containers with
    auto_remove=True and, when the container is gone before it asks how it ended, takes
    that for success (status 0). A step that fails fast can then pass; podman answers
    such a late question with HTTP 500, not 404, which kfp does not catch. Here a container
    is kept until its status is read, then removed.
    """
    from kfp.local import docker_task_handler

    found = _kfp_version()
    lowest, highest = PATCHED_KFP
    if not lowest <= found <= highest:
        shown = ".".join(map(str, found)) or "unknown"
        print(
            f"genreflow run --runner docker: kfp {shown} is outside the releases genreflow's "
            f"fix for kubeflow/pipelines#13332 was checked against "
            f"({'.'.join(map(str, lowest))} to {'.'.join(map(str, highest))}); kfp's own "
            "DockerRunner runs the steps, and may report a step that fails at once as "
            "succeeded",
            file=sys.stderr,
        )
        return False

    def run_container(client, image, command, volumes, **run_args) -> int:
        image = docker_task_handler.add_latest_tag_if_not_present(image=image)
        if not client.images.list(name=image):
            print(f"Pulling image {image!r}")
            client.images.pull(image)
        container = client.containers.run(
            image=image, command=command, detach=True, volumes=volumes, **run_args
        )
        try:
            for line in container.logs(stream=True, follow=True):
                print(line.decode(errors="replace"), end="")
            return int(container.wait()["StatusCode"])
        finally:
            container.remove(force=True)

    docker_task_handler.run_docker_container = run_container
    return True


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
    runner: str = "subprocess",
    images: Mapping[str, str] | None = None,
) -> dict:
    """Run the whole DAG locally; return the aggregate report (report.json, plus
    `results_dir`: where it and the other report files are).

    Args:
        workspace: holds the synthetic source, the KFP outputs, the cache and mlflow.db.
        profile: a name in PROFILES (demo, seed).
        source: the dataset; default for the demo profile: a synthetic set made here; the
            seed profile has none (it names the sources that work instead).
        sha256: the source archive's checksum ("" = none, or the synthetic set's own;
            "original": a copy of genres.tar.gz, checked against the original's).
        tracking_uri: MLflow; default MLFLOW_TRACKING_URI or workspace/mlflow.db.
        overrides: pipeline arguments that replace the profile's (e.g. folds, iterations);
            a recipe argument the run would not use is an error (see profiles.run_arguments).
        cache: reuse unchanged download/pack/embed results from earlier runs.
        runner: "subprocess", every step in this Python environment; or "docker", every step
            in its image through a Docker API (DOCKER_HOST: Docker, or podman's), as the
            image's user, on the host's network (so 127.0.0.1 is the host's servers), with
            the pipeline root mounted at the same path.
        images: {"cpu": ref, "gpu": ref}, the images the steps run in with runner="docker"
            (a tag or digest present locally; default: the components' own references).
    """
    from genreflow.data.download import sources_hint
    from genreflow.errors import GenreflowError

    if profile not in PROFILES:
        raise GenreflowError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if source is None and profile != "demo":
        # No default: the official address is dead, and each copy has its own checksum.
        raise GenreflowError(
            f"profile {profile} needs --source, the real GTZAN: {sources_hint()} "
            "(README.md, Real data)"
        )

    if runner not in RUNNERS:
        raise GenreflowError(f"unknown runner {runner!r}; known: {', '.join(RUNNERS)}")
    from kfp import local

    from genreflow.pipelines.cv import build_pipeline
    from genreflow.steps.fold import WORK_FOLDER
    from genreflow.tracking.client import default_tracking_uri

    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    if source is None:
        source, sha256 = demo_source(workspace)
    given = {
        "source": source,
        "sha256": sha256,
        "profile": profile,
        "tracking_uri": tracking_uri or default_tracking_uri(workspace),
        **(overrides or {}),
    }
    arguments = run_arguments(profile, given)
    shown = redacted_text(json.dumps(arguments))
    print(f"genreflow run: profile {profile}, arguments {shown}", file=sys.stderr)
    runs = workspace / "kfp"
    runs.mkdir(exist_ok=True)
    if runner == "docker":
        # The images run as their own user (uid 10001), which must write the outputs that
        # the host-side runner lays out: the root and what is made under it, for anyone.
        runs.chmod(0o1777)
        kfp_runner = local.DockerRunner(network_mode="host")
        _wait_for_every_container()
    else:
        kfp_runner = local.SubprocessRunner(use_venv=False)
    local.init(
        runner=kfp_runner,
        pipeline_root=str(runs),
        enable_caching=cache,
        cache_root=str(workspace / "kfp-cache"),
    )
    # kfp.local swaps builtins.print for an indenting one while a task runs and can leave
    # it swapped; numba (librosa), imported later in this process, then fails to start.
    original_print = builtins.print
    before = set(runs.iterdir())
    try:
        images = images or {}
        build_pipeline(image_cpu=images.get("cpu"), image_gpu=images.get("gpu"))(**arguments)
    finally:
        builtins.print = original_print
    # A pipeline returns no output from inside an exit handler: the run's outputs are
    # read where kfp.local puts them, <pipeline root>/<run>/<task>/<output>.
    (run,) = {p for p in set(runs.iterdir()) - before if p.name != WORK_FOLDER}
    found = sorted(run.glob("aggregate*/results/report.json"))  # either branch's aggregate
    if len(found) != 1:
        raise RuntimeError(f"{run}: expected one aggregate report, found {len(found)}")
    report = json.loads(found[0].read_text())
    report["results_dir"] = str(found[0].parent)
    started = json.loads((run / "start-run" / "executor_output.json").read_text())
    report["mlflow_run_id"] = started["parameterValues"]["Output"]
    report["tracking_uri"] = arguments["tracking_uri"]
    return report
