"""gs:// through google-cloud-storage, imported only when a gs:// URI is used.

Transfers are checked end to end (the client's crc32c, else md5); uploads are resumable and
may be made conditional on the object generation they replace, so that a second writer's
upload fails instead of overwriting the first's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from genreflow.errors import GenreflowError
from genreflow.storage.streams import check_download_size, progress_bar
from genreflow.storage.uris import gs_bucket_and_prefix, redacted, split_gs

# Uploads to gs:// always go through the resumable protocol, in chunks of this size (a
# multiple of 256 KiB, as the API requires): one request per chunk, so a 330 MB checkpoint
# takes 11 round trips, and an interrupted chunk costs at most this much to send again.
GCS_CHUNK_BYTES = 32 * 1024 * 1024


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
def gcs_errors(uri: str) -> Iterator[None]:
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


def fetch_gs(uri: str, part: Path, *, progress: bool) -> None:
    bucket_name, object_name = split_gs(uri)
    with gcs_errors(uri):
        blob = gcs_client().bucket(bucket_name).get_blob(object_name)
        if blob is None:
            raise GenreflowError(f"{redacted(uri)}: no such object or bucket (HTTP 404)")
        check_download_size(uri, blob.size)
        try:
            with (
                open(part, "wb") as out,
                progress_bar(blob.size, 0, object_name.rsplit("/", 1)[-1], progress) as bar,
            ):
                # The client retries transient errors and checks the object's own
                # crc32c/md5 on the way ("auto"); ours (sha256/md5) are checked after.
                blob.download_to_file(_CountingWriter(out, bar.update), checksum="auto")
        except BaseException:
            part.unlink(missing_ok=True)  # gs:// downloads start over; nothing to resume
            raise


def gcs_stamp(uri: str) -> dict[str, int]:
    """The object's generation and size: what tells a cached copy from a replaced object."""
    bucket_name, object_name = split_gs(uri)
    with gcs_errors(uri):
        blob = gcs_client().bucket(bucket_name).get_blob(object_name)
    if blob is None:
        raise GenreflowError(f"{redacted(uri)}: no such object or bucket (HTTP 404)")
    return {"generation": int(blob.generation), "size": int(blob.size)}


def gcs_exists(uri: str) -> bool:
    bucket_name, object_name = split_gs(uri)
    with gcs_errors(uri):
        return gcs_client().bucket(bucket_name).get_blob(object_name) is not None


def gcs_generation(uri: str) -> int:
    """The object's generation, 0 when there is none (what if_generation_match=0 means)."""
    bucket_name, object_name = split_gs(uri)
    with gcs_errors(uri):
        blob = gcs_client().bucket(bucket_name).get_blob(object_name)
    return 0 if blob is None else int(blob.generation)


def upload_gs(local: Path, uri: str, generation: int | None) -> dict[str, int]:
    """Upload through the resumable protocol, checksum-checked; the new object's stamp.

    `generation` is the object this upload may replace (0: there must be none); another
    writer's object in its place fails the upload (HTTP 412) instead of being overwritten.
    None replaces whatever is there.
    """
    from google.api_core import exceptions as api_exceptions

    bucket_name, object_name = split_gs(uri)
    with gcs_errors(uri):
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


def delete_gs(uri: str, generation: int | None = None) -> None:
    from google.api_core import exceptions as api_exceptions

    bucket_name, object_name = split_gs(uri)
    condition = {} if generation is None else {"if_generation_match": generation}
    with gcs_errors(uri), contextlib.suppress(api_exceptions.NotFound):
        gcs_client().bucket(bucket_name).blob(object_name).delete(**condition)


def gcs_generations(folder_uri: str) -> dict[str, int]:
    """Each object's generation under a gs:// folder, by its name relative to the folder."""
    bucket_name, prefix = gs_bucket_and_prefix(folder_uri)
    with gcs_errors(folder_uri):
        return {
            blob.name[len(prefix) :]: int(blob.generation)
            for blob in gcs_client().list_blobs(bucket_name, prefix=prefix)
        }
