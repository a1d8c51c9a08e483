"""Copy or download one file, or one gs:// folder, into a local place, verified.

Downloads stream to ``<dest>.part`` and are renamed to ``dest`` only once the requested
checksums hold, so a file at ``dest`` is always complete.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from genreflow.atomic import move_into_place
from genreflow.errors import GenreflowError
from genreflow.locks import locked
from genreflow.storage.checksums import verify
from genreflow.storage.gcs import fetch_gs, gcs_client, gcs_errors
from genreflow.storage.http import check_url, fetch_http, resume_record
from genreflow.storage.streams import check_download_size, copy_stream, full_disk_said, progress_bar
from genreflow.storage.uris import gs_bucket_and_prefix, gs_folder, local_path, redacted, scheme_of


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
            file is larger than GENREFLOW_MAX_DOWNLOAD_BYTES, or the disk is full; before
            any request, an http(s) URL with a user or password in it (netrc's place) or
            one that cannot be requested. On a mismatch the bad download is removed and an
            existing ``dest`` is left as it was.

    Two processes fetching to the same ``dest`` take turns (a lock beside it): the
    ``.part`` keeps one name, so that a later run can resume it, and only the lock's
    holder ever writes it.
    """
    dest = Path(dest)
    scheme = scheme_of(uri)
    if scheme in ("http", "https"):
        check_url(str(uri))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with locked(dest, what=str(dest), wait=True), full_disk_said(dest, uri):
        if scheme in ("http", "https"):
            fetch_http(str(uri), part, progress=progress, retries=retries, backoff_s=backoff_s)
        elif scheme == "gs":
            fetch_gs(str(uri), part, progress=progress)
        else:
            _fetch_local(local_path(uri), part, progress=progress)
        try:
            verify(part, sha256=sha256, md5=md5, label=redacted(uri))
        except GenreflowError:
            # Resuming from a file that fails its checksum would only fail again.
            part.unlink(missing_ok=True)
            resume_record(part).unlink(missing_ok=True)
            raise
        move_into_place(part, dest)
        resume_record(part).unlink(missing_ok=True)
    return dest


def _fetch_local(src: Path | None, part: Path, *, progress: bool) -> None:
    assert src is not None
    if not src.is_file():
        what = "is a folder, not a file" if src.is_dir() else "no such file"
        raise GenreflowError(f"{src}: {what}")
    check_download_size(src, src.stat().st_size)
    with (
        open(src, "rb") as fin,
        open(part, "wb") as fout,
        progress_bar(src.stat().st_size, 0, src.name, progress) as bar,
    ):
        copy_stream(fin, fout, bar.update)


def copy_folder(source: str | Path, dest: str | Path) -> None:
    """Copy every file under ``source`` (a folder, or a gs://BUCKET/PREFIX) into the local
    folder ``dest``, keeping relative paths.

    A bucket's listing is data from outside: every object name is checked to stay under
    ``dest`` before anything is written (see `_relative_name`); folder placeholders
    (names ending in "/", no data) are skipped, and said so.
    """
    dest = Path(dest)
    path = local_path(source)
    if path is not None:
        shutil.copytree(path, dest, dirs_exist_ok=True)
        return
    prefix = gs_folder(str(source))
    bucket_name, object_prefix = gs_bucket_and_prefix(prefix)
    with gcs_errors(prefix):
        names = [b.name for b in gcs_client().list_blobs(bucket_name, prefix=object_prefix)]
    placeholders = [name for name in names if name.endswith("/")]
    # Every name checked before the first byte is written: a refused listing leaves nothing.
    targets = {
        name: _target_of(name[len(object_prefix) :], prefix, dest)
        for name in names
        if not name.endswith("/")
    }
    if placeholders:
        print(
            f"{redacted(prefix)}: skipped {len(placeholders)} folder placeholder object(s) "
            f"(no data): {', '.join(map(repr, placeholders))}",
            file=sys.stderr,
        )
    for name, target in targets.items():
        fetch(f"gs://{bucket_name}/{name}", target, progress=False)


def _target_of(name: str, prefix: str, dest: Path) -> Path:
    """Where the object ``name`` (relative to ``prefix``) goes under ``dest``; an error,
    naming the object, for a name that could land anywhere else: absolute, with a "..",
    "." or empty segment, a backslash (a separator on Windows) or a control character."""
    why = None
    if re.search(r"[\x00-\x1f\x7f]", name):
        why = "a control character (NUL, newline, ...) in its name"
    elif "\\" in name:
        why = "a backslash in its name"
    elif name.startswith("/"):
        why = "an absolute name"
    elif any(segment in ("", ".", "..") for segment in name.split("/")):
        why = "an empty, '.' or '..' path segment"
    elif not (dest / name).resolve().is_relative_to(dest.resolve()):
        why = f"it resolves outside {dest}"
    if why is not None:
        raise GenreflowError(
            f"{redacted(prefix)}: refusing object {name!r}: {why}; nothing was copied to {dest}"
        )
    return dest / name
