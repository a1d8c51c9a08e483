"""Compile the pipeline to the IR YAML that KFP backends (open-source KFP, Vertex AI) accept."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kfp import compiler

from genreflow.components.images import CPU_IMAGE, GPU_IMAGE
from genreflow.errors import GenreflowError
from genreflow.pipelines.cv import ACCELERATOR, COMPONENTS, build_pipeline


@contextlib.contextmanager
def images(cpu: str | None = None, gpu: str | None = None) -> Iterator[None]:
    """Point the components at other images for the duration of one compile."""
    swaps = {CPU_IMAGE: cpu, GPU_IMAGE: gpu}
    containers = [c.component_spec.implementation.container for c in COMPONENTS]
    saved = [container.image for container in containers]
    for container in containers:
        container.image = swaps.get(container.image) or container.image
    try:
        yield
    finally:
        for container, image in zip(containers, saved, strict=True):
            container.image = image


def compile_pipeline(
    out: str | Path,
    *,
    parallelism: int = 10,
    accelerator: str = ACCELERATOR,
    image_cpu: str | None = None,
    image_gpu: str | None = None,
    **placement,
) -> Path:
    """Write the pipeline's IR YAML to `out` and return its path; `placement` is
    build_pipeline's gpu_node_selector, gpu_tolerations and mlflow_secret."""
    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        # The compiler picks the format by the suffix and raises a ValueError for any other.
        raise GenreflowError(f"{out}: the compiled pipeline is YAML; name a file ending in .yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    with images(cpu=image_cpu, gpu=image_gpu):
        pipeline = build_pipeline(parallelism=parallelism, accelerator=accelerator, **placement)
        compiler.Compiler().compile(pipeline, str(out))
    return out
