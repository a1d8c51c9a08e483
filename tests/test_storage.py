"""genreflow.storage against real files and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import errno
import hashlib
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from genreflow import storage
from genreflow.errors import GenreflowError

PAYLOAD = bytes(range(256)) * 400  # 100 KiB, several read chunks of the server's socket


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def do_GET(self):
        server: FileServer = self.server  # type: ignore[assignment]
        server.requests.append((self.path, self.headers.get("Range")))
        server.authorizations.append(self.headers.get("Authorization"))
        if server.login and self.headers.get("Authorization") != server.expected_authorization:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="genreflow-test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        action = server.script.pop(0) if server.script else "ok"
        if isinstance(action, int):
            self.send_response(action)
            if action == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path in server.forbidden:
            self.send_error(403)
            return
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        requested = self.headers.get("Range")
        if requested and server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        payload = body[start:]
        if action == "drop":
            # Announce the whole body, send part of it, then hang up.
            self.wfile.write(payload[: server.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if server.chunk_delay:
            for start in range(0, len(payload), len(payload) // 4 + 1):
                self.wfile.write(payload[start : start + len(payload) // 4 + 1])
                self.wfile.flush()
                time.sleep(server.chunk_delay)
            return
        self.wfile.write(payload)


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` by path; ``script`` lists what the next requests get instead
    ("drop": the body cut after ``drop_after`` bytes, or an HTTP status), in order."""

    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scheme = "http"
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.forbidden: set[str] = set()
        self.script: list[str | int] = []
        self.drop_after = 0
        self.chunk_delay = 0.0
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []
        self.login = ""  # "user:password": answer 401 to any request without it
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def expected_authorization(self) -> str:
        return "Basic " + base64.b64encode(self.login.encode()).decode()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}{path}"

    def close(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def server():
    srv = FileServer()
    srv.files["/data/archive.bin"] = PAYLOAD
    yield srv
    srv.close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- URIs and checksums ------------------------------------------------------------------
def test_uri_kinds(tmp_path):
    assert storage.is_remote("https://example.org/a.tar.gz")
    assert storage.is_remote("gs://bucket/a.tar.gz")
    assert not storage.is_remote("file:///tmp/a.tar.gz")
    assert not storage.is_remote(tmp_path / "a.tar.gz")
    assert storage.local_path("file:///tmp/a%20b.tar.gz") == Path("/tmp/a b.tar.gz")
    assert storage.local_path("file://localhost/tmp/x") == Path("/tmp/x")
    assert storage.local_path("relative/x.zip") == Path("relative/x.zip")
    assert storage.local_path("http://example.org/x") is None
    assert storage.file_name_of("gs://bucket/some/dir/genres.tar.gz") == "genres.tar.gz"
    assert storage.file_name_of("https://h/x/genres%20v2.zip?dl=1") == "genres v2.zip"
    with pytest.raises(GenreflowError, match="s3://"):
        storage.is_remote("s3://bucket/key")
    with pytest.raises(GenreflowError, match="otherhost"):
        storage.local_path("file://otherhost/tmp/x")
    with pytest.raises(GenreflowError, match="gs://BUCKET/OBJECT"):
        storage.fetch("gs://only-a-bucket", tmp_path / "x")


def test_digest_helpers(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert storage.sha256_of(path) == hashlib.sha256(PAYLOAD).hexdigest()
    assert storage.md5_of(path) == hashlib.md5(PAYLOAD).hexdigest()
    with pytest.raises(GenreflowError, match="64 hexadecimal digits"):
        storage.verify(path, sha256="abc")


# --- local sources -----------------------------------------------------------------------
@pytest.mark.parametrize("as_uri", [False, True])
def test_fetch_local_file_verified(tmp_path, as_uri):
    src = tmp_path / "src dir" / "archive.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    uri = src.as_uri() if as_uri else str(src)
    dest = storage.fetch(
        uri,
        tmp_path / "out" / "copy.bin",
        sha256=_sha256(PAYLOAD),
        md5=hashlib.md5(PAYLOAD).hexdigest(),
        progress=as_uri,  # one of the two also draws the progress bar
    )
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("copy.bin.part").exists()


def test_fetch_missing_local_file(tmp_path):
    with pytest.raises(GenreflowError, match=r"nope\.bin: no such file"):
        storage.fetch(tmp_path / "nope.bin", tmp_path / "dest.bin")


def test_mismatch_keeps_existing_dest_and_names_both_hashes(tmp_path):
    src = tmp_path / "archive.bin"
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"an earlier, valid file")
    wrong = "0" * 64
    with pytest.raises(GenreflowError) as err:
        storage.fetch(src.as_uri(), dest, sha256=wrong, progress=False)
    message = str(err.value)
    assert src.as_uri() in message and wrong in message and _sha256(PAYLOAD) in message
    assert dest.read_bytes() == b"an earlier, valid file"
    assert not dest.with_name("dest.bin.part").exists()


# --- HTTP --------------------------------------------------------------------------------
def test_http_resumes_after_a_dropped_connection(server, tmp_path):
    server.drop_after = 30_000
    server.script = ["drop"]
    url = server.url("/data/archive.bin")
    dest = storage.fetch(url, tmp_path / "a.bin", sha256=_sha256(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data/archive.bin", None), ("/data/archive.bin", "bytes=30000-")]


def test_http_restarts_cleanly_when_the_server_ignores_range(server, tmp_path):
    server.honour_range = False
    server.drop_after = 30_000
    server.script = ["drop"]
    url = server.url("/data/archive.bin")
    dest = storage.fetch(url, tmp_path / "a.bin", sha256=_sha256(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD  # not the first 30 000 bytes twice
    assert server.requests[1] == ("/data/archive.bin", "bytes=30000-")


def test_http_resumes_a_part_left_by_an_earlier_run(server, tmp_path):
    server.drop_after = 40_000
    server.script = ["drop", 500]
    url = server.url("/data/archive.bin")
    dest = tmp_path / "a.bin"
    with pytest.raises(GenreflowError, match="500"):
        storage.fetch(url, dest, progress=False, retries=0)
    assert dest.with_name("a.bin.part").stat().st_size == 40_000
    assert not dest.exists()

    storage.fetch(url, dest, sha256=_sha256(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/data/archive.bin", "bytes=40000-")
    assert not dest.with_name("a.bin.part").exists()


def test_http_retries_5xx_and_429(server, tmp_path):
    server.script = [500, 429, 503]
    url = server.url("/data/archive.bin")
    dest = storage.fetch(url, tmp_path / "a.bin", progress=False, backoff_s=0.01)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 4


def test_http_gives_up_when_retries_run_out(server, tmp_path):
    server.script = [502, 502, 502]
    url = server.url("/data/archive.bin")
    with pytest.raises(GenreflowError, match=r"after 3 attempts: HTTP 502"):
        storage.fetch(url, tmp_path / "a.bin", progress=False, retries=2, backoff_s=0.01)
    assert len(server.requests) == 3
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize("status", [404, 403])
def test_http_client_errors_are_not_retried(server, tmp_path, status):
    server.forbidden.add("/data/secret.bin")
    path = "/data/missing.bin" if status == 404 else "/data/secret.bin"
    url = server.url(path)
    with pytest.raises(GenreflowError) as err:
        storage.fetch(url, tmp_path / "a.bin", progress=False, backoff_s=0.01)
    assert url in str(err.value) and f"HTTP {status}" in str(err.value)
    assert len(server.requests) == 1


def test_http_checksum_mismatch_leaves_nothing(server, tmp_path):
    url = server.url("/data/archive.bin")
    with pytest.raises(GenreflowError, match="md5 mismatch"):
        storage.fetch(url, tmp_path / "a.bin", md5="f" * 32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- cache -------------------------------------------------------------------------------
def test_cached_downloads_once(server, tmp_path, monkeypatch):
    server.files["/weights/Cnn14_mAP=0.431.pth"] = PAYLOAD
    url = server.url("/weights/Cnn14_mAP=0.431.pth")
    monkeypatch.setenv("GENREFLOW_CACHE", str(tmp_path / "cache"))
    first = storage.cached(url, sha256=_sha256(PAYLOAD))
    second = storage.cached(url, sha256=_sha256(PAYLOAD))
    third = storage.cached(url)
    assert first == second == third
    assert first.name == "Cnn14_mAP=0.431.pth"
    assert first.is_relative_to(tmp_path / "cache")
    assert first.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_cached_replaces_a_corrupted_copy(server, tmp_path):
    url = server.url("/data/archive.bin")
    path = storage.cached(url, cache_dir=tmp_path, progress=False)
    path.write_bytes(b"bit rot")
    again = storage.cached(url, sha256=_sha256(PAYLOAD), cache_dir=tmp_path, progress=False)
    assert again == path and again.read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_cached_local_path_is_returned_as_is(tmp_path):
    src = tmp_path / "weights.pth"
    src.write_bytes(PAYLOAD)
    assert storage.cached(src.as_uri(), sha256=_sha256(PAYLOAD), cache_dir=tmp_path / "c") == src
    assert not (tmp_path / "c").exists()
    with pytest.raises(GenreflowError, match="sha256 mismatch"):
        storage.cached(str(src), sha256="1" * 64)


# --- upload ------------------------------------------------------------------------------
def test_upload_to_a_local_uri(tmp_path):
    src = tmp_path / "features.h5"
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "published" / "features.h5"
    storage.upload(src, dest.as_uri(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["features.h5"]
    with pytest.raises(GenreflowError, match="cannot upload over HTTP"):
        storage.upload(src, "https://example.org/features.h5")


# --- bounds, redirects, a full disk --------------------------------------------------------
def test_a_download_larger_than_the_cap_is_refused_before_it_is_written(
    server, tmp_path, monkeypatch
):
    monkeypatch.setenv("GENREFLOW_MAX_DOWNLOAD_BYTES", str(len(PAYLOAD) - 1))
    url = server.url("/data/archive.bin")
    with pytest.raises(GenreflowError) as err:
        storage.fetch(url, tmp_path / "a.bin", progress=False, backoff_s=0.01)
    assert f"{url}: {len(PAYLOAD)} bytes, over the limit" in str(err.value)
    assert "GENREFLOW_MAX_DOWNLOAD_BYTES" in str(err.value)
    assert len(server.requests) == 1 and list(tmp_path.iterdir()) == []
    src = tmp_path / "local.bin"
    src.write_bytes(PAYLOAD)
    with pytest.raises(GenreflowError, match="GENREFLOW_MAX_DOWNLOAD_BYTES"):
        storage.fetch(src, tmp_path / "b.bin", progress=False)
    monkeypatch.setenv("GENREFLOW_MAX_DOWNLOAD_BYTES", str(len(PAYLOAD)))
    assert storage.fetch(url, tmp_path / "a.bin", progress=False).read_bytes() == PAYLOAD


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """An HTTPS FileServer with a certificate made here, trusted through SSL_CERT_FILE."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test server's certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    srv = FileServer(tls=context)
    srv.tls_context = context  # for a second server with the same certificate
    srv.files["/data/archive.bin"] = PAYLOAD
    yield srv
    srv.close()


def test_https_never_follows_a_redirect_to_another_scheme(tls_server, server, tmp_path):
    # https -> https is followed ...
    tls_server.redirects["/moved.bin"] = tls_server.url("/data/archive.bin")
    dest = storage.fetch(tls_server.url("/moved.bin"), tmp_path / "a.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    # ... https -> http is not, and nothing is asked of the http server.
    tls_server.redirects["/downgrade.bin?X-Goog-Signature=s3cr3t"] = server.url("/data/archive.bin")
    with pytest.raises(GenreflowError) as err:
        storage.fetch(
            tls_server.url("/downgrade.bin?X-Goog-Signature=s3cr3t"),
            tmp_path / "b.bin",
            progress=False,
            backoff_s=0.01,
        )
    message = str(err.value)
    assert "refusing to leave https://" in message and server.url("/data/archive.bin") in message
    assert "s3cr3t" not in message
    assert server.requests == [] and not (tmp_path / "b.bin").exists()
    # http -> http stays allowed.
    server.redirects["/moved.bin"] = server.url("/data/archive.bin")
    assert storage.fetch(server.url("/moved.bin"), tmp_path / "c.bin", progress=False).is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs root, as in CI and on the dev machines)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_reported_as_one_and_not_retried(server, small_disk):
    url = server.url("/data/archive.bin")  # 100 KiB into 64 KiB
    with pytest.raises(GenreflowError) as err:
        storage.fetch(url, small_disk / "a.bin", progress=False, backoff_s=0.01)
    assert f"{small_disk}: no space left on the disk" in str(err.value)
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert len(server.requests) == 1  # not retried as if the network had failed


def _cached_in(url: str, cache: str, sha256: str) -> str:
    return str(storage.cached(url, sha256=sha256, cache_dir=cache, progress=False))


def test_two_runs_sharing_a_cache_take_turns_at_a_slot(server, tmp_path):
    # Each download takes 0.2 s, so the two overlap; repeated, so that a race shows.
    server.chunk_delay = 0.05
    url = server.url("/data/archive.bin")
    rounds = 20
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        for round_ in range(rounds):
            cache = tmp_path / f"cache{round_}"
            runs = [pool.submit(_cached_in, url, str(cache), _sha256(PAYLOAD)) for _ in range(2)]
            paths = {run.result(timeout=60) for run in runs}
            assert len(paths) == 1 and Path(paths.pop()).read_bytes() == PAYLOAD
            # The second waited for the first and found the file: one download per round.
            assert len(server.requests) == round_ + 1, f"round {round_}: {server.requests}"
            slot = next(cache.iterdir())
            assert sorted(p.name for p in slot.iterdir()) == ["archive.bin"]


# --- credentials: never in the URL; a netrc file for https:// ------------------------------
def test_a_url_with_credentials_is_refused_before_any_request(server, tmp_path):
    for password in ("PW(1)", "PW'1", "PW/1", "PW#1", "PW?1", "PW@1", "123/PW"):
        url = server.url("/data/archive.bin").replace("://", f"://alice:{password}@")
        started = time.monotonic()
        with pytest.raises(GenreflowError) as err:
            storage.fetch(url, tmp_path / "a.bin", progress=False)
        message = str(err.value)
        assert "a user or password in the URI is refused" in message and "netrc" in message
        assert "PW" not in message and time.monotonic() - started < 5
    # A port that is no number: refused as a bad URL, not retried as a network failure.
    with pytest.raises(GenreflowError, match="not a valid URL"):
        storage.fetch("http://127.0.0.1:port/x", tmp_path / "b.bin", progress=False)
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_https_logins_come_from_netrc_and_go_to_that_host_only(
    tls_server, server, tmp_path, monkeypatch
):
    elsewhere = FileServer(tls=tls_server.tls_context)  # another host: another port here
    try:
        elsewhere.files["/data/archive.bin"] = PAYLOAD
        tls_server.login = server.login = "alice:s3cr(e)t/pw!"
        tls_server.redirects["/moved.bin"] = elsewhere.url("/data/archive.bin")
        url = tls_server.url("/data/archive.bin")
        with pytest.raises(GenreflowError, match="HTTP 401"):  # no netrc: not let in
            storage.fetch(url, tmp_path / "a.bin", progress=False)
        netrc = tmp_path / "netrc"
        netrc.write_text(
            "machine 127.0.0.1 login alice password s3cr(e)t/pw!\ndefault login bob password x\n"
        )
        monkeypatch.setenv("NETRC", str(netrc))
        assert storage.fetch(url, tmp_path / "a.bin", progress=False).read_bytes() == PAYLOAD
        assert tls_server.authorizations[-1] == tls_server.expected_authorization
        # A redirect to another host carries no login, and plain http:// is sent none.
        moved = storage.fetch(tls_server.url("/moved.bin"), tmp_path / "b.bin", progress=False)
        assert moved.read_bytes() == PAYLOAD and elsewhere.authorizations == [None]
        with pytest.raises(GenreflowError, match="HTTP 401"):
            storage.fetch(server.url("/data/archive.bin"), tmp_path / "c.bin", progress=False)
        assert server.authorizations == [None]
        # A damaged file is named without quoting it (it holds passwords).
        netrc.write_text("machine 127.0.0.1 login alice password s3cr3t extra\n")
        with pytest.raises(GenreflowError) as err:
            storage.fetch(url, tmp_path / "d.bin", progress=False)
        assert f"{netrc}: not a valid netrc file (line " in str(err.value)
        assert "s3cr3t" not in str(err.value)
    finally:
        elsewhere.close()
