"""Outputs: written to a local place, published to gs:// when the writing is done.

`output_file` and `output_folder` give a local place to write into; for gs:// it is a
working copy in the cache, uploaded (resumable, checksum-checked, conditional on the object
generation it replaces) when the block ends without an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genreflow.atomic import move_into_place, write_atomic, write_text_atomic
from genreflow.errors import GenreflowError
from genreflow.locks import locked
from genreflow.storage.cache import cache_root, cache_slot, stamp_file
from genreflow.storage.gcs import (
    delete_gs,
    gcs_exists,
    gcs_generation,
    gcs_generations,
    upload_gs,
)
from genreflow.storage.streams import copy_stream, full_disk_said, progress_bar
from genreflow.storage.transfer import fetch
from genreflow.storage.uris import gs_folder, local_path, redacted, scheme_of, split_gs


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
    scheme = scheme_of(uri)
    if scheme in ("http", "https"):
        raise GenreflowError(f"{redacted(uri)}: cannot upload over HTTP; use a local path or gs://")
    if scheme == "gs":
        return upload_gs(local, str(uri), generation)
    dest = local_path(uri)
    assert dest is not None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(local, "rb") as fin,
        progress_bar(local.stat().st_size, 0, local.name, progress) as bar,
        full_disk_said(dest, local),
    ):
        write_atomic(dest, lambda fout: copy_stream(fin, fout, bar.update))
    return None


def _check_writable(uri: str | Path) -> None:
    if scheme_of(uri) in ("http", "https"):
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
    split_gs(str(uri))  # a malformed URI fails before the work, not after it
    # The object as it is now is the one this write may replace: should another writer
    # replace it meanwhile, the upload fails instead of silently overwriting theirs.
    replaces = gcs_generation(str(uri))
    dest = cache_slot(uri)
    (dest.parent / "publishing").mkdir(parents=True, exist_ok=True)
    # A name of its own: two runs writing the same URI never share a staging file.
    fd, name = tempfile.mkstemp(prefix=f"{dest.name}.", dir=dest.parent / "publishing")
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        stamp = upload_gs(staging, str(uri), replaces)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    with locked(dest, what=str(dest), wait=True):
        stamp_file(dest).unlink(missing_ok=True)
        move_into_place(staging, dest)
        write_text_atomic(stamp_file(dest), json.dumps(stamp))


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
        for name in names:
            self.publish_file(name, self.path / name)

    def publish_file(self, name: str, local: Path) -> int:
        """Upload `local` as the folder's file `name` (a snapshot of it taken earlier, say);
        returns the bytes sent (0 for a local folder, where there is nothing to do)."""
        if self.uri is None:
            return 0
        stamp = upload(local, self.uri_of(name), generation=self.generations.get(name, 0))
        self.generations[name] = stamp["generation"]
        return stamp["size"]

    def pull(self, name: str) -> bool:
        """Download ``name`` from ``uri`` into the folder; False if there is no such object."""
        if self.uri is None or not gcs_exists(self.uri_of(name)):
            return False
        fetch(self.uri_of(name), self.path / name, progress=False)
        return True

    def unpublish(self, *names: str) -> None:
        """Delete these objects under ``uri`` where they exist."""
        if self.uri is None:
            return
        for name in names:
            if name in self.generations:
                delete_gs(self.uri_of(name), self.generations.pop(name))

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
    folder_uri = gs_folder(str(uri))
    work = cache_root() / "work" / hashlib.sha256(folder_uri.encode()).hexdigest()[:16]
    with locked(work, what=f"output folder {redacted(folder_uri)} (working in {work})", wait=False):
        work.mkdir(parents=True, exist_ok=True)
        folder = OutputFolder(work, folder_uri, gcs_generations(folder_uri))
        yield folder
        _publish_folder(folder, work, commit, transient)


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
