"""Print the project's dependencies from pyproject.toml, one requirement a line.

The images install the package's own pins (pyproject.toml is the one place they live), in
layers that change at different rates: torch first, from the index that has the wanted
build, then every other dependency, then the package itself.

    python requirements.py pyproject.toml          # every dependency
    python requirements.py pyproject.toml torch    # only torch's requirement

Standard library only: it runs in a bare base image before anything is installed.
"""

from __future__ import annotations

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise SystemExit(f"pyproject.toml: cannot read a name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    if len(argv) == 2:
        wanted = _name(argv[1])
        dependencies = [d for d in dependencies if _name(d) == wanted]
        if not dependencies:
            raise SystemExit(f"{argv[0]}: no dependency named {argv[1]!r}")
    print("\n".join(dependencies))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
