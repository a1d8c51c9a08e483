"""One way to read and write local paths, file://, http(s):// and gs:// URIs.

Every step that takes a path (dataset source, pretrained weights, outputs) goes through
here, so a user can swap a local file for a URL or a bucket by changing one argument:
`input_path` gives a local path to read any of them from (remote ones downloaded once into
the cache), `output_file` and `output_folder` a local place to write that is published to
gs:// when the writing is done.

Downloads stream to ``<dest>.part`` and are renamed to ``dest`` only once the requested
checksums hold, so a file at ``dest`` is always complete. HTTP downloads resume an
interrupted transfer with a Range request and retry transient failures with exponential
back-off; gs:// goes through google-cloud-storage, imported only when a gs:// URI is used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from genreflow import __version__
from genreflow.atomic import write_atomic, write_text_atomic
from genreflow.errors import ChecksumMismatch, GenreflowError
from genreflow.limits import exceeded, limit
from genreflow.locks import locked

REMOTE_SCHEMES = frozenset({"http", "https", "gs"})
CHUNK_BYTES = 1 << 20
# Connection and per-read timeout: long enough for a slow mirror, short enough that a
# stalled transfer is noticed and resumed.
HTTP_TIMEOUT_S = 60.0
# Longest wait we accept from a server's Retry-After before trying again anyway.
MAX_RETRY_AFTER_S = 120.0
# Uploads to gs:// always go through the resumable protocol, in chunks of this size (a
# multiple of 256 KiB, as the API requires): one request per chunk, so a 330 MB checkpoint
# takes 11 round trips, and an interrupted chunk costs at most this much to send again.
GCS_CHUNK_BYTES = 32 * 1024 * 1024


# --- URIs --------------------------------------------------------------------------------
def _scheme(uri: str | Path) -> str:
    """'' for a plain path, else the lower-cased scheme; unknown schemes are an error."""
    if isinstance(uri, Path):
        return ""
    text = str(uri)
    if "://" not in text:
        return ""
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file" or scheme in REMOTE_SCHEMES:
        return scheme
    raise GenreflowError(
        f"{text}: unsupported URI scheme '{scheme}://' "
        "(use a local path, file://, http://, https:// or gs://)"
    )


def is_remote(uri: str | Path) -> bool:
    """True for http://, https:// and gs:// URIs; False for plain paths and file://."""
    return _scheme(uri) in REMOTE_SCHEMES


def local_path(uri: str | Path) -> Path | None:
    """The local file a plain path or file:// URI names; None for a remote URI."""
    scheme = _scheme(uri)
    if scheme == "":
        return Path(uri).expanduser()
    if scheme != "file":
        return None
    parsed = urllib.parse.urlparse(str(uri))
    if parsed.netloc not in ("", "localhost"):
        raise GenreflowError(
            f"{redacted(uri)}: file:// URIs must name a local file (file:///path), "
            f"not host '{parsed.netloc.rpartition('@')[2]}'"
        )
    return Path(urllib.request.url2pathname(parsed.path))


def _split_gs(uri: str) -> tuple[str, str]:
    rest = str(uri)[len("gs://") :]
    bucket, _, name = rest.partition("/")
    if not bucket or not name or name.endswith("/"):
        raise GenreflowError(f"{redacted(uri)}: expected gs://BUCKET/OBJECT naming one object")
    return bucket, name


