"""genreflow download: tiny GTZAN-shaped archives made here, served from disk and over HTTP."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import stat
import tarfile
import threading
import tracemalloc
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from genreflow.cli import main
from genreflow.data.download import (
    HF_COPY_URL,
    JOURNAL_NAME,
    KNOWN_CHECKSUMS,
    MARKER_NAME,
    OFFICIAL_URL,
    ORIGINAL_CHECKSUMS,
    count_clips,
    download,
    expected_checksums,
)
from genreflow.data.genres import GENRES
from genreflow.errors import ChecksumMismatch, GenreflowError
from genreflow.features import describe, pack

CLIPS_PER_GENRE = 2
SAMPLE_RATE = 22050


def make_tree(
    base: Path, folder: str = "genres", suffix: str = ".au", clips: int = CLIPS_PER_GENRE
) -> Path:
    """``base/folder/<genre>/<genre>.0000N<suffix>``: a few 50 ms noise clips per genre."""
    rng = np.random.default_rng(0)
    for genre in GENRES:
        genre_dir = base / folder / genre
        genre_dir.mkdir(parents=True)
        for i in range(clips):
            noise = (0.1 * rng.standard_normal(SAMPLE_RATE // 20)).astype(np.float32)
            sf.write(
                genre_dir / f"{genre}.{i:05d}{suffix}",
                noise,
                SAMPLE_RATE,
                format="AU" if suffix == ".au" else "WAV",
                subtype="PCM_16",
            )
    (base / folder / "input.mf").write_text("a stray Marsyas list file\n")
    return base / folder


def _bytes_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def make_tar(path: Path, tree: Path | None, extra: list[tarfile.TarInfo] = ()) -> Path:
    """A .tar.gz of ``tree`` (under its own name), then the ``extra`` members."""
    with tarfile.open(path, "w:gz") as tar:
        if tree is not None:
            tar.add(tree, arcname=tree.name)
        for info in extra:
            if info.isreg():
                data = b"payload"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def make_zip(path: Path, tree: Path, extra: list[zipfile.ZipInfo] = ()) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(tree.rglob("*")):
            zf.write(file, file.relative_to(tree.parent).as_posix())
        for info in extra:
            zf.writestr(info, b"payload")
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def au_tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def au_archive(tmp_path_factory, au_tree) -> Path:
    return make_tar(tmp_path_factory.mktemp("archive") / "genres.tar.gz", au_tree)


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --- local sources -----------------------------------------------------------------------
@pytest.mark.parametrize("as_uri", [False, True], ids=["plain-path", "file-uri"])
def test_local_archive(au_archive, tmp_path, capsys, as_uri):
    out = tmp_path / "dataset"
    source = au_archive.as_uri() if as_uri else str(au_archive)
    root = download(source, out, progress=False)
    assert root == out / "genres"
    assert count_clips(root) == {genre: CLIPS_PER_GENRE for genre in GENRES}
    assert (root / "input.mf").is_file()
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "genres"]
    # No checksum given for an unknown source: the archive's sha256 is printed to pin it.
    assert sha256_of(au_archive) in capsys.readouterr().err


def test_checksums_that_hold(au_archive, tmp_path):
    md5 = hashlib.md5(au_archive.read_bytes()).hexdigest()
    root = download(au_archive, tmp_path / "out", sha256=sha256_of(au_archive).upper(), md5=md5)
    assert count_clips(root)["rock"] == CLIPS_PER_GENRE


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_checksum_mismatch_extracts_nothing(au_archive, tmp_path, algorithm):
    out = tmp_path / "out"
    wrong = "0" * (64 if algorithm == "sha256" else 32)
    with pytest.raises(GenreflowError) as err:
        download(au_archive, out, **{algorithm: wrong})
    assert f"{algorithm} mismatch" in str(err.value) and wrong in str(err.value)
    assert str(au_archive) in str(err.value)
    assert _listing(out) == []


def test_builtin_checksums_of_the_original_release():
    # torchaudio's (sha256) and mirdata's (md5) for the original genres.tar.gz.
    assert ORIGINAL_CHECKSUMS == {
        "sha256": "24347e0223d2ba798e0a558c4c172d9d4a19c00bb7963fe055d183dadb4ef2c6",
        "md5": "5b3d6dddb579ab49814ab86dba69e7c7",
    }
    both = (ORIGINAL_CHECKSUMS["sha256"], ORIGINAL_CHECKSUMS["md5"])
    assert expected_checksums(OFFICIAL_URL) == both
    assert KNOWN_CHECKSUMS[OFFICIAL_URL]["md5"] == "5b3d6dddb579ab49814ab86dba69e7c7"
    # "original" stands for them, for a copy from any source, in either option.
    assert expected_checksums(HF_COPY_URL, sha256="original") == both
    assert expected_checksums("/data/copy.tgz", md5=" Original ") == both
    # A checksum the user gives wins over the built-in one.
    assert expected_checksums(OFFICIAL_URL, sha256="a" * 64) == ("a" * 64, None)
    assert expected_checksums("https://example.org/genres.tar.gz") == (None, None)


def test_wav_layout_from_a_zip(tmp_path):
    tree = make_tree(tmp_path / "src", folder="genres_original", suffix=".wav")
    archive = make_zip(tmp_path / "gtzan.zip", tree)
    root = download(archive, tmp_path / "out", sha256=sha256_of(archive), progress=False)
    assert root == tmp_path / "out" / "genres_original"
    assert count_clips(root) == {genre: CLIPS_PER_GENRE for genre in GENRES}
    data, rate = sf.read(root / "jazz" / "jazz.00001.wav")
    assert rate == SAMPLE_RATE and len(data) == SAMPLE_RATE // 20


def test_an_extracted_folder_is_used_in_place(au_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert download(au_tree.parent, out) == au_tree
    assert download(au_tree.as_uri(), out) == au_tree
    assert not out.exists()
    assert "using it in place" in capsys.readouterr().err
    with pytest.raises(GenreflowError, match="can only verify an archive"):
        download(au_tree, out, sha256="a" * 64)
    with pytest.raises(GenreflowError, match="no GTZAN genre folders"):
        download(tmp_path, out)


# --- idempotence -------------------------------------------------------------------------
def test_second_run_does_nothing(au_archive, tmp_path, capsys):
    out = tmp_path / "out"
    root = download(au_archive, out, progress=False)
    clip = root / "blues" / "blues.00000.au"
    before = clip.stat()
    capsys.readouterr()
    assert download(au_archive, out, progress=False) == root
    assert "nothing to do" in capsys.readouterr().err
    after = clip.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_damaged_tree_is_extracted_again(au_archive, tmp_path, capsys):
    out = tmp_path / "out"
    root = download(au_archive, out, progress=False)
    (root / "pop" / "pop.00001.au").unlink()
    capsys.readouterr()
    download(au_archive, out, progress=False)
    assert "extracting again" in capsys.readouterr().err
    assert count_clips(root)["pop"] == CLIPS_PER_GENRE


def test_another_source_replaces_our_earlier_tree(au_archive, tmp_path):
    out = tmp_path / "out"
    download(au_archive, out, progress=False)
    wav_zip = make_zip(
        tmp_path / "wav.zip", make_tree(tmp_path / "w", folder="genres_original", suffix=".wav")
    )
    root = download(wav_zip, out, progress=False)
    assert root == out / "genres_original"
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "genres_original"]


def test_a_folder_we_did_not_create_is_never_overwritten(au_archive, tmp_path):
    out = tmp_path / "out"
    (out / "genres").mkdir(parents=True)
    (out / "genres" / "mine.txt").write_text("keep me")
    with pytest.raises(GenreflowError, match="was not extracted by genreflow download"):
        download(au_archive, out, progress=False)
    assert _listing(out) == ["genres", "genres/mine.txt"]


# --- unsafe archives ---------------------------------------------------------------------
def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


UNSAFE_TAR_MEMBERS = {
    "absolute": (_tar_member("/tmp/genreflow-evil.txt"), "absolute path"),
    "dotdot": (_tar_member("../evil.txt"), "'..'"),
    "dotdot-inside": (_tar_member("genres/blues/../../../evil.txt"), "'..'"),
    "symlink": (_tar_member("genres/blues/link.au", tarfile.SYMTYPE, "/etc/passwd"), "symbolic"),
    "hardlink": (
        _tar_member("genres/blues/hard.au", tarfile.LNKTYPE, "genres/blues/blues.00000.au"),
        "hard link",
    ),
    "char-device": (_tar_member("genres/null", tarfile.CHRTYPE), "device"),
    "block-device": (_tar_member("genres/sda", tarfile.BLKTYPE), "device"),
    "fifo": (_tar_member("genres/pipe", tarfile.FIFOTYPE), "FIFO"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TAR_MEMBERS))
def test_unsafe_tar_members_are_refused(au_tree, tmp_path, case):
    member, why = UNSAFE_TAR_MEMBERS[case]
    # The bad member comes last: everything before it was already extracted and must go.
    archive = make_tar(tmp_path / "bad.tar.gz", au_tree, [member])
    out = tmp_path / "out"
    with pytest.raises(GenreflowError) as err:
        download(archive, out, progress=False)
    message = str(err.value)
    assert str(archive) in message and repr(member.name) in message and why in message
    assert _listing(out) == []
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/genreflow-evil.txt").exists()


def _zip_member(name: str, mode: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so that the mode bits below mean what they say
    info.external_attr = mode << 16
    return info


UNSAFE_ZIP_MEMBERS = {
    "absolute": (_zip_member("/tmp/genreflow-evil.txt"), "absolute path"),
    "dotdot": (_zip_member("genres_original/../../evil.txt"), "'..'"),
    "backslash-dotdot": (_zip_member("genres_original\\..\\..\\evil.txt"), "'..'"),
    "drive": (_zip_member("C:/evil.txt"), "absolute path"),
    "symlink": (_zip_member("genres_original/blues/link.wav", stat.S_IFLNK | 0o777), "symbolic"),
    "fifo": (_zip_member("genres_original/pipe", stat.S_IFIFO | 0o644), "FIFO"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ZIP_MEMBERS))
def test_unsafe_zip_members_are_refused(tmp_path, case):
    member, why = UNSAFE_ZIP_MEMBERS[case]
    tree = make_tree(tmp_path / "src", folder="genres_original", suffix=".wav")
    archive = make_zip(tmp_path / "bad.zip", tree, [member])
    out = tmp_path / "out"
    with pytest.raises(GenreflowError) as err:
        download(archive, out, progress=False)
    message = str(err.value)
    assert str(archive) in message and repr(member.filename) in message and why in message
    assert _listing(out) == []
    assert not (tmp_path / "evil.txt").exists()


def test_truncated_archive(au_archive, tmp_path):
    truncated = tmp_path / "genres.tar.gz"
    truncated.write_bytes(au_archive.read_bytes()[: au_archive.stat().st_size // 2])
    with pytest.raises(GenreflowError, match="not a readable tar archive"):
        download(truncated, tmp_path / "out", progress=False)
    assert _listing(tmp_path / "out") == []


def test_not_an_archive_and_no_layout(tmp_path):
    junk = tmp_path / "genres.tar.gz"
    junk.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(GenreflowError, match="not a .tar.gz, .tgz, .tar or .zip archive"):
        download(junk, tmp_path / "out", progress=False)
    (tmp_path / "other" / "music").mkdir(parents=True)
    (tmp_path / "other" / "music" / "song.wav").write_bytes(b"x")
    archive = make_tar(tmp_path / "other.tar.gz", tmp_path / "other" / "music")
    with pytest.raises(GenreflowError, match="holds no GTZAN genre folders"):
        download(archive, tmp_path / "out", progress=False)
    assert _listing(tmp_path / "out") == []


# --- over HTTP ---------------------------------------------------------------------------
class _RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match.group(1)) if match else 0
        if match:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if server.drops_left:
            # Cut the first response in the middle, as a flaky link would.
            server.drops_left -= 1
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body[start:])


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    server.daemon_threads = True
    server.files, server.requests, server.drops_left = {}, [], 0
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    server.url = lambda path: f"http://127.0.0.1:{server.server_address[1]}{path}"
    yield server
    server.shutdown()
    server.server_close()


def test_http_download_resumes_verifies_and_is_idempotent(au_archive, http_server, tmp_path):
    http_server.files["/gtzan/genres.tar.gz"] = au_archive.read_bytes()
    http_server.drops_left = 1
    url = http_server.url("/gtzan/genres.tar.gz")
    out = tmp_path / "out"
    root = download(url, out, sha256=sha256_of(au_archive), progress=False)
    assert count_clips(root) == {genre: CLIPS_PER_GENRE for genre in GENRES}
    half = au_archive.stat().st_size // 2
    assert http_server.requests == [
        ("/gtzan/genres.tar.gz", None),
        ("/gtzan/genres.tar.gz", f"bytes={half}-"),
    ]
    # The archive is gone once extracted; the marker keeps its checksums.
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "genres"]
    assert sha256_of(au_archive) in (out / MARKER_NAME).read_text()

    assert download(url, out, sha256=sha256_of(au_archive), progress=False) == root
    assert len(http_server.requests) == 2


def test_http_checksum_mismatch_leaves_no_tree(au_archive, http_server, tmp_path):
    http_server.files["/genres.tar.gz"] = au_archive.read_bytes()
    out = tmp_path / "out"
    with pytest.raises(GenreflowError, match="sha256 mismatch"):
        download(http_server.url("/genres.tar.gz"), out, sha256="0" * 64, progress=False)
    assert _listing(out) == []


def test_http_404_names_the_url(http_server, tmp_path):
    url = http_server.url("/nowhere/genres.tar.gz")
    with pytest.raises(GenreflowError, match=re.escape(f"{url}: HTTP 404")):
        download(url, tmp_path / "out", progress=False)
    assert len(http_server.requests) == 1


# --- the command -------------------------------------------------------------------------
def test_cli_prints_root_and_counts(au_archive, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["download", "--source", au_archive.as_uri(), "--out", str(out)]
    assert main([*argv, "--sha256", sha256_of(au_archive)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(out / "genres")
    assert [line.split() for line in lines[1:]] == [
        *([genre, str(CLIPS_PER_GENRE)] for genre in GENRES),
        ["total", str(CLIPS_PER_GENRE * len(GENRES))],
    ]

    assert main([*argv, "--md5", "0" * 32]) == 2
    assert "md5 mismatch" in capsys.readouterr().err
    assert main([*argv, "--md5", "xyz"]) == 2
    assert "32 hexadecimal digits" in capsys.readouterr().err


# --- the sources users have: a copy of the original archive, the Kaggle zip ---------------
@pytest.fixture
def original_is(monkeypatch):
    """Make an archive of ours stand in for the original release (its checksums built in)."""

    def stand_in(archive: Path) -> None:
        monkeypatch.setitem(ORIGINAL_CHECKSUMS, "sha256", sha256_of(archive))
        monkeypatch.setitem(
            ORIGINAL_CHECKSUMS, "md5", hashlib.md5(archive.read_bytes()).hexdigest()
        )

    return stand_in


def _packed(root: Path, out: Path):
    return pack(root, out, clip_seconds=0.1, workers=1, progress=False)


def test_a_copy_of_the_original_from_another_host_is_verified_and_packs(
    au_archive, http_server, original_is, tmp_path, capsys
):
    original_is(au_archive)
    # Re-hosted where the Hub keeps it; the address says nothing, the checksums do.
    path = "/datasets/marsyas/gtzan/resolve/main/data/genres.tar.gz"
    http_server.files[path] = au_archive.read_bytes()
    out = tmp_path / "dataset"
    argv = ["download", "--source", http_server.url(path), "--out", str(out)]
    assert main([*argv, "--sha256", "original"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["total", str(10 * CLIPS_PER_GENRE)]
    summary = _packed(out / "genres", tmp_path / "features.h5")
    assert summary.clips == 10 * CLIPS_PER_GENRE and summary.skipped == []

    # Without a checksum it is still recognised, and said so.
    download(au_archive, tmp_path / "again", progress=False)
    assert "the original genres.tar.gz (its checksums)" in capsys.readouterr().err


def test_an_archive_that_is_not_the_original_is_refused(
    au_archive, au_tree, original_is, tmp_path, capsys
):
    original_is(au_archive)
    other = make_tar(tmp_path / "genres.tar.gz", au_tree, [_tar_member("genres/extra.txt")])
    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatch, match="not a copy of the original genres.tar.gz"):
        download(other, out, sha256="original", progress=False)
    assert _listing(out) == []
    argv = ["download", "--source", str(other), "--out", str(out), "--sha256", "original"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256 mismatch" in err and "pin its own --sha256" in err


def make_kaggle_zip(base: Path) -> Path:
    """The Kaggle copy's layout: Data/genres_original/<genre>/*.wav beside images and CSVs,
    with jazz.00054.wav unreadable, as in the real one."""
    data = base / "Data"
    make_tree(data, folder="genres_original", suffix=".wav")
    (data / "genres_original" / "jazz" / "jazz.00054.wav").write_bytes(b"\x00" * 4096)
    for genre in GENRES:
        (data / "images_original" / genre).mkdir(parents=True)
        (data / "images_original" / genre / f"{genre}00000.png").write_bytes(b"\x89PNG\r\n")
    (data / "features_30_sec.csv").write_text("filename,length,label\n")
    (data / "features_3_sec.csv").write_text("filename,length,label\n")
    return make_zip(base / "archive.zip", data)


def test_the_kaggle_zip_packs_as_it_comes_and_names_its_corrupt_clip(tmp_path, capsys):
    archive = make_kaggle_zip(tmp_path / "kaggle")
    out = tmp_path / "dataset"
    root = download(archive, out, sha256=sha256_of(archive), progress=False)
    assert root == out / "Data" / "genres_original"
    counts = count_clips(root)
    assert counts == {g: CLIPS_PER_GENRE + (g == "jazz") for g in GENRES}

    summary = _packed(root, tmp_path / "features.h5")
    assert summary.clips == 10 * CLIPS_PER_GENRE
    assert [name for name, _ in summary.skipped] == ["jazz.00054.wav"]
    assert "skipped" in capsys.readouterr().err
    assert "jazz.00054.wav" in describe(tmp_path / "features.h5")


# --- bounded extraction ------------------------------------------------------------------
def _zeros_tar(path: Path, tree: Path, megabytes: int) -> Path:
    """The tree plus one member of zeros: compresses about a thousandfold."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname=tree.name)
        info, data = _bytes_member(f"{tree.name}/blues/padding.bin", bytes(megabytes << 20))
        tar.addfile(info, data)
    return path


