"""Print pip constraints that hold every requirement of pyproject.toml at its floor.

    python requirements/floors.py pyproject.toml [--keep NAME ...]

One `name==floor` line for each requirement of the project's dependencies and of the
extras `make install` takes (`test`, and those it names), where the range has a floor (a
`>=` or `==` clause); a requirement without one is left to the resolver and listed on
stderr. `--keep NAME` leaves out a package the caller installs itself (`make test-floors`
keeps torch at the tested release: the old ones are multi-GB CUDA builds from PyPI).
What these floors do not pin (the floors' own dependencies) the resolver takes at the
newest release they admit: pip's equivalent of uv's `--resolution lowest-direct`.

Runs with the interpreter of the venv it fills (pip's vendored parsers: nothing installed).
"""

from __future__ import annotations

import argparse
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

PROJECT = "genreflow"
EXTRAS = ("test",)


def requirements(pyproject: dict) -> list[Requirement]:
    """The dependencies, then the extras in EXTRAS and those they name (genreflow[local])."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    found, seen = [], set()

    def add(strings: list[str]) -> None:
        for requirement in map(Requirement, strings):
            if canonicalize_name(requirement.name) != PROJECT:
                found.append(requirement)
                continue
            for extra in sorted(requirement.extras - seen):
                seen.add(extra)
                add(optional[extra])

    add(project["dependencies"])
    add([f"{PROJECT}[{','.join(EXTRAS)}]"])
    return found


def floor(requirement: Requirement) -> str | None:
    for clause in requirement.specifier:
        if clause.operator in (">=", "==", "~="):
            return clause.version
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--keep", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    path, keep = args.pyproject, {canonicalize_name(n) for n in args.keep}
    with open(path, "rb") as f:
        pyproject = tomllib.load(f)
    pins, unbounded = {}, []
    for requirement in requirements(pyproject):
        name = canonicalize_name(requirement.name)
        if name in keep:
            continue
        version = floor(requirement)
        if version is None:
            unbounded.append(requirement)
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            raise SystemExit(f"{path}: {requirement}: its floor {version} is outside its range")
        pins[name] = version
    for requirement in unbounded:
        if canonicalize_name(requirement.name) not in pins:
            print(f"floors: {requirement} has no floor: the resolver's choice", file=sys.stderr)
    print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
