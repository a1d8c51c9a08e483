"""The one place that names the images the components run in.

They follow the package version. `genreflow compile --image-cpu/--image-gpu` overrides them
for one compiled file (for example with a digest from `make images`), without editing code.
"""

from genreflow import __version__

REGISTRY = "ghcr.io/genreflow"
CPU_IMAGE = f"{REGISTRY}/genreflow:{__version__}"
GPU_IMAGE = f"{REGISTRY}/genreflow-cuda:{__version__}"