def _zeros_zip(path: Path, tree: Path, megabytes: int) -> Path:
    make_zip(path, tree)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{tree.name}/blues/padding.bin", bytes(megabytes << 20))
    return path


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_that_inflates_too_far_is_refused(tmp_path, monkeypatch, kind):
    tree = make_tree(tmp_path / "src")
    make = _zeros_tar if kind == "tar" else _zeros_zip
    archive = make(tmp_path / f"bomb.{kind}", tree, megabytes=20)
    assert archive.stat().st_size < 1 << 20
    out = tmp_path / "out"
    with pytest.raises(GenreflowError) as err:
        download(archive, out, progress=False)
    message = str(err.value)
    assert str(archive) in message and "'genres/blues/padding.bin'" in message
    assert "GENREFLOW_MAX_COMPRESSION_RATIO" in message
    assert _listing(out) == []

    # The total is capped on its own, whatever the ratio.
    monkeypatch.setenv("GENREFLOW_MAX_COMPRESSION_RATIO", "100000")
    monkeypatch.setenv("GENREFLOW_MAX_EXTRACT_BYTES", str(10 << 20))
    with pytest.raises(
        GenreflowError, match="more than 10485760 bytes.*GENREFLOW_MAX_EXTRACT_BYTES"
    ):
        download(archive, out, progress=False)
    assert _listing(out) == []

    # Raised, the same archive extracts.
    monkeypatch.setenv("GENREFLOW_MAX_EXTRACT_BYTES", str(30 << 20))
    root = download(archive, out, progress=False)
    assert (root / "blues" / "padding.bin").stat().st_size == 20 << 20


