"""Checksums of files: computed in one pass, checked before a download gets its name."""

from __future__ import annotations

import hashlib
from pathlib import Path

from genreflow.errors import ChecksumMismatch, GenreflowError

CHUNK_BYTES = 1 << 20


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
