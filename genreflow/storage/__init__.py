"""One way to read and write local paths, file://, http(s):// and gs:// URIs.

Every step that takes a path (dataset source, pretrained weights, outputs) goes through
here, so a user can swap a local file for a URL or a bucket by changing one argument:
`input_path` gives a local path to read any of them from (remote ones downloaded once into
the cache), `output_file` and `output_folder` a local place to write that is published to
gs:// when the writing is done.

One module per job: uris (what a URI names; redaction, the one routine that makes a URI
fit to show), checksums, http (resumed, retried downloads; netrc logins), gcs (gs://),
transfer (fetch one file or a gs:// folder, verified), cache, outputs (upload and publish).
"""

from genreflow.storage.cache import cache_root, cached, input_path
from genreflow.storage.checksums import digests, md5_of, normalize_checksum, sha256_of, verify
from genreflow.storage.gcs import gcs_client
from genreflow.storage.outputs import OutputFolder, output_file, output_folder, upload
from genreflow.storage.transfer import copy_folder, fetch
from genreflow.storage.uris import (
    SOURCE_CREDENTIALS,
    TRACKING_CREDENTIALS,
    file_name_of,
    has_userinfo,
    is_remote,
    local_path,
    redacted,
    redacted_text,
    redacted_values,
    refuse_credentials_in,
    refuse_userinfo,
)

__all__ = [
    "SOURCE_CREDENTIALS",
    "TRACKING_CREDENTIALS",
    "OutputFolder",
    "cache_root",
    "cached",
    "copy_folder",
    "digests",
    "fetch",
    "file_name_of",
    "gcs_client",
    "has_userinfo",
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
    "refuse_credentials_in",
    "refuse_userinfo",
    "sha256_of",
    "upload",
    "verify",
]
