"""Write the hash-locked requirements from pyproject.toml with uv (`make lock`).

    python requirements/lock.py --uv UV --torch torch==X.Y.Z --torch-wheels URL_OR_DIR \
        --date YYYY-MM-DD

Three files, each package pinned with the SHA-256 of every file PyPI has for that release,
for CPython 3.11 on Linux x86_64 (manylinux 2.28: the images' Debian and CI's Ubuntu):

    runtime.lock  the dependencies, torch's CPU build: the CPU image
    cuda.lock     the dependencies and the `gpu` extra, PyPI's torch (its CUDA build, with
                  the NVIDIA libraries it names): the CUDA image
    retrain.lock  the dependencies and the `test` extra (full mlflow included), torch's CPU
                  build: the retrain workflow

Each is resolved on its own; the two images' share every version but torch's (tested).

torch's CPU build is `torch==X.Y.Z+cpu`, taken from --torch-wheels only: the page of
PyTorch's CPU index that lists its torch files (the Makefile's TORCH_INDEX/torch/), or a
folder holding the same wheel. Every other package comes from PyPI. The build backend
(pyproject's build-system.requires) is locked too, because the images and the retrain job
build genreflow without build isolation. Releases after --date are left out, so the same
date gives the same files; a new date takes what was released since.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"
TARGET = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
HEADER = """\
# {what}
# Made by `make lock` (requirements/lock.py, uv) from pyproject.toml: every file by its
# SHA-256, for CPython 3.11 on Linux x86_64. Install with
#   pip install --require-hashes --no-deps -r requirements/{name}{index}
# then genreflow itself with --no-deps --no-build-isolation. Do not edit by hand.
"""
LOCKS = {
    # name: (what it is for, extras, torch's build)
    "runtime.lock": (
        "The CPU image (docker/Dockerfile.cpu): the runtime dependencies, torch's CPU build.",
        [],
        "cpu",
    ),
    "cuda.lock": (
        "The CUDA image (docker/Dockerfile.cuda): the runtime dependencies and the gpu extra,\n"
        "# PyPI's torch, its CUDA build.",
        ["gpu"],
        "cuda",
    ),
    "retrain.lock": (
        "The retrain workflow (.github/workflows/retrain.yaml): runtime and test extras.",
        ["test"],
        "cpu",
    ),
}


def compile_lock(name: str, args: argparse.Namespace, build_requires: list[str]) -> None:
    what, extras, torch_build = LOCKS[name]
    torch = args.torch + ("+cpu" if torch_build == "cpu" else "")
    command = [
        args.uv,
        "pip",
        "compile",
        "pyproject.toml",
        "-",  # stdin: the build backend and torch's exact build
        *[f"--extra={extra}" for extra in extras],
        "--generate-hashes",
        *TARGET,
        f"--default-index={PYPI}",
        f"--exclude-newer={args.date}T00:00:00Z",
        "--custom-compile-command=make lock",
        "--no-header",
        "--quiet",
        f"--output-file=requirements/{name}",
    ]
    if torch_build == "cpu":
        command.append(f"--find-links={args.torch_wheels}")
    stdin = "\n".join([*build_requires, torch]) + "\n"
    done = subprocess.run(command, cwd=ROOT, input=stdin, text=True, capture_output=True)
    if done.returncode:
        raise SystemExit(f"requirements/{name}: uv failed:\n{done.stderr.strip()}")
    path = ROOT / "requirements" / name
    index = " --extra-index-url TORCH_INDEX" if torch_build == "cpu" else ""
    header = HEADER.format(what=what, name=name, index=index)
    path.write_text(header + path.read_text())
    pins = sum(1 for line in path.read_text().splitlines() if line[:1].isalnum())
    print(f"requirements/{name}: {pins} packages ({torch})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uv", required=True)
    parser.add_argument("--torch", required=True, help="the tested release, torch==X.Y.Z")
    parser.add_argument("--torch-wheels", required=True, help="where torch's CPU wheel is")
    parser.add_argument("--date", required=True, help="leave out releases after this day")
    args = parser.parse_args(argv)
    if not args.torch.startswith("torch==") or "+" in args.torch:
        parser.error(f"--torch {args.torch!r}: expected torch==X.Y.Z, one release")
    wheels = args.torch_wheels
    if "://" not in wheels and not Path(wheels).is_dir():
        parser.error(
            f"--torch-wheels {wheels!r}: neither a URL nor a folder (TORCH_WHEELS: the torch "
            "page of PyTorch's CPU index, or a folder holding torch's CPU wheel)"
        )
    with open(ROOT / "pyproject.toml", "rb") as f:
        build_requires = tomllib.load(f)["build-system"]["requires"]
    for name in LOCKS:
        compile_lock(name, args, build_requires)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
