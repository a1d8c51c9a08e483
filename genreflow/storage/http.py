"""http(s):// downloads: resumed with Range, retried with back-off, never leaving https://.

Credentials never travel in the URL (refused: it would be logged and shown); an https://
host's user and password come from a netrc file and are sent only to that host, when it
asks (HTTP 401), so a redirect elsewhere carries none.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import netrc
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from genreflow import __version__
from genreflow.atomic import write_text_atomic
from genreflow.errors import GenreflowError
from genreflow.limits import limit
from genreflow.storage.streams import CHUNK_BYTES, check_download_size, progress_bar
from genreflow.storage.uris import (
    SOURCE_CREDENTIALS,
    file_name_of,
    redacted,
    redacted_text,
    refuse_userinfo,
)

# Connection and per-read timeout: long enough for a slow mirror, short enough that a
# stalled transfer is noticed and resumed.
HTTP_TIMEOUT_S = 60.0
# Longest wait we accept from a server's Retry-After before trying again anyway.
MAX_RETRY_AFTER_S = 120.0


class _TransientError(Exception):
    """A failure worth retrying: the next attempt may well succeed."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def resume_record(part: Path) -> Path:
    """Beside a .part file: which URL (its hash: a signed URL's query is a secret) and which
    version of it the bytes came from."""
    return part.with_name(part.name + ".json")


def _url_key(url: str) -> str:
    return "sha256:" + hashlib.sha256(url.encode()).hexdigest()


