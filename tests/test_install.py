"""What `make install` would run, and the one place torch's index is set (the Makefile's
TORCH_INDEX), which the CPU image and CI take it from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE = [sys.executable, str(ROOT / "docker" / "torch_index.py")]
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not found")


def make_n_install(tmp_path: Path, *settings: str) -> list[str]:
    """`make -n install` for a fresh venv, without the settings of a make we may run under."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH_INDEX", "TORCH_PIN", "VENV")
    }
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["make", "-n", "install", f"VENV={venv}", *settings],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.replace(str(venv), "VENV").splitlines()


@needs_make
def test_make_install_takes_torch_from_the_cpu_index(tmp_path):
    assert make_n_install(tmp_path) == [
        "python3 -m venv VENV",
        "VENV/bin/pip install --quiet --upgrade pip",
        "VENV/bin/pip install --quiet $(VENV/bin/python docker/torch_index.py --pip-option "
        f"'{CPU_INDEX}') \"torch==2.13.0\"",
        "VENV/bin/pip install --quiet -e '.[test]'",
    ]


@needs_make
def test_an_empty_torch_index_leaves_pip_its_own(tmp_path):
    lines = make_n_install(tmp_path, "TORCH_INDEX=")
    assert lines[2] == 'VENV/bin/pip install --quiet "torch==2.13.0"'
    assert "torch_index.py" not in "\n".join(lines)


class _Index(BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):
        self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
        self.end_headers()


@pytest.fixture
def index_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    server.shutdown()
    server.server_close()


@needs_make
def test_the_install_line_as_the_shell_runs_it(tmp_path, index_url):
    """The recipe's torch line with pip swapped for printf: the words pip would get."""
    (line,) = [x for x in make_n_install(tmp_path, f"TORCH_INDEX={index_url}") if "torch==" in x]
    line = line.replace("VENV/bin/python", sys.executable)
    line = line.replace("VENV/bin/pip install --quiet", "printf '%s\\n'")
    done = subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.splitlines() == ["--index-url", index_url, "torch==2.13.0"]


def test_probe_keeps_an_index_that_answers(index_url, tmp_path):
    done = subprocess.run([*PROBE, "--pip-option", index_url], capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"--index-url {index_url}\n", "")
    done = subprocess.run([*PROBE, index_url + "/"], capture_output=True, text=True)
    assert done.stdout == f"{index_url}/\n"
    local = tmp_path / "simple"
    (local / "torch").mkdir(parents=True)
    done = subprocess.run([*PROBE, local.as_uri()], capture_output=True, text=True)
    assert done.stdout == f"{local.as_uri()}\n"


def test_probe_leaves_out_an_index_that_does_not_answer_and_says_so(index_url, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/whl/cpu"
    for url in (closed, index_url.replace("/cpu", "/none"), (tmp_path / "none").as_uri()):
        started = time.monotonic()
        done = subprocess.run([*PROBE, "--pip-option", url], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout == ""
        assert done.stderr.startswith(f"TORCH_INDEX={url} left out: it does not answer")
        assert done.stderr.count("\n") == 1
        assert time.monotonic() - started < 10  # no minutes of retries
    empty = subprocess.run([*PROBE, ""], capture_output=True, text=True)
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "", "")


def test_the_cpu_image_and_ci_take_the_index_from_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_INDEX ?= {CPU_INDEX}\n" in makefile
    # The image: no default of its own; build.sh passes the Makefile's (or reads it).
    dockerfile = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "ARG TORCH_INDEX=\n" in dockerfile
    build = (ROOT / "docker" / "build.sh").read_text()
    assert "sed -n 's/^TORCH_INDEX ?= *//p' Makefile" in build
    assert '--build-arg TORCH_INDEX="$TORCH_INDEX"' in build
    assert 'TORCH_INDEX="$(TORCH_INDEX)" docker/build.sh' in makefile
    extracted = subprocess.run(
        ["sed", "-n", "s/^TORCH_INDEX ?= *//p", "Makefile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert extracted.stdout == f"{CPU_INDEX}\n"
    # CI: make installs (the test job) and builds; the retrain job's locked install reads
    # the Makefile's index; no index of its own.
    workflow = (ROOT / ".github" / "workflows" / "retrain.yaml").read_text()
    assert "PIP_EXTRA_INDEX_URL" not in workflow and "PIP_INDEX_URL" not in workflow
    steps = [s for job in yaml.safe_load(workflow)["jobs"].values() for s in job["steps"]]
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "make test" in runs and "make images" in runs
    assert (
        "sed -n 's/^TORCH_INDEX ?= *//p' Makefile" in runs and '--extra-index-url "$index"' in runs
    )
    # Nowhere else is the address set (comments may name it).
    for path in (".github/workflows/retrain.yaml", "docker/Dockerfile.cpu", "docker/build.sh"):
        code = [x for x in (ROOT / path).read_text().splitlines() if not x.lstrip().startswith("#")]
        assert not any(CPU_INDEX in x for x in code), path
