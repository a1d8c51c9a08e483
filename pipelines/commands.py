"""The pipeline's subcommands of the `genreflow` command: compile, run (kfp.local), submit.

They live with the pipelines, not in genreflow.cli: the library never imports the
pipelines package. The command finds them through the `genreflow.commands` entry point
(pyproject.toml), which names `add_commands`; like the library's subcommands, each
handler imports what it needs (kfp, the DAG) only when it runs, so `genreflow --help`
stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genreflow.cluster import MLFLOW_CREDENTIALS_SECRET
from genreflow.errors import GenreflowError
from genreflow.pipelines.profiles import PROFILES


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add compile, run and submit to the `genreflow` command's subcommands."""
    _add_compile_and_run(sub)
    _add_submit(sub)


def _add_compile_and_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the KFP pipeline to IR YAML, ready to upload",
        description="Write the pipeline's IR YAML with everything a cluster needs fixed in it "
        "(images, the MLflow Secret, GPU placement, each step's resources and timeout), to "
        "upload as it is (KFP UI, kfp run create, Vertex AI). The run's service account is "
        "not part of a pipeline: choose it when creating the run (infra/README.md).",
    )
    p.add_argument("--out", type=Path, default=Path("pipeline.yaml"), help="the YAML to write")
    p.add_argument(
        "--accelerator",
        help="GPU resource (default nvidia.com/gpu; for Vertex AI: NVIDIA_L4, ...)",
    )
    _add_cluster_flags(p)
    p.set_defaults(func=_run_compile)

    p = sub.add_parser("run", help="run the whole pipeline locally through kfp.local")
    p.add_argument(
        "--profile",
        default="demo",
        choices=sorted(PROFILES),
        help="demo (default: a synthetic set, minutes on a CPU) or seed (real GTZAN, a GPU job)",
    )
    p.add_argument("--workspace", type=Path, default=Path("workspace"))
    p.add_argument(
        "--source",
        default=None,
        help="dataset archive, URL or folder (the seed profile needs one; README: Real data)",
    )
    p.add_argument(
        "--sha256",
        default="",
        help="the source archive's SHA-256, or 'original' for a copy of genres.tar.gz",
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow (default: workspace sqlite)")
    p.add_argument("--no-cache", action="store_true", help="rerun download/pack/embed too")
    p.add_argument(
        "--protocol",
        choices=("cv10", "filtered"),
        default=None,
        help="cv10: the seed's 10-fold CV (default); filtered: the fault-filtered split",
    )
    p.add_argument(
        "--selection",
        choices=("validation", "heldout"),
        default=None,
        help="checkpoint chosen on a validation split (default) or, as the seed did, on "
        "the held-out fold (optimistic; for comparing with the seed's numbers)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pipeline argument (JSON value), e.g. --set folds=[1,2] --set "
        "head_lr=3e-3 (the head's recipe is head_*, the fine-tune's iterations, lr, ...)",
    )
    p.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: every step in this Python environment (default); docker: every "
        "step in its image through the Docker API at DOCKER_HOST (Docker or podman), on the "
        "host's network",
    )
    p.add_argument("--image-cpu", help="--runner docker: the image of the CPU steps")
    p.add_argument("--image-gpu", help="--runner docker: the image of the training step")
    p.set_defaults(func=_run_run)


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """What compile and submit both fix in the compiled pipeline, defined once. (No kfp
    import here: building the parser must stay instant.)"""
    p.add_argument("--parallelism", type=int, default=10, help="folds trained at once")
    p.add_argument("--image-cpu", help="image for the CPU steps (a digest from make images)")
    p.add_argument("--image-gpu", help="image for the GPU steps (a digest from make images)")
    p.add_argument(
        "--images",
        type=Path,
        metavar="FILE",
        help="the pushed images of `make images IMAGE_BUILD_ARGS=--push` (default: "
        "workspace/images.json when it exists and no --image-* is given)",
    )
    p.add_argument(
        "--mlflow-secret",
        default=MLFLOW_CREDENTIALS_SECRET,
        metavar="NAME",
        help="the Kubernetes Secret whose keys sign the steps in to MLflow (default "
        f"{MLFLOW_CREDENTIALS_SECRET}, made by infra/runner; optional: a step starts without "
        "it; '' for none)",
    )
    p.add_argument(
        "--gpu-node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node label the GPU steps require, e.g. cloud.google.com/gke-accelerator=nvidia-l4",
    )
    p.add_argument(
        "--gpu-toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE]:EFFECT",
        help="taint the GPU steps tolerate, e.g. nvidia.com/gpu:NoSchedule",
    )
    p.add_argument(
        "--step",
        action="append",
        default=[],
        metavar="NAME:cpu=Q,memory=Q,timeout=T",
        help="one step's CPU and memory (requests = limits) or timeout, e.g. "
        "aggregate:memory=16Gi or train:timeout=12h (pipelines/cv.py, RESOURCES, has them all)",
    )
    p.add_argument(
        "--ttl",
        metavar="T",
        help="how long a finished run's pods stay on the cluster, e.g. 12h (default 3d; 0 "
        "keeps them)",
    )


