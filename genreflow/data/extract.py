"""An untrusted archive (.tar.gz, .tgz, .tar, .zip) extracted into a fresh staging folder.

Every member is checked before anything is written: a path that is absolute or climbs out
with `..`, a symbolic or hard link, a device, a FIFO or any other special file stops the
extraction with an error that names the archive and the member; what it may write is capped
(genreflow.limits: bytes, members, the compression ratio). A tar's headers are read first,
each through a size limit, because tarfile reads a GNU long name or a pax record whole,
whatever size its header claims, before any other check could run. genreflow.data.download
moves the staged tree into place.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from genreflow.atomic import fsync_path
from genreflow.errors import GenreflowError
from genreflow.limits import exceeded, limit

# The staging folders' prefix inside the output folder (a killed run's are removed).
EXTRACT_PREFIX = ".extract-"
_CHUNK_BYTES = 1 << 20


# --- safe extraction ---------------------------------------------------------------------
def _refuse(label: str, member: str, why: str) -> GenreflowError:
    return GenreflowError(f"{label}: refusing archive member {member!r}: {why}")


def _safe_relative_path(name: str, label: str) -> PurePosixPath | None:
    """The member's path inside the extraction folder, or None for the folder itself ('./')."""
    if not name or "\x00" in name:
        raise _refuse(label, name, "empty name or NUL byte in the name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _refuse(label, name, "absolute path")
    # Backslashes count as separators here: an archive made on Windows may use them.
    if ".." in re.split(r"[/\\]", name):
        raise _refuse(label, name, "'..' path component (escapes the extraction folder)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def _target(staging: Path, rel: PurePosixPath, label: str, name: str) -> Path:
    target = staging.joinpath(*rel.parts)
    # Belt and braces: nothing we create is a link, so this holds unless a check above is wrong.
    if not target.resolve().is_relative_to(staging.resolve()):
        raise _refuse(label, name, "resolves outside the extraction folder")
    return target


class _Budget:
    """What one extraction may still create: members, bytes, and bytes per archive byte.

    Checked against each member's declared size before it is written; tarfile and zipfile
    never give more bytes than a member declares (zipfile also checks its CRC).
    """

    def __init__(self, archive: Path, label: str):
        self.label = label
        self.archive_bytes = max(archive.stat().st_size, 1)
        self.max_members = limit("GENREFLOW_MAX_ARCHIVE_MEMBERS")
        self.max_bytes = limit("GENREFLOW_MAX_EXTRACT_BYTES")
        self.max_ratio = limit("GENREFLOW_MAX_COMPRESSION_RATIO")
        self.members = 0
        self.bytes = 0

    def take(self, member: str, size: int) -> None:
        self.members += 1
        self.bytes += max(size, 0)
        at = f"(at member {member!r})"
        if self.members > self.max_members:
            raise exceeded(
                self.label,
                "GENREFLOW_MAX_ARCHIVE_MEMBERS",
                f"holds more than {self.max_members} members {at}",
            )
        if self.bytes > self.max_bytes:
            raise exceeded(
                self.label,
                "GENREFLOW_MAX_EXTRACT_BYTES",
                f"extracts to more than {self.max_bytes} bytes {at}",
            )
        if self.bytes > self.max_ratio * self.archive_bytes:
            raise exceeded(
                self.label,
                "GENREFLOW_MAX_COMPRESSION_RATIO",
                f"extracts to more than {self.max_ratio} times its {self.archive_bytes} bytes {at}",
            )


def _write_member(source, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with source, open(target, "wb") as f:
        shutil.copyfileobj(source, f, _CHUNK_BYTES)
        # On the disk before the marker says the tree is complete.
        f.flush()
        os.fsync(f.fileno())


def _check_tar_member(member: tarfile.TarInfo, staging: Path, label: str) -> None:
    if member.issym():
        raise _refuse(label, member.name, f"symbolic link (to {member.linkname!r})")
    if member.islnk():
        raise _refuse(label, member.name, f"hard link (to {member.linkname!r})")
    if member.ischr() or member.isblk():
        raise _refuse(label, member.name, "device file")
    if member.isfifo():
        raise _refuse(label, member.name, "FIFO (named pipe)")
    if not (member.isreg() or member.isdir()):
        raise _refuse(label, member.name, f"special file (tar type {member.type!r})")
    # A second opinion from the standard library's own policy, where it exists (3.11.4+).
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, str(staging))
        except tarfile.FilterError as exc:
            raise _refuse(label, member.name, str(exc)) from exc


def _extract_tar(archive: Path, staging: Path, label: str, budget: _Budget) -> None:
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise GenreflowError(f"{label}: not a readable tar archive: {exc}") from exc
    with tar:
        name = "(first member)"
        try:
            for member in tar:
                name = member.name
                rel = _safe_relative_path(member.name, label)
                _check_tar_member(member, staging, label)
                budget.take(member.name, member.size if member.isreg() else 0)
                if rel is None:
                    continue
                target = _target(staging, rel, label, member.name)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    _write_member(tar.extractfile(member), target)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise GenreflowError(f"{label}: extraction failed at {name!r}: {exc}") from exc


def _extract_zip(archive: Path, staging: Path, label: str, budget: _Budget) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise GenreflowError(f"{label}: not a readable zip archive: {exc}") from exc
    with zf:
        for info in zf.infolist():
            name = info.filename
            rel = _safe_relative_path(name, label)
            mode = info.external_attr >> 16  # Unix mode bits, when the creator recorded them
            kind = stat.S_IFMT(mode)
            if stat.S_ISLNK(mode):
                raise _refuse(label, name, "symbolic link")
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                raise _refuse(label, name, "device file")
            if stat.S_ISFIFO(mode):
                raise _refuse(label, name, "FIFO (named pipe)")
            if kind and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _refuse(label, name, f"special file (mode {oct(mode)})")
            if info.flag_bits & 0x1:
                raise _refuse(label, name, "encrypted member")
            budget.take(name, info.file_size)
            if rel is None:
                continue
            target = _target(staging, rel, label, name)
            try:
                if info.is_dir() or stat.S_ISDIR(mode):
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    _write_member(zf.open(info), target)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:
                raise GenreflowError(f"{label}: extraction failed at {name!r}: {exc}") from exc


def extract_to_staging(archive: Path, out: Path, label: str) -> Path:
    """Extract into a fresh hidden folder inside ``out``, flushed to the disk; removed again
    on any failure."""
    if zipfile.is_zipfile(archive):
        extract = _extract_zip
    elif _is_tar(archive, label):  # never tarfile.is_tarfile: see _is_tar
        extract = _extract_tar
    else:
        raise GenreflowError(f"{label}: not a .tar.gz, .tgz, .tar or .zip archive")
    budget = _Budget(archive, label)
    staging = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=out))
    try:
        extract(archive, staging, label, budget)
        # The members' own bytes are flushed as they are written; their folders' entries
        # here, so that the tree is on the disk before the marker says it is complete.
        for folder, _, _ in os.walk(staging, topdown=False):
            fsync_path(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


# --- a tar's headers, read before tarfile does -----------------------------------------------
# Header types whose data tarfile reads whole into memory as soon as it meets them: GNU long
# names and link names, pax extended headers (per member, global, Solaris's).
_HEADER_EXTENSIONS = {
    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link",
    tarfile.XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax global",
    tarfile.SOLARIS_XHDTYPE: "pax",
}
_DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


def _decompressed(archive: Path) -> IO[bytes]:
    """The tar stream inside `archive`, whichever of tarfile's compressions it uses."""
    with open(archive, "rb") as f:
        magic = f.read(6)
    for prefix, opener in _DECOMPRESSORS:
        if magic.startswith(prefix):
            return opener(archive, "rb")
    return open(archive, "rb")


def _is_tar(archive: Path, label: str) -> bool:
    """Whether `archive` is a tar archive (plain, gzip, bzip2 or xz), every header of it
    read first in bounded memory: tarfile, is_tarfile included, reads a GNU long name or a
    pax record whole, whatever size its header claims (a 1.8 MB tar.gz claiming 400 MiB
    took 428 MiB). Refuses, naming the header, one over GENREFLOW_MAX_ARCHIVE_HEADER_BYTES,
    a GNU or pax sparse member (it extracts to more than its stored size), and a damaged
    header or stream."""
    cap = limit("GENREFLOW_MAX_ARCHIVE_HEADER_BYTES")
    offset = 0  # of the header being read, in the tar stream
    next_size = None  # a pax header's size=, which replaces the next member's own
    try:
        with _decompressed(archive) as stream:
            while (block := stream.read(tarfile.BLOCKSIZE)) and block != bytes(len(block)):
                try:
                    header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
                except tarfile.HeaderError as exc:
                    if offset == 0:
                        return False
                    raise GenreflowError(
                        f"{label}: not a readable tar archive: damaged header at byte "
                        f"{offset} ({exc})"
                    ) from None
                if header.size < 0:  # base-256 sizes can be negative
                    raise GenreflowError(
                        f"{label}: not a readable tar archive: damaged header at byte {offset} "
                        f"(size {header.size})"
                    )
                kind = _HEADER_EXTENSIONS.get(header.type)
                if header.type == tarfile.GNUTYPE_SPARSE:
                    raise _refuse(label, header.name, "GNU sparse member")
                if kind is not None:
                    if header.size > cap:
                        raise exceeded(
                            label,
                            "GENREFLOW_MAX_ARCHIVE_HEADER_BYTES",
                            f"its {kind} header at byte {offset} claims {header.size} bytes",
                        )
                    data = _read_exactly(stream, header.size, label, offset)
                    if header.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                        records = _pax_records(data[: header.size], label, offset)
                        if any(key.startswith(b"GNU.sparse.") for key in records):
                            raise _refuse(label, header.name, "pax sparse member")
                        if b"size" in records:
                            next_size = int(records[b"size"])  # a ValueError: damaged
                            if next_size < 0:
                                raise ValueError(f"pax size {next_size}")
                elif header.isreg() or header.type not in tarfile.SUPPORTED_TYPES:
                    # Only these carry data in tarfile's reading; the rest's size is ignored.
                    size, next_size = (header.size if next_size is None else next_size), None
                    _skip(stream, size, label, offset)
                else:
                    next_size = None
                offset = stream.tell()
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        if offset == 0:
            return False
        raise GenreflowError(
            f"{label}: not a readable tar archive: {exc} (after byte {offset})"
        ) from None
    return offset > 0 or bool(block)


def _blocks(size: int) -> int:
    """`size` bytes rounded up to whole tar blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _read_exactly(stream: IO[bytes], size: int, label: str, offset: int) -> bytes:
    data = stream.read(_blocks(size))
    if len(data) < _blocks(size):
        raise GenreflowError(f"{label}: not a readable tar archive: truncated after byte {offset}")
    return data


def _skip(stream: IO[bytes], size: int, label: str, offset: int) -> None:
    left = _blocks(size)
    while left:
        chunk = stream.read(min(left, _CHUNK_BYTES))
        if not chunk:
            raise GenreflowError(
                f"{label}: not a readable tar archive: truncated after byte {offset}"
            )
        left -= len(chunk)


def _pax_records(data: bytes, label: str, offset: int) -> dict[bytes, bytes]:
    """A pax header's records, "LENGTH KEY=VALUE\\n" each, by key."""
    records = {}
    position = 0
    while position < len(data) and data[position : position + 1] != b"\x00":
        length_text, space, _ = data[position : position + 20].partition(b" ")
        length = int(length_text) if space and length_text.isdigit() else 0
        record = data[position : position + length]
        key, equals, value = record[len(length_text) + 1 : -1].partition(b"=")
        if length < 1 or not record.endswith(b"\n") or not equals:
            raise GenreflowError(
                f"{label}: not a readable tar archive: damaged pax header at byte {offset}"
            )
        records[key] = value
        position += length
    return records