def _gs_folder(uri: str) -> str:
    """gs://BUCKET or gs://BUCKET/PREFIX, without a trailing slash; objects go below it."""
    bucket, _, prefix = str(uri)[len("gs://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket or "//" in prefix:
        raise GenreflowError(
            f"{redacted(uri)}: expected gs://BUCKET or gs://BUCKET/PREFIX for a folder"
        )
    return f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"


def _gs_bucket_and_prefix(folder_uri: str) -> tuple[str, str]:
    """gs://BUCKET/PREFIX (as _gs_folder gives it) -> (BUCKET, 'PREFIX/'), '' for no prefix."""
    bucket, _, prefix = _gs_folder(folder_uri)[len("gs://") :].partition("/")
    return bucket, f"{prefix}/" if prefix else ""


def redacted(uri: str | Path) -> str:
    """`uri` as it may be shown or recorded: without a user:password@ part and without a
    query string, where signed URLs carry their signature (X-Goog-Signature, sig=...)."""
    uri = str(uri)
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or parts.scheme == "file" and not parts.netloc:
        return uri
    netloc = parts.netloc.rpartition("@")[2]
    query = "REDACTED" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# A URI inside free text (an error message, a JSON-encoded parameter): a scheme, "://", and
# everything up to the next space, quote or bracket, less a final ":", ";", "," or ".".
_URI_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]*[^\s'\"<>()\[\]{}:;,.]")


def redacted_text(text: str) -> str:
    """`text` with every URI in it `redacted`: for messages and recorded values that may
    quote a URI (MLflow params and tags, KFP metadata, stderr)."""
    return _URI_IN_TEXT.sub(lambda match: redacted(match.group(0)), str(text))


def redacted_values(value: object) -> object:
    """A record (dicts, lists, strings) with every URI in its strings `redacted`."""
    if isinstance(value, str):
        return redacted_text(value)
    if isinstance(value, dict):
        return {key: redacted_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted_values(item) for item in value]
    return value


def file_name_of(uri: str | Path) -> str:
    """The last path component of a path or URI, e.g. 'genres.tar.gz'; '' if it has none."""
    path = local_path(uri)
    if path is not None:
        return path.name
    if _scheme(uri) == "gs":
        return _split_gs(str(uri))[1].rsplit("/", 1)[-1]
    return urllib.parse.unquote(urllib.parse.urlparse(str(uri)).path).rsplit("/", 1)[-1]


# --- checksums ---------------------------------------------------------------------------
def digests(path: str | Path, algorithms: tuple[str, ...] = ("sha256", "md5")) -> dict[str, str]:
    """Hex digests of a file, computed in one pass: {'sha256': ..., 'md5': ...}."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, as lower-case hex."""
    return digests(path, ("sha256",))["sha256"]


def md5_of(path: str | Path) -> str:
    """The MD5 of a file, as lower-case hex."""
    return digests(path, ("md5",))["md5"]


def normalize_checksum(value: str | None, algorithm: str) -> str | None:
    """Lower-case hex, checked for the algorithm's length; None stays None."""
    if value is None:
        return None
    text = value.strip().lower()
    length = {"sha256": 64, "md5": 32}[algorithm]
    if len(text) != length or any(c not in "0123456789abcdef" for c in text):
        raise GenreflowError(
            f"{algorithm} checksum {value!r}: expected {length} hexadecimal digits"
        )
    return text


def verify(
    path: str | Path, *, sha256: str | None = None, md5: str | None = None, label: str = ""
) -> dict[str, str]:
    """Check a file against the given checksums; return its sha256 and md5.

    Raises:
        ChecksumMismatch: naming ``label`` (the URL, or the path by default), the expected
            and the actual hash, when a checksum does not match.
    """
    expected = {
        "sha256": normalize_checksum(sha256, "sha256"),
        "md5": normalize_checksum(md5, "md5"),
    }
    actual = digests(path)
    for algorithm, want in expected.items():
        if want is not None and actual[algorithm] != want:
            raise ChecksumMismatch(
                f"{label or path}: {algorithm} mismatch: expected {want}, got {actual[algorithm]}"
            )
    return actual


# --- progress ----------------------------------------------------------------------------
@contextmanager
def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Iterator:
    from genreflow.progress import progress_bar

    bar = progress_bar(
        total, desc=desc, unit="B", unit_scale=True, initial=initial, enabled=enabled, leave=False
    )
    try:
        yield bar
    finally:
        bar.close()


def _copy_stream(src: IO[bytes], dst: IO[bytes], on_chunk: Callable[[int], object]) -> int:
    copied = 0
    while chunk := src.read(CHUNK_BYTES):
        dst.write(chunk)
        copied += len(chunk)
        on_chunk(len(chunk))
    return copied


def _check_download_size(uri: str | Path, size: int | None) -> None:
    """Refuse a download that would write more than GENREFLOW_MAX_DOWNLOAD_BYTES."""
    cap = limit("GENREFLOW_MAX_DOWNLOAD_BYTES")
    if size is not None and size > cap:
        raise exceeded(redacted(uri), "GENREFLOW_MAX_DOWNLOAD_BYTES", f"{size} bytes")


@contextmanager
def _full_disk_said(dest: Path, uri: str | Path) -> Iterator[None]:
    """A full disk or quota while writing `dest` becomes one error that says so: no retry
    can get past it, and it must not read as a network failure."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise GenreflowError(
            f"{dest.parent}: no space left on the disk ({exc.strerror}) while writing "
            f"{dest.name} from {redacted(uri)}; free some space or write elsewhere"
        ) from exc


def _fsync(path: Path) -> None:
    """Flush a file to the disk before it is renamed into place: after a crash, a name
    that says "complete" never points at a file the disk had not yet received."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- fetch -------------------------------------------------------------------------------
def fetch(
    uri: str | Path,
    dest: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    retries: int = 5,
    backoff_s: float = 1.0,
) -> Path:
    """Copy or download ``uri`` to ``dest``, verified, through ``dest`` + '.part'.

    Args:
        uri: a plain path, file://, http(s):// or gs:// URI.
        dest: where the verified file ends up; its folder is created.
        sha256: expected SHA-256 (hex); checked before ``dest`` is written.
        md5: expected MD5 (hex); checked before ``dest`` is written.
        progress: report progress on stderr (a bar on a terminal, else a line at intervals).
        retries: how many times a transient HTTP failure (dropped connection, timeout,
            5xx, 429) is retried; a retry after the transfer made progress is free.
        backoff_s: the first retry's delay; each further retry doubles it.

    Returns:
        ``dest``.

    Raises:
        GenreflowError: the source is missing or refused (404, 403, ...), retries ran out,
            a checksum does not match, an https:// URL redirects to another scheme, the
            file is larger than GENREFLOW_MAX_DOWNLOAD_BYTES, or the disk is full. On a
            mismatch the bad download is removed and an existing ``dest`` is left as it was.

    Two processes fetching to the same ``dest`` take turns (a lock beside it): the
    ``.part`` keeps one name, so that a later run can resume it, and only the lock's
    holder ever writes it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    scheme = _scheme(uri)
    with locked(dest, what=str(dest), wait=True), _full_disk_said(dest, uri):
        if scheme in ("http", "https"):
            _fetch_http(str(uri), part, progress=progress, retries=retries, backoff_s=backoff_s)
        elif scheme == "gs":
            _fetch_gs(str(uri), part, progress=progress)
        else:
            _fetch_local(local_path(uri), part, progress=progress)
        try:
            verify(part, sha256=sha256, md5=md5, label=redacted(uri))
        except GenreflowError:
            # Resuming from a file that fails its checksum would only fail again.
            part.unlink(missing_ok=True)
            _resume_record(part).unlink(missing_ok=True)
            raise
        _fsync(part)
        os.replace(part, dest)
        _resume_record(part).unlink(missing_ok=True)
    return dest


def _fetch_local(src: Path | None, part: Path, *, progress: bool) -> None:
    assert src is not None
    if not src.is_file():
        what = "is a folder, not a file" if src.is_dir() else "no such file"
        raise GenreflowError(f"{src}: {what}")
    _check_download_size(src, src.stat().st_size)
    with (
        open(src, "rb") as fin,
        open(part, "wb") as fout,
        _progress_bar(src.stat().st_size, 0, src.name, progress) as bar,
    ):
        _copy_stream(fin, fout, bar.update)


# --- http(s) -----------------------------------------------------------------------------
class _TransientError(Exception):
    """A failure worth retrying: the next attempt may well succeed."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _resume_record(part: Path) -> Path:
    """Beside a .part file: which URL and which version of it the bytes came from."""
    return part.with_name(part.name + ".json")


def _resumable_offset(url: str, part: Path) -> tuple[int, str | None]:
    """Bytes already in ``part`` that may be resumed, and the validator for If-Range.

    A .part left by another URL (or with no record of where it came from) is started over
    rather than spliced onto.
    """
    if not part.exists():
        return 0, None
    try:
        record = json.loads(_resume_record(part).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("url") != url:
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


def _fetch_http(url: str, part: Path, *, progress: bool, retries: int, backoff_s: float) -> None:
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
                print(f"{redacted(url)}: {exc}; resuming at byte {after}", file=sys.stderr)
                continue
            if attempt >= retries:
                raise GenreflowError(
                    f"{redacted(url)}: download failed after {retries + 1} attempts: {exc}"
                ) from exc
            delay = backoff_s * 2**attempt
            if exc.retry_after_s is not None:
                delay = max(delay, exc.retry_after_s)
            attempt += 1
            print(
                f"{redacted(url)}: {exc}; retry {attempt}/{retries} in {delay:.1f} s",
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
    opener = urllib.request.build_opener(_HttpsStaysHttps)
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
        _check_download_size(url, total)

        new_validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        # Only a strong ETag or a date may be sent back in If-Range.
        if new_validator and new_validator.startswith("W/"):
            new_validator = None
        write_text_atomic(
            _resume_record(part), json.dumps({"url": url, "validator": new_validator})
        )

        written = offset
        cap = limit("GENREFLOW_MAX_DOWNLOAD_BYTES")
        with (
            open(part, mode) as out,
            _progress_bar(total, offset, file_name_of(url) or url, progress) as bar,
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
                    _check_download_size(url, written + len(chunk))
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


# --- gs:// -------------------------------------------------------------------------------
def gcs_client():
    """A google-cloud-storage client; anonymous when STORAGE_EMULATOR_HOST names an emulator."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "genreflow-emulator")
        return storage.Client(project=project, credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except Exception as exc:  # google.auth raises several types; all mean "no credentials"
        raise GenreflowError(
            f"cannot create a Google Cloud Storage client: {exc} "
            "(run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS)"
        ) from exc


@contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Turn the client's exceptions into one-line errors that name the object."""
    from google.api_core import exceptions as api_exceptions
    from google.cloud.storage.exceptions import DataCorruption

    try:
        yield
    except api_exceptions.NotFound as exc:
        raise GenreflowError(f"{redacted(uri)}: no such object or bucket (HTTP 404)") from exc
    except api_exceptions.Forbidden as exc:
        raise GenreflowError(f"{redacted(uri)}: access denied (HTTP 403): {exc.message}") from exc
    except api_exceptions.GoogleAPICallError as exc:
        raise GenreflowError(f"{redacted(uri)}: {exc}") from exc
    except DataCorruption as exc:
        # The client's own message spans a dozen lines; the traceback keeps it.
        raise GenreflowError(
            f"{redacted(uri)}: transfer checksum mismatch: the bytes that arrived differ from the "
            "object's crc32c/md5; nothing was kept"
        ) from exc


class _CountingWriter:
    """A binary file that reports each write to a progress bar."""

    def __init__(self, raw: IO[bytes], on_write: Callable[[int], object]):
        self._raw = raw
        self._on_write = on_write

    def write(self, data: bytes) -> int:
        written = self._raw.write(data)
        self._on_write(len(data))
        return written

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


def _fetch_gs(uri: str, part: Path, *, progress: bool) -> None:
    bucket_name, object_name = _split_gs(uri)
    with _gcs_errors(uri):
        blob = gcs_client().bucket(bucket_name).get_blob(object_name)
        if blob is None:
            raise GenreflowError(f"{redacted(uri)}: no such object or bucket (HTTP 404)")
        _check_download_size(uri, blob.size)
        try:
            with (
                open(part, "wb") as out,
                _progress_bar(blob.size, 0, object_name.rsplit("/", 1)[-1], progress) as bar,
            ):
                # The client retries transient errors and checks the object's own
                # crc32c/md5 on the way ("auto"); ours (sha256/md5) are checked after.
                blob.download_to_file(_CountingWriter(out, bar.update), checksum="auto")
        except BaseException:
            part.unlink(missing_ok=True)  # gs:// downloads start over; nothing to resume
            raise


def _gcs_stamp(uri: str) -> dict[str, int]:
    """The object's generation and size: what tells a cached copy from a replaced object."""
    bucket_name, object_name = _split_gs(uri)
    with _gcs_errors(uri):
        blob = gcs_client().bucket(bucket_name).get_blob(object_name)
    if blob is None:
        raise GenreflowError(f"{redacted(uri)}: no such object or bucket (HTTP 404)")
    return {"generation": int(blob.generation), "size": int(blob.size)}


def _gcs_exists(uri: str) -> bool:
    bucket_name, object_name = _split_gs(uri)
    with _gcs_errors(uri):
        return gcs_client().bucket(bucket_name).get_blob(object_name) is not None


def _gcs_generation(uri: str) -> int:
    """The object's generation, 0 when there is none (what if_generation_match=0 means)."""
    bucket_name, object_name = _split_gs(uri)
    with _gcs_errors(uri):
        blob = gcs_client().bucket(bucket_name).get_blob(object_name)
    return 0 if blob is None else int(blob.generation)


def _upload_gs(local: Path, uri: str, generation: int | None) -> dict[str, int]:
    """Upload through the resumable protocol, checksum-checked; the new object's stamp.

    `generation` is the object this upload may replace (0: there must be none); another
    writer's object in its place fails the upload (HTTP 412) instead of being overwritten.
    None replaces whatever is there.
    """
    from google.api_core import exceptions as api_exceptions

    bucket_name, object_name = _split_gs(uri)
    with _gcs_errors(uri):
        blob = gcs_client().bucket(bucket_name).blob(object_name, chunk_size=GCS_CHUNK_BYTES)
        condition = {} if generation is None else {"if_generation_match": generation}
        try:
            # The object appears only when the last chunk is in and the server's checksum
            # of the whole matches the client's ("auto": crc32c, else md5).
            blob.upload_from_filename(str(local), checksum="auto", **condition)
        except api_exceptions.PreconditionFailed as exc:
            expected = "no object" if generation == 0 else f"generation {generation}"
            raise GenreflowError(
                f"{redacted(uri)}: another writer wrote it meanwhile (this one expected "
                f"{expected} there); not overwritten"
            ) from exc
    return {"generation": int(blob.generation), "size": int(blob.size)}


def _delete_gs(uri: str, generation: int | None = None) -> None:
    from google.api_core import exceptions as api_exceptions

    bucket_name, object_name = _split_gs(uri)
    condition = {} if generation is None else {"if_generation_match": generation}
    with _gcs_errors(uri), contextlib.suppress(api_exceptions.NotFound):
        gcs_client().bucket(bucket_name).blob(object_name).delete(**condition)


def copy_folder(source: str | Path, dest: str | Path) -> None:
    """Copy every file under ``source`` (a folder, or a gs://BUCKET/PREFIX) into the local
    folder ``dest``, keeping relative paths."""
    dest = Path(dest)
    path = local_path(source)
    if path is not None:
        shutil.copytree(path, dest, dirs_exist_ok=True)
        return
    prefix = _gs_folder(str(source))
    bucket_name, object_prefix = _gs_bucket_and_prefix(prefix)
    with _gcs_errors(prefix):
        names = [b.name for b in gcs_client().list_blobs(bucket_name, prefix=object_prefix)]
    for name in names:
        fetch(f"gs://{bucket_name}/{name}", dest / name[len(object_prefix) :], progress=False)


# --- cache -------------------------------------------------------------------------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $GENREFLOW_CACHE, else ~/.cache/genreflow."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("GENREFLOW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "genreflow"


def _cache_slot(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    key = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    return cache_root(cache_dir) / key / (file_name_of(uri) or "download")


def _stamp_file(dest: Path) -> Path:
    """Beside a cached copy of a gs:// object: the generation it was downloaded at."""
    return dest.with_name(dest.name + ".gcs.json")


def _read_stamp(dest: Path) -> dict | None:
    try:
        return json.loads(_stamp_file(dest).read_text())
    except (OSError, ValueError):
        return None


def cached(
    uri: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """A local copy of ``uri``, downloaded once and reused (pretrained weights and the like).

    A local path is returned as it is, after checking the checksums when any are given.
    A remote file lands in ``<cache>/<hash of the URI>/<its file name>``: one folder per
    URI, so two files with the same name never collide, and the name stays readable.
    Given a checksum, the copy is checked against it. A gs:// object without one (a
    features file, say) is checked with one metadata request instead: an object replaced
    since it was cached (a new generation) is downloaded again.
    """
    path = local_path(uri)
    if path is not None:
        if not path.is_file():
            raise GenreflowError(f"{redacted(uri)}: no such file")
        if sha256 or md5:
            verify(path, sha256=sha256, md5=md5, label=str(uri))
        return path
    dest = _cache_slot(uri, cache_dir)
    # Two runs sharing the cache take turns at a slot: the second finds the file there.
    with locked(dest, what=str(dest), wait=True):
        return _cached_in(uri, dest, sha256=sha256, md5=md5, progress=progress)


def _cached_in(
    uri: str | Path, dest: Path, *, sha256: str | None, md5: str | None, progress: bool
) -> Path:
    stamp = None
    if _scheme(uri) == "gs" and not (sha256 or md5):
        stamp = _gcs_stamp(str(uri))
    if dest.is_file():
        if stamp is not None:
            if _read_stamp(dest) == stamp:
                return dest
            print(
                f"{redacted(uri)}: changed since {dest} was downloaded; downloading again",
                file=sys.stderr,
            )
        elif not (sha256 or md5):
            return dest  # fetch() renames into place only when complete
        else:
            try:
                verify(dest, sha256=sha256, md5=md5, label=str(dest))
                return dest
            except GenreflowError as exc:
                print(f"{exc}; downloading again", file=sys.stderr)
    _stamp_file(dest).unlink(missing_ok=True)
    fetch(uri, dest, sha256=sha256, md5=md5, progress=progress)
    if stamp is not None:
        # The stamp read before the download: should the object have been replaced in
        # between, the next call sees a newer generation and downloads again.
        write_text_atomic(_stamp_file(dest), json.dumps(stamp))
    return dest


def input_path(
    uri: str | Path, *, sha256: str | None = None, md5: str | None = None, progress: bool = True
) -> Path:
    """A local path to read ``uri`` from: how every step opens an input it is given.

    A plain path or file:// URI is returned as it is, unchecked, so that the caller's own
    "not found" message stands; http(s):// and gs:// go through `cached` (downloaded once,
    verified, and for gs:// downloaded again when the object has been replaced).
    """
    path = local_path(uri)
    if path is not None:
        if sha256 or md5:
            verify(path, sha256=sha256, md5=md5, label=str(uri))
        return path
    return cached(uri, sha256=sha256, md5=md5, progress=progress)


# --- upload ------------------------------------------------------------------------------
def upload(
    local: str | Path, uri: str | Path, *, progress: bool = True, generation: int | None = None
) -> dict[str, int] | None:
    """Write a local file to a local path, file:// or gs:// URI, verified.

    gs:// uses the resumable upload protocol and the client's end-to-end checksum
    (crc32c where available, else md5): a corrupted transfer raises and leaves no object.
    With `generation` (0: no object may be there yet), the upload replaces only that
    generation of the object and fails, naming it, if another writer got there first; it
    returns the new object's generation and size. A local destination is written beside
    itself under a name of its own and renamed when complete (returns None).
    """
    local = Path(local)
    if not local.is_file():
        raise GenreflowError(f"{local}: no such file to upload")
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        raise GenreflowError(f"{redacted(uri)}: cannot upload over HTTP; use a local path or gs://")
    if scheme == "gs":
        return _upload_gs(local, str(uri), generation)
    dest = local_path(uri)
    assert dest is not None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(local, "rb") as fin,
        _progress_bar(local.stat().st_size, 0, local.name, progress) as bar,
        _full_disk_said(dest, local),
    ):
        write_atomic(dest, lambda fout: _copy_stream(fin, fout, bar.update))
    return None


# --- writing outputs through a local stand-in ---------------------------------------------
def _check_writable(uri: str | Path) -> None:
    if _scheme(uri) in ("http", "https"):
        raise GenreflowError(
            f"{redacted(uri)}: cannot write to an http(s):// URL; use a local path or gs://"
        )


@contextmanager
def output_file(uri: str | Path) -> Iterator[Path]:
    """Where to write the file that belongs at ``uri``; it is published when the block ends.

    A plain path or file:// URI gives that path itself (the writer makes its own write
    atomic). For gs:// it gives a path in the cache: when the block ends without an
    error, the file is uploaded (resumable, checksum-checked; the object appears only
    when complete) and becomes the cached copy that `input_path` returns for ``uri``, so
    reading it back on this machine downloads nothing. After an error nothing is uploaded.
    """
    path = local_path(uri)
    if path is not None:
        yield path
        return
    _check_writable(uri)
    _split_gs(str(uri))  # a malformed URI fails before the work, not after it
    # The object as it is now is the one this write may replace: should another writer
    # replace it meanwhile, the upload fails instead of silently overwriting theirs.
    replaces = _gcs_generation(str(uri))
    dest = _cache_slot(uri)
    (dest.parent / "publishing").mkdir(parents=True, exist_ok=True)
    # A name of its own: two runs writing the same URI never share a staging file.
    fd, name = tempfile.mkstemp(prefix=f"{dest.name}.", dir=dest.parent / "publishing")
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        stamp = _upload_gs(staging, str(uri), replaces)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    with locked(dest, what=str(dest), wait=True):
        _stamp_file(dest).unlink(missing_ok=True)
        os.replace(staging, dest)
        write_text_atomic(_stamp_file(dest), json.dumps(stamp))


class OutputFolder:
    """A local folder that stands in for an output folder ``uri`` (a gs:// prefix).

    Steps write into ``path``; `publish` uploads files to the same names under ``uri``
    and `pull` brings one back. For a local output folder ``path`` is the folder itself
    and ``uri`` is None: publishing does nothing and there is nothing to pull.
    """

    def __init__(
        self, path: Path, uri: str | None = None, generations: dict[str, int] | None = None
    ):
        self.path = path
        self.uri = uri
        # The generation of each object under ``uri`` this folder may replace: what was
        # there when it was opened, then what it wrote itself. Any other writer's object
        # in its place makes the upload fail (generation preconditions) instead.
        self.generations = dict(generations or {})

    def uri_of(self, name: str) -> str:
        """The object a file of this folder is published to."""
        return f"{self.uri}/{name}"

    def publish(self, *names: str) -> None:
        """Upload these files (relative paths), in the order given."""
        if self.uri is None:
            return
        for name in names:
            stamp = upload(
                self.path / name, self.uri_of(name), generation=self.generations.get(name, 0)
            )
            self.generations[name] = stamp["generation"]

    def pull(self, name: str) -> bool:
        """Download ``name`` from ``uri`` into the folder; False if there is no such object."""
        if self.uri is None or not _gcs_exists(self.uri_of(name)):
            return False
        fetch(self.uri_of(name), self.path / name, progress=False)
        return True

    def unpublish(self, *names: str) -> None:
        """Delete these objects under ``uri`` where they exist."""
        if self.uri is None:
            return
        for name in names:
            if name in self.generations:
                _delete_gs(self.uri_of(name), self.generations.pop(name))

    def files(self) -> list[str]:
        """Relative paths of the folder's files, leaving out hidden ones (temporary files)."""
        return sorted(
            path.relative_to(self.path).as_posix()
            for path in self.path.rglob("*")
            if path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(self.path).parts)
        )


@contextmanager
def output_folder(
    uri: str | Path, *, commit: str | None = None, transient: tuple[str, ...] = ()
) -> Iterator[OutputFolder]:
    """A folder to write outputs into that are published to ``uri`` when the block ends.

    A plain path or file:// URI gives that folder itself. For gs://BUCKET/PREFIX it gives
    a working folder in the cache, ``<cache>/work/<hash of the URI>``, the same one for
    the same URI, so a step killed on this machine finds its partial work there again.
    When the block ends without an error, every file in it is uploaded under the prefix,
    ``commit`` last (the file whose presence says the rest is complete); then the
    ``transient`` names the folder no longer holds (a finished run's resume state) are
    deleted from the bucket, and the working folder is removed. After an error nothing is
    uploaded and the working folder stays for the next attempt.
    """
    path = local_path(uri)
    if path is not None:
        # Two runs writing one folder would mix their files: the second refuses.
        with locked(path, what=f"output folder {path}", wait=False):
            yield OutputFolder(path)
        return
    _check_writable(uri)
    folder_uri = _gs_folder(str(uri))
    work = cache_root() / "work" / hashlib.sha256(folder_uri.encode()).hexdigest()[:16]
    with locked(work, what=f"output folder {redacted(folder_uri)} (working in {work})", wait=False):
        work.mkdir(parents=True, exist_ok=True)
        folder = OutputFolder(work, folder_uri, _gcs_generations(folder_uri))
        yield folder
        _publish_folder(folder, work, commit, transient)


def _gcs_generations(folder_uri: str) -> dict[str, int]:
    """Each object's generation under a gs:// folder, by its name relative to the folder."""
    bucket_name, prefix = _gs_bucket_and_prefix(folder_uri)
    with _gcs_errors(folder_uri):
        return {
            blob.name[len(prefix) :]: int(blob.generation)
            for blob in gcs_client().list_blobs(bucket_name, prefix=prefix)
        }


def _publish_folder(
    folder: OutputFolder, work: Path, commit: str | None, transient: tuple[str, ...]
) -> None:
    names = folder.files()
    if commit in names:
        names.remove(commit)
        names.append(commit)
    folder.publish(*names)
    folder.unpublish(*(name for name in transient if not (work / name).exists()))
    shutil.rmtree(work)


__all__ = [
    "OutputFolder",
    "cache_root",
    "cached",
    "digests",
    "fetch",
    "file_name_of",
    "gcs_client",
    "input_path",
    "is_remote",
    "local_path",
    "md5_of",
    "normalize_checksum",
    "output_file",
    "output_folder",
    "redacted",
    "redacted_text",
    "redacted_values",
    "sha256_of",
    "upload",
    "verify",
]