def test_an_archive_with_too_many_members_is_refused(au_archive, tmp_path, monkeypatch):
    members = 1 + len(GENRES) * (1 + CLIPS_PER_GENRE) + 1  # genres/, each genre, clips, .mf
    monkeypatch.setenv("GENREFLOW_MAX_ARCHIVE_MEMBERS", str(members - 1))
    with pytest.raises(GenreflowError) as err:
        download(au_archive, tmp_path / "out", progress=False)
    assert f"more than {members - 1} members" in str(err.value)
    assert "GENREFLOW_MAX_ARCHIVE_MEMBERS" in str(err.value)
    assert _listing(tmp_path / "out") == []
    monkeypatch.setenv("GENREFLOW_MAX_ARCHIVE_MEMBERS", str(members))
    assert count_clips(download(au_archive, tmp_path / "out", progress=False))["jazz"] == 2


# --- tar headers, read through a limit ---------------------------------------------------------
HEADER_CLAIM = 256 << 20  # what the crafted header says it holds: 256 MiB


def _claiming_header(path: Path, kind: bytes) -> Path:
    """A .tar.gz whose first header (a GNU long name, or a pax record) claims HEADER_CLAIM
    bytes and holds them: zeros, so that the file is about 250 KB."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, HEADER_CLAIM
    with gzip.open(path, "wb", compresslevel=9) as gz:
        gz.write(info.tobuf(tarfile.GNU_FORMAT))
        zeros = bytes(1 << 20)
        for _ in range(HEADER_CLAIM // len(zeros)):
            gz.write(zeros)
        gz.write(bytes(2 * tarfile.BLOCKSIZE))
    return path


@pytest.mark.parametrize(
    ("kind", "named"),
    [(tarfile.GNUTYPE_LONGNAME, "GNU long-name header"), (tarfile.XHDTYPE, "pax header")],
    ids=["gnu-long-name", "pax"],
)
def test_a_tar_header_claiming_hundreds_of_mib_is_refused_in_little_memory(tmp_path, kind, named):
    archive = _claiming_header(tmp_path / "genres.tar.gz", kind)
    assert archive.stat().st_size < 1 << 20
    out = tmp_path / "out"
    tracemalloc.start()
    try:
        with pytest.raises(GenreflowError) as err:
            download(archive, out, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert message.startswith(f"{archive}: its {named} at byte 0 claims {HEADER_CLAIM} bytes")
    assert "GENREFLOW_MAX_ARCHIVE_HEADER_BYTES" in message and "\n" not in message
    # tarfile.is_tarfile alone read the claimed 256 MiB into memory (277 MiB peak seen).
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB"
    assert _listing(out) == []


@pytest.mark.parametrize("form", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_names_within_the_limit_extract(au_tree, tmp_path, form):
    long_name = "rock." + "x" * 200 + ".au"  # over ustar's 100 characters
    archive = tmp_path / "genres.tar.gz"
    with tarfile.open(archive, "w:gz", format=form) as tar:
        tar.add(au_tree, arcname="genres")
        tar.add(au_tree / "rock" / "rock.00000.au", arcname=f"genres/rock/{long_name}")
    root = download(archive, tmp_path / "out", progress=False)
    assert (root / "rock" / long_name).read_bytes() == (
        au_tree / "rock" / "rock.00000.au"
    ).read_bytes()
    assert count_clips(root)["rock"] == CLIPS_PER_GENRE + 1


# --- killed at every point of extract, move, mark ---------------------------------------
# The calls that change or flush the file system: a kill is injected before each in turn.
_STEPS = ("mkdir", "fsync", "replace", "rename", "unlink", "rmdir")


def _killed_at(point: int, archive: Path, out: Path) -> bool:
    """Run download in a forked child that SIGKILLs itself just before its `point`-th step;
    True if it was killed, False if it got through every step."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            steps = itertools.count(1)

            def hooked(call):
                def step(*args, **kwargs):
                    if next(steps) == point:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return call(*args, **kwargs)

                return step

            for name in _STEPS:
                setattr(os, name, hooked(getattr(os, name)))
            download(archive, out, progress=False)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"download failed in the child at point {point}"
    return False