def _resumable_offset(url: str, part: Path) -> tuple[int, str | None]:
    """Bytes already in ``part`` that may be resumed, and the validator for If-Range.

    A .part left by another URL (or with no record of where it came from) is started over
    rather than spliced onto.
    """
    if not part.exists():
        return 0, None
    try:
        record = json.loads(resume_record(part).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("url") != _url_key(url):
        part.unlink()
        return 0, None
    return part.stat().st_size, record.get("validator")


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off


def check_url(url: str) -> None:
    """Refuse, before any request, an http(s) URL with credentials in it or that cannot be
    requested (a port that is no number): no retry can mend either."""
    refuse_userinfo(url, what="source", instead=SOURCE_CREDENTIALS)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise GenreflowError(f"{redacted(url)}: not a valid URL ({exc})") from None
    if not parts.hostname:
        raise GenreflowError(f"{redacted(url)}: not a valid URL (no host)")


def _netrc_login(url: str) -> urllib.request.BaseHandler | None:
    """Basic authentication for an https:// URL's host from the netrc file ($NETRC, else
    ~/.netrc), answering only that host's 401; None where the file names no login for it."""
    parts = urllib.parse.urlsplit(url)
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    if parts.scheme != "https" or not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(parts.hostname)
    except netrc.NetrcParseError as exc:
        # Its message may quote the file's tokens (a password among them): the line only.
        raise GenreflowError(f"{path}: not a valid netrc file (line {exc.lineno})") from None
    except OSError as exc:
        raise GenreflowError(f"{path}: cannot read the netrc file ({exc.strerror})") from None
    if entry is None:
        return None
    login, _, password = entry
    manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
    manager.add_password(None, f"https://{parts.netloc}/", login, password or "")
    return urllib.request.HTTPBasicAuthHandler(manager)


def fetch_http(url: str, part: Path, *, progress: bool, retries: int, backoff_s: float) -> None:
    """Download `url` into `part`, resuming what it holds; `check_url` has passed."""
    attempt = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _http_attempt(url, part, progress=progress)
            return
        except _TransientError as exc:
            after = part.stat().st_size if part.exists() else 0
            if after > before:
                # The transfer moved forward: resume at once and keep the full budget.
                attempt = 0
                print(
                    f"{redacted(url)}: {redacted_text(str(exc))}; resuming at byte {after}",
                    file=sys.stderr,
                )
                continue
            if attempt >= retries:
                raise GenreflowError(
                    f"{redacted(url)}: download failed after {retries + 1} attempts: "
                    f"{redacted_text(str(exc))}"
                ) from exc
            delay = backoff_s * 2**attempt
            if exc.retry_after_s is not None:
                delay = max(delay, exc.retry_after_s)
            attempt += 1
            print(
                f"{redacted(url)}: {redacted_text(str(exc))}; retry {attempt}/{retries} in "
                f"{delay:.1f} s",
                file=sys.stderr,
            )
            time.sleep(delay)


def _http_attempt(url: str, part: Path, *, progress: bool) -> None:
    """One request: resume from what ``part`` holds, or start over when the server says so."""
    offset, validator = _resumable_offset(url, part)
    headers = {
        "User-Agent": f"genreflow/{__version__}",
        # A transparently compressed body would make byte offsets meaningless for Range.
        "Accept-Encoding": "identity",
    }
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    login = _netrc_login(url)
    opener = urllib.request.build_opener(_HttpsStaysHttps, *([login] if login else []))
    try:
        response = opener.open(request, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _handle_range_not_satisfiable(url, part, offset, exc.headers)
            return
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _TransientError(
                f"HTTP {exc.code} {exc.reason}", _retry_after(exc.headers)
            ) from exc
        raise GenreflowError(f"{redacted(url)}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _TransientError(f"cannot connect: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _TransientError(f"connection failed: {exc!r}") from exc

    with response:
        status = response.status
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                # Not the bytes we asked for: drop what we have and start over.
                part.unlink(missing_ok=True)
                raise _TransientError(
                    f"server resumed at byte {start}, not {offset}; starting over"
                )
            mode = "ab"
        elif status == 200:
            # The server ignored the Range (or the file changed since): start over.
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        else:
            raise GenreflowError(f"{redacted(url)}: unexpected HTTP {status} {response.reason}")
        check_download_size(url, total)

        new_validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        # Only a strong ETag or a date may be sent back in If-Range.
        if new_validator and new_validator.startswith("W/"):
            new_validator = None
        write_text_atomic(
            resume_record(part), json.dumps({"url": _url_key(url), "validator": new_validator})
        )

        written = offset
        cap = limit("GENREFLOW_MAX_DOWNLOAD_BYTES")
        with (
            open(part, mode) as out,
            progress_bar(total, offset, file_name_of(url) or url, progress) as bar,
        ):
            while True:
                # Only the read is the network's: a failed write (a full disk) is not
                # something a second request gets past.
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise _TransientError(f"connection lost at byte {written}: {exc!r}") from exc
                if not chunk:
                    break
                if written + len(chunk) > cap:  # a server that sends more than it announced
                    out.close()
                    part.unlink(missing_ok=True)
                    check_download_size(url, written + len(chunk))
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written < total:
        raise _TransientError(f"connection closed at byte {written} of {total}")
    if total is not None and written > total:
        part.unlink(missing_ok=True)
        raise _TransientError(f"server sent {written} bytes, announced {total}; starting over")


class _HttpsStaysHttps(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https:// to another scheme: a downgrade to http://
    would let anyone on the path swap the bytes (a checksum catches that only when one is
    pinned) and would send the rest of the request in the clear."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: PLR0913 (urllib's)
        old = urllib.parse.urlsplit(req.full_url).scheme.lower()
        new = urllib.parse.urlsplit(newurl).scheme.lower()
        if old == "https" and new != "https":
            fp.close()
            raise GenreflowError(
                f"{redacted(req.full_url)}: redirected (HTTP {code}) to {redacted(newurl)}; "
                "refusing to leave https://"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); '/*' (unknown total) -> (100, None)."""
    try:
        unit, _, spec = (value or "").partition(" ")
        span, _, total = spec.partition("/")
        start = int(span.split("-", 1)[0])
        if unit != "bytes":
            raise ValueError(unit)
        return start, (None if total == "*" else int(total))
    except ValueError:
        return -1, None


def _handle_range_not_satisfiable(url: str, part: Path, offset: int, headers) -> None:
    """416 for 'bytes=N-': complete if the file is exactly N bytes, else start over."""
    content_range = headers.get("Content-Range", "") if headers is not None else ""
    total = content_range.rsplit("/", 1)[-1]
    if total.isdigit() and int(total) == offset:
        return
    part.unlink(missing_ok=True)
    raise _TransientError(f"server refused to resume at byte {offset}; starting over")