def _cluster_settings(args: argparse.Namespace) -> dict:
    """compile_pipeline's settings from the flags _add_cluster_flags defines."""
    from genreflow.pipelines.compile import (
        cluster_images,
        parse_duration,
        parse_node_selector,
        parse_step_resources,
        parse_toleration,
    )

    image_cpu, image_gpu = cluster_images(args.image_cpu, args.image_gpu, args.images)
    ttl = {} if args.ttl is None else {"ttl_seconds": parse_duration(args.ttl, flag="--ttl")}
    return dict(
        image_cpu=image_cpu,
        image_gpu=image_gpu,
        parallelism=args.parallelism,
        mlflow_secret=args.mlflow_secret,
        gpu_node_selector=parse_node_selector(args.gpu_node_selector),
        gpu_tolerations=[parse_toleration(t) for t in args.gpu_toleration],
        resources=parse_step_resources(args.step),
        **ttl,
    )


def _run_compile(args: argparse.Namespace) -> int:
    from genreflow.pipelines.compile import compile_pipeline
    from genreflow.pipelines.cv import ACCELERATOR

    out = compile_pipeline(
        args.out, accelerator=args.accelerator or ACCELERATOR, **_cluster_settings(args)
    )
    print(out)
    return 0


def _parse_overrides(pairs: list[str]) -> dict:
    import json

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise GenreflowError(f"--set {pair}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string
    return overrides


def _run_run(args: argparse.Namespace) -> int:
    from genreflow.pipelines.local import run_local

    overrides = _parse_overrides(args.set)
    for key in ("protocol", "selection"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    report = run_local(
        args.workspace,
        profile=args.profile,
        source=args.source,
        sha256=args.sha256,
        tracking_uri=args.tracking_uri,
        overrides=overrides,
        cache=not args.no_cache,
        runner=args.runner,
        images={"cpu": args.image_cpu, "gpu": args.image_gpu},
    )
    from genreflow.aggregate import headline

    print("\n".join(headline(report)))
    print(f"report: {report['results_dir']}/report.html")
    if report.get("mlflow_run_id"):
        from genreflow.tracking.addresses import print_addresses

        print_addresses(report["tracking_uri"], report["mlflow_run_id"])
    return 0


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="compile the pipeline and run it on Kubeflow Pipelines (or Vertex AI)",
        description="Compile the pipeline, check the arguments against its parameters and the "
        "backend's version (Kubeflow Pipelines 2.14 or later), create a run and print its "
        "address on stdout. The token comes from KF_PIPELINES_TOKEN, or in a pod from the "
        "projected service-account token; it is never printed. With --wait, follow the run "
        "to its end: exit 0 if it succeeded, 1 if not, 2 for an error before that.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--host",
        help="the KFP API's address, e.g. http://localhost:8080 (a port-forward to "
        "ml-pipeline-ui) or https://KFP.example.com/pipeline",
    )
    target.add_argument(
        "--vertex",
        metavar="PROJECT/REGION",
        help="submit to Vertex AI Pipelines instead (needs google-cloud-aiplatform)",
    )
    p.add_argument("--namespace", help="your Kubeflow profile's namespace (multi-user KFP)")
    p.add_argument(
        "--experiment", default="genreflow", help="the KFP experiment (default: genreflow)"
    )
    p.add_argument("--run-name", help="the run's name (default: genreflow-cv-DATE-TIME)")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="start from a named recipe (seed, demo) before the --param values; the demo's "
        "synthetic set exists only locally, so give --param source=... with it",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline argument, JSON when it parses (folds=[1,2], lr=3e-4), else text; "
        "repeat for each (source=gs://BUCKET/genres.tar.gz is required)",
    )
    p.add_argument(
        "--accelerator", help="GPU resource (default nvidia.com/gpu; Vertex: NVIDIA_L4, ...)"
    )
    _add_cluster_flags(p)
    p.add_argument(
        "--no-tracking",
        action="store_true",
        help="submit a run that logs nothing to MLflow (otherwise --param tracking_uri or "
        "MLFLOW_TRACKING_URI must name a server the pods reach)",
    )
    p.add_argument(
        "--service-account",
        help="the service account the run's pods use (infra/: genreflow-pipeline-runner)",
    )
    p.add_argument("--pipeline-root", help="where the run's outputs go, e.g. gs://BUCKET/kfp")
    p.add_argument(
        "--package-out", type=Path, metavar="FILE", help="also keep the compiled package sent"
    )
    p.add_argument(
        "--skip-version-check",
        action="store_true",
        help="submit even when the backend does not say its version",
    )
    p.add_argument("--wait", action="store_true", help="follow the run to its end")
    p.add_argument(
        "--timeout",
        type=float,
        default=12 * 3600,
        metavar="S",
        help="with --wait: give up after S seconds, leaving the run going (default: 12 h)",
    )
    p.add_argument(
        "--poll-seconds", type=float, default=30.0, metavar="S", help="with --wait: poll every S"
    )
    p.set_defaults(func=_run_submit)