def _files_under(out: Path, entries: list[str]) -> int:
    return sum(len(files) for entry in entries for _, _, files in os.walk(out / entry))


@pytest.mark.parametrize("start", ["empty", "earlier-download"])
def test_a_kill_at_any_point_leaves_nothing_or_what_the_next_run_repairs(tmp_path, start):
    tree = make_tree(tmp_path / "src", clips=1)
    archive = make_tar(tmp_path / "genres.tar.gz", tree)
    before = tmp_path / "before"
    if start == "earlier-download":  # another source's tree to be replaced, in its layout
        wav = make_tree(tmp_path / "wav", folder="genres_original", suffix=".wav", clips=1)
        download(make_zip(tmp_path / "wav.zip", wav), before, progress=False)
    else:
        before.mkdir()
    kills = 0
    for point in itertools.count(1):
        out = tmp_path / f"out{point}"
        shutil.copytree(before, out, symlinks=True)
        if not _killed_at(point, archive, out):
            break
        kills += 1
        # No marker vouches for a tree it does not describe.
        if (out / MARKER_NAME).is_file():
            marker = json.loads((out / MARKER_NAME).read_text())
            assert _files_under(out, marker["entries"]) == marker["files"], point
        # The next run finds its way from whatever was left.
        root = download(archive, out, progress=False)
        assert root == out / "genres", point
        assert count_clips(root) == {genre: 1 for genre in GENRES}, point
        assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "genres"], point
        assert download(archive, out, progress=False) == root
        shutil.rmtree(out)
    assert kills > 20, f"only {kills} points: the hook missed the steps"
    assert not (tmp_path / f"out{point}" / JOURNAL_NAME).exists()
