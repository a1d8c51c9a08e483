"""The local cache: one copy of each remote input, downloaded once and reused.

A remote file lands in ``<cache>/<hash of the URI>/<its file name>``; a gs:// object cached
without a checksum keeps a stamp of the generation it was downloaded at, so that an object
replaced since is downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from genreflow.atomic import write_text_atomic
from genreflow.errors import GenreflowError
from genreflow.locks import locked
from genreflow.storage.checksums import verify
from genreflow.storage.gcs import gcs_stamp
from genreflow.storage.transfer import fetch
from genreflow.storage.uris import file_name_of, local_path, redacted, scheme_of


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $GENREFLOW_CACHE, else ~/.cache/genreflow."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("GENREFLOW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "genreflow"


def cache_slot(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where ``uri``'s copy goes: a folder of its own, named by the URI's hash, and its file
    name (a name that would not stay in that folder, such as "..", becomes "download")."""
    key = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    name = file_name_of(uri)
    if name in ("", ".", "..") or any(c in name for c in "\\\x00"):
        name = "download"
    return cache_root(cache_dir) / key / name


def stamp_file(dest: Path) -> Path:
    """Beside a cached copy of a gs:// object: the generation it was downloaded at."""
    return dest.with_name(dest.name + ".gcs.json")


def _read_stamp(dest: Path) -> dict | None:
    try:
        return json.loads(stamp_file(dest).read_text())
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
    dest = cache_slot(uri, cache_dir)
    # Two runs sharing the cache take turns at a slot: the second finds the file there.
    with locked(dest, what=str(dest), wait=True):
        return _cached_in(uri, dest, sha256=sha256, md5=md5, progress=progress)


def _cached_in(
    uri: str | Path, dest: Path, *, sha256: str | None, md5: str | None, progress: bool
) -> Path:
    stamp = None
    if scheme_of(uri) == "gs" and not (sha256 or md5):
        stamp = gcs_stamp(str(uri))
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
    stamp_file(dest).unlink(missing_ok=True)
    fetch(uri, dest, sha256=sha256, md5=md5, progress=progress)
    if stamp is not None:
        # The stamp read before the download: should the object have been replaced in
        # between, the next call sees a newer generation and downloads again.
        write_text_atomic(stamp_file(dest), json.dumps(stamp))
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
