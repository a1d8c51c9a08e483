"""The one place that names the images the components run in.

`make images` (docker/build.sh) tags its builds with these names, after the package
version; they are no registry's, so a compiled pipeline never carries them: `genreflow
compile` and `submit` take the pushed references (`--images workspace/images.json`,
`--image-cpu/--image-gpu`) and refuse to write these. kfp.local's docker runner finds
them among the local images.
"""

from genreflow import __version__

REGISTRY = "ghcr.io/genreflow"
CPU_IMAGE = f"{REGISTRY}/genreflow:{__version__}"
GPU_IMAGE = f"{REGISTRY}/genreflow-cuda:{__version__}"
# The images' numeric user (docker/Dockerfile.*: USER 10001:10001), which the pipeline's
# pods are told to run as: Kubernetes checks runAsNonRoot against a number, never a name.
IMAGE_UID = 10001