def _run_submit(args: argparse.Namespace) -> int:
    from genreflow.pipelines.profiles import run_arguments
    from genreflow.pipelines.submit import SubmitError, parse_params, submit, submit_vertex

    given = {"profile": args.profile} if args.profile else {}
    arguments = run_arguments(args.profile, {**given, **parse_params(args.param)})

    def created(run) -> None:
        print(run.url, flush=True)

    def state(value: str) -> None:
        print(f"genreflow submit: run {value}", file=sys.stderr, flush=True)

    common = dict(
        run_name=args.run_name,
        service_account=args.service_account,
        accelerator=args.accelerator,
        no_tracking=args.no_tracking,
        on_created=created,
        wait=args.wait,
        **_cluster_settings(args),
    )
    if args.vertex:
        if args.gpu_node_selector or args.gpu_toleration:
            raise SubmitError(
                "--vertex places GPU steps itself: drop --gpu-node-selector/toleration"
            )
        run = submit_vertex(args.vertex, arguments, pipeline_root=args.pipeline_root, **common)
    else:
        run = submit(
            args.host,
            arguments,
            namespace=args.namespace,
            experiment=args.experiment,
            pipeline_root=args.pipeline_root,
            skip_version_check=args.skip_version_check,
            keep_package=args.package_out,
            timeout=args.timeout,
            poll_seconds=args.poll_seconds,
            on_state=state,
            **common,
        )
    if args.wait and not run.succeeded:
        detail = f" ({run.error})" if run.error else ""
        ended = f"run {run.run_id} ended {run.state}{detail}: {run.url}"
        print(f"genreflow submit: {ended}", file=sys.stderr)
        return 1
    return 0
