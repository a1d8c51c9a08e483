"""Compile the pipeline to the IR YAML that KFP backends (open-source KFP, Vertex AI) accept,
ready to upload as it is: the images a cluster pulls, the MLflow Secret, GPU placement,
each step's resources and timeout, all fixed in the file.

The settings are the ones `genreflow compile` and `genreflow submit` share (their flags are
defined once, in pipelines/commands.py); the parsers for their text forms are here.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from kfp import compiler

from genreflow.cluster import MLFLOW_CREDENTIALS_SECRET
from genreflow.components.images import CPU_IMAGE, GPU_IMAGE
from genreflow.errors import GenreflowError
from genreflow.pipelines.cv import (
    ACCELERATOR,
    PIPELINE_TTL_SECONDS,
    RESOURCES,
    StepResources,
    build_pipeline,
)

# Where `make images` records what it built (docker/build.sh --out).
IMAGES_FILE = Path("workspace/images.json")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# A Kubernetes quantity: 500m, 2, 1.5, 8Gi, 32G.
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def compile_pipeline(
    out: str | Path,
    *,
    image_cpu: str | None,
    image_gpu: str | None,
    parallelism: int = 10,
    accelerator: str = ACCELERATOR,
    gpu_node_selector: Mapping[str, str] | None = None,
    gpu_tolerations: list[dict] | None = None,
    mlflow_secret: str = MLFLOW_CREDENTIALS_SECRET,
    resources: Mapping[str, StepResources] | None = None,
    ttl_seconds: int = PIPELINE_TTL_SECONDS,
) -> Path:
    """Write the pipeline's IR YAML to `out` and return its path.

    Raises:
        GenreflowError: no image a cluster can pull for the CPU or GPU steps (none given, or
            the components' own names, which no registry serves), a parallelism below 1, an
            output that is not a .yaml file.
    """
    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        # The compiler picks the format by the suffix and raises a ValueError for any other.
        raise GenreflowError(f"{out}: the compiled pipeline is YAML; name a file ending in .yaml")
    if parallelism < 1:
        raise GenreflowError(f"--parallelism must be 1 or more; got {parallelism}")
    check_pullable(image_cpu, image_gpu)
    pipeline = build_pipeline(
        parallelism=parallelism,
        accelerator=accelerator,
        image_cpu=image_cpu,
        image_gpu=image_gpu,
        gpu_node_selector=dict(gpu_node_selector or {}),
        gpu_tolerations=list(gpu_tolerations or []),
        mlflow_secret=mlflow_secret,
        resources=dict(resources or {}),
        ttl_seconds=ttl_seconds,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(out))
    return out


# --- images ------------------------------------------------------------------------------
HOW_TO_SET_IMAGES = (
    "push them with make images IMAGE_BUILD_ARGS=--push and pass --images "
    "workspace/images.json, or --image-cpu/--image-gpu REF"
)


def check_pullable(image_cpu: str | None, image_gpu: str | None) -> None:
    """Refuse a missing image and the components' own names, which no registry serves."""
    placeholders = {"cpu": CPU_IMAGE, "gpu": GPU_IMAGE}
    chosen = {"cpu": image_cpu, "gpu": image_gpu}
    missing = [kind for kind, ref in chosen.items() if not ref or ref == placeholders[kind]]
    if missing:
        kinds = " and ".join(kind.upper() for kind in missing)
        named = [placeholders[k] for k in missing if chosen[k]]
        why = f" (the components name {', '.join(named)}, which no registry serves)"
        raise GenreflowError(
            f"no image a cluster can pull for the {kinds} steps{why if named else ''}: "
            + HOW_TO_SET_IMAGES
        )


def cluster_images(
    image_cpu: str | None,
    image_gpu: str | None,
    images_file: str | Path | None,
    *,
    recorded: Path = IMAGES_FILE,
) -> tuple[str | None, str | None]:
    """(cpu, gpu): the references a cluster pulls, --image-cpu/--image-gpu over the pushed
    refs of `make images`' images.json. With neither flag nor file, the file `make images`
    wrote (`recorded`), when there is one. An image built but not pushed exists only on the
    machine that built it: refused. check_pullable (compile_pipeline) refuses what is
    still missing."""
    if images_file is None and not (image_cpu or image_gpu) and recorded.is_file():
        images_file = recorded
        print(f"genreflow: the images {recorded} records", file=sys.stderr)
    refs: dict[str, str] = {}
    if images_file:
        path = Path(images_file)
        if not path.is_file():
            raise GenreflowError(
                f"{path}: no such file; make images IMAGE_BUILD_ARGS=--push writes it"
            )
        try:
            built = json.loads(path.read_text())
            pushed = built["pushed"]
            refs = {kind: built[kind]["ref"] for kind in ("cpu", "gpu")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GenreflowError(
                f"{path}: not an images file of `make images` ({type(exc).__name__}: {exc})"
            ) from None
        if not pushed and not (image_cpu and image_gpu):
            raise GenreflowError(
                f"{path}: its images were built but not pushed, so no cluster can pull them; "
                "make images IMAGE_BUILD_ARGS=--push records the registry's digests"
            )
    return image_cpu or refs.get("cpu"), image_gpu or refs.get("gpu")


# --- the flags' text forms ---------------------------------------------------------------
def parse_node_selector(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings -> {label: value}."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GenreflowError(f"--gpu-node-selector {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def parse_toleration(text: str) -> dict[str, str]:
    """A toleration in kubectl's taint syntax, KEY[=VALUE]:EFFECT (no value: operator Exists)."""
    spec, sep, effect = text.rpartition(":")
    if not sep or effect not in TAINT_EFFECTS or not spec:
        raise GenreflowError(
            f"--gpu-toleration {text!r}: expected KEY[=VALUE]:EFFECT, EFFECT one of "
            f"{', '.join(TAINT_EFFECTS)}"
        )
    key, has_value, value = spec.partition("=")
    if has_value:
        return {"effect": effect, "key": key, "operator": "Equal", "value": value}
    return {"effect": effect, "key": key, "operator": "Exists"}


def parse_duration(text: str, *, flag: str) -> int:
    """Seconds from `3600`, `90s`, `30m`, `8h` or `3d`."""
    match = re.fullmatch(r"([0-9]+)([smhd]?)", text.strip())
    if not match:
        raise GenreflowError(f"{flag} {text!r}: expected a duration such as 3600, 30m, 8h or 3d")
    return int(match[1]) * DURATION_UNITS.get(match[2] or "s")


def parse_step_resources(texts: list[str]) -> dict[str, StepResources]:
    """`NAME:cpu=Q,memory=Q,timeout=DURATION` (any of the three) -> the steps' new settings,
    each starting from its entry in pipelines.cv.RESOURCES."""
    changed: dict[str, StepResources] = {}
    for text in texts:
        name, sep, settings = text.partition(":")
        if name not in RESOURCES or not sep:
            raise GenreflowError(
                f"--step {text!r}: expected NAME:cpu=Q,memory=Q,timeout=DURATION, NAME one of "
                f"{', '.join(RESOURCES)}"
            )
        current = changed.get(name, RESOURCES[name])
        values = {"cpu": current.cpu, "memory": current.memory}
        timeout = current.timeout_seconds
        for setting in settings.split(","):
            key, sep, value = setting.partition("=")
            if key == "timeout" and sep:
                timeout = parse_duration(value, flag=f"--step {name}:timeout")
            elif key in values and sep and QUANTITY.match(value):
                values[key] = value
            else:
                raise GenreflowError(
                    f"--step {text!r}: {setting!r} is not cpu=Q, memory=Q (a Kubernetes "
                    "quantity such as 500m, 2, 8Gi) or timeout=DURATION (3600, 30m, 8h)"
                )
        changed[name] = StepResources(timeout_seconds=timeout, **values)
    return changed
