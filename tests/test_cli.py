"""A user's mistake through the command: one line on stderr (what is wrong, what to do),
exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from genreflow.cli import main, os_error_line
from genreflow.data.download import HF_COPY_URL, KAGGLE_PAGE


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv)'s exit status, parse errors (SystemExit) included, and its one line."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, _one_line(captured.err)


def test_seed_profile_without_a_source_lists_the_sources_that_work(tmp_path, capsys):
    workspace = tmp_path / "workspace"
    status, err = _run(["run", "--profile", "seed", "--workspace", str(workspace)], capsys)
    assert status == 2
    assert err.startswith("genreflow run: error: profile seed needs --source")
    assert HF_COPY_URL in err and "--sha256 original" in err
    assert KAGGLE_PAGE in err and "jazz.00054.wav" in err
    assert not workspace.exists()  # nothing made before the check


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--profile", "seeed"],
        ["submit", "--host", "http://127.0.0.1:9", "--profile", "seeed"],
    ],
    ids=["run", "submit"],
)
def test_an_unknown_profile_is_refused_by_name(argv, capsys):
    status, err = _run(argv, capsys)
    assert status == 2
    assert "invalid choice: 'seeed'" in err and "'demo', 'seed'" in err
    assert err.rstrip().endswith(f"(see genreflow {argv[0]} --help)")


def test_usage_errors_are_one_line(capsys):
    status, err = _run([], capsys)
    assert status == 2 and "required: COMMAND" in err
    status, err = _run(["pack", "--dataset", "x"], capsys)
    assert status == 2 and "--out" in err


def test_a_path_the_system_refuses_is_one_line(tmp_path, capsys):
    # /sys refuses new entries even to root (EPERM, or EROFS where it is mounted read-only).
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no Linux /sys here")
    archive = tmp_path / "genres.tar.gz"
    archive.write_bytes(b"anything")
    argv = ["download", "--source", str(archive), "--out", "/sys/genreflow-test/dataset"]
    status, err = _run(argv, capsys)
    assert status == 2
    assert err.startswith("genreflow download: error: /sys/genreflow-test")


def test_a_folder_where_a_file_goes_is_one_line(tmp_path, capsys):
    folder = tmp_path / "pipeline.yaml"
    folder.mkdir()
    image = "registry.example/genreflow@sha256:" + "a" * 64
    images = ["--image-cpu", image, "--image-gpu", image]
    status, err = _run(["compile", "--out", str(folder), *images], capsys)
    assert status == 2
    assert (
        err
        == f"genreflow compile: error: {folder}: Is a directory (give a file there, not a folder)\n"
    )
    # And a name the compiler cannot write at all (it raised a ValueError).
    status, err = _run(["compile", "--out", str(tmp_path), *images], capsys)
    assert status == 2 and "name a file ending in .yaml" in err


def test_os_error_line_names_the_path_and_what_to_do():
    assert os_error_line(PermissionError(13, "Permission denied", "/data/x")) == (
        "/data/x: Permission denied (choose a path you may use, or change its permissions)"
    )
    assert os_error_line(OSError(28, "No space left on device", "/data/x")) == (
        "/data/x: No space left on device"
    )
    assert os_error_line(FileExistsError(17, "File exists", "/a", None, "/b")) == (
        "/a -> /b: File exists (remove it or choose another path)"
    )
    assert os_error_line(ConnectionRefusedError(111, "Connection refused")) == (
        "[Errno 111] Connection refused"
    )
