"""The download step: fetch, verify and safely extract the dataset (genreflow.data.download)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genreflow import storage


@dataclass
class Downloaded:
    root: Path  # the dataset's root, in a layout `pack` reads
    source: str  # where it came from, redacted: fit to show and record

    def clips(self) -> dict[str, int]:
        """Clips per genre under the root."""
        from genreflow.data.download import count_clips

        return count_clips(self.root)


def download(source: str, out: str | Path, *, sha256: str = "", md5: str = "") -> Downloaded:
    """Fetch `source` (https://, http://, gs://, file:// or a path; an archive or an
    extracted tree) into `out`, checked against `sha256` ("original": the original
    genres.tar.gz's checksums) and `md5` ("" = none, or the one built in for a known URL)."""
    from genreflow.data.download import download as fetch

    root = fetch(source, out, sha256=sha256 or None, md5=md5 or None)
    return Downloaded(Path(root), storage.redacted(source))
