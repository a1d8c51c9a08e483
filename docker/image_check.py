"""Helpers of `make image-test` (docker/image-test.sh), run with the host's Python.

    python image_check.py pip-config OUT_CONF
        Write the host's pip configuration (files and PIP_* variables, merged as pip merges
        them) to OUT_CONF, for a build to mount as /etc/pip.conf, and print one line per
        local path it names ("mount PATH") and the index to fetch torch from ("index URL").
    python image_check.py compare OUTSIDE INSIDE
        Check that the steps run inside the image wrote what the same steps wrote outside:
        the packed features (same clips, folds, targets, waveforms) and the training fold
        (metrics, predictions and summary within float tolerance).

Exit status 1 with one line per difference when they differ.
"""

from __future__ import annotations

import configparser
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

PYPI = "https://pypi.org/simple"
# The training fold's floats: the same torch build on the same CPU, but thread scheduling
# may reorder reductions, so compare within a tolerance.
REL_TOL, ABS_TOL = 1e-4, 1e-5
# Differ by design between the two runs: wall time and the paths each run was given.
UNCOMPARED_SUMMARY_KEYS = {"wall_seconds", "clips_per_second"}
UNCOMPARED_CONFIG_KEYS = {"features", "out", "pretrained"}


def pip_config(out_conf: Path) -> int:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    merged = configparser.ConfigParser(interpolation=None)
    from_environment = []
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.rpartition(".")
        value = value.strip().strip("'\"")
        if section == ":env:":
            from_environment.append((option, value))  # the environment wins, as in pip
            continue
        if not merged.has_section(section):
            merged.add_section(section)
        merged.set(section, option, value)
    for option, value in from_environment:
        if not merged.has_section("global"):
            merged.add_section("global")
        merged.set("global", option, value)
    with out_conf.open("w") as f:
        merged.write(f)

    paths = set()
    for section in merged.sections():
        for _, value in merged.items(section):
            for word in value.split():
                path = Path(word.removeprefix("file://"))
                # A local index's pages link to ../../files/...: mount the folder above it.
                if word.startswith("file://") and path.name == "simple":
                    path = path.parent
                if path.is_absolute() and path.exists():
                    paths.add(path)
    for path in sorted(paths):
        print(f"mount {path}")
    index = merged.get("global", "index-url", fallback=PYPI)
    print(f"index {index}")
    return 0


def _compare_features(outside: Path, inside: Path) -> list[str]:
    import h5py
    import numpy as np

    problems = []
    with h5py.File(outside) as a, h5py.File(inside) as b:
        for name in ("audio_name", "fold", "target", "waveform"):
            if name not in a or name not in b:
                problems.append(f"features: {name} missing from one of the files")
                continue
            x, y = a[name][()], b[name][()]
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x, y):
                problems.append(
                    f"features: {name} differs ({x.dtype}{x.shape} vs {y.dtype}{y.shape})"
                )
        print(f"features: {len(a['audio_name'])} clips, waveform {a['waveform'].shape}")
    return problems


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _compare_rows(label: str, a: list[dict], b: list[dict], skip: set[str]) -> list[str]:
    if len(a) != len(b):
        return [f"{label}: {len(a)} rows outside, {len(b)} inside"]
    problems = []
    for number, (row_a, row_b) in enumerate(zip(a, b, strict=True), start=1):
        if row_a.keys() != row_b.keys():
            return [f"{label}: columns differ: {list(row_a)} vs {list(row_b)}"]
        for column in row_a.keys() - skip:
            x, y = row_a[column], row_b[column]
            try:
                same = _close(float(x), float(y))
            except ValueError:
                same = x == y
            if not same:
                problems.append(f"{label} row {number} {column}: {x} outside, {y} inside")
    return problems


def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _compare_training(outside: Path, inside: Path) -> list[str]:
    problems = _compare_rows(
        "metrics.csv",
        _read_csv(outside / "metrics.csv"),
        _read_csv(inside / "metrics.csv"),
        skip={"seconds"},
    )
    problems += _compare_rows(
        "predictions.csv",
        _read_csv(outside / "predictions.csv"),
        _read_csv(inside / "predictions.csv"),
        skip=set(),
    )
    a = json.loads((outside / "summary.json").read_text())
    b = json.loads((inside / "summary.json").read_text())
    for summary in (a, b):
        for key in UNCOMPARED_SUMMARY_KEYS:
            summary.pop(key, None)
        for key in UNCOMPARED_CONFIG_KEYS:
            summary.get("config", {}).pop(key, None)
        # The features' fingerprint hashes the packed file's attributes, its pack time among
        # them: two packs differ there alone (_compare_features compares their clips).
        summary.get("features", {}).pop("sha256", None)
    problems += _compare_rows("summary.json", [_flatten(a)], [_flatten(b)], skip=set())
    print(f"training: {json.dumps({k: a[k] for k in a if k != 'config'})}")
    return problems


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def compare(outside: Path, inside: Path) -> int:
    problems = _compare_features(outside / "features.h5", inside / "features.h5")
    problems += _compare_training(outside / "fold1", inside / "fold1")
    for problem in problems:
        print(f"DIFFERS {problem}")
    if problems:
        return 1
    print("inside and outside the image: the same features and the same training fold")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "pip-config":
        return pip_config(Path(argv[1]))
    if len(argv) == 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
