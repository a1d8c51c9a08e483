"""Fetch, verify and safely extract a GTZAN archive: the pipeline's first step.

The archive is untrusted input: genreflow.data.extract checks every member and header
before anything is written, into a temporary folder inside ``out`` that is moved into place
only when it completed and holds a GTZAN layout; a marker file written last makes a second
run over a verified result a no-op. A run killed at any point leaves either the old state
or one the next run repairs: a journal, written before anything in ``out`` changes, names
every entry the install may leave behind, and staging folders of killed runs are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from genreflow import __version__, storage
from genreflow.atomic import fsync_path, move_into_place, write_text_atomic
from genreflow.data.extract import EXTRACT_PREFIX, extract_to_staging
from genreflow.data.genres import GENRES
from genreflow.data.layout import AUDIO_SUFFIXES, find_dataset_root
from genreflow.errors import ChecksumMismatch, GenreflowError
from genreflow.locks import locked

# The original release, genres.tar.gz (about 1.2 GB). Its official address has been dead
# since 2022 (pytorch/audio#2763, mir-dataset-loaders/mirdata#549 and #659), but copies of
# the archive are still about, so its checksums identify it wherever it comes from: the
# SHA-256 is the one torchaudio's GTZAN module carries for it (pytorch/audio,
# torchaudio/datasets/gtzan.py, _CHECKSUMS), the MD5 the one mirdata's loader lists
# (mirdata/datasets/gtzan_genre.py, REMOTES["all"]).
ORIGINAL_ARCHIVE = "genres.tar.gz"
ORIGINAL_CHECKSUMS = {
    "sha256": "24347e0223d2ba798e0a558c4c172d9d4a19c00bb7963fe055d183dadb4ef2c6",
    "md5": "5b3d6dddb579ab49814ab86dba69e7c7",
}
# Given as the checksum (--sha256 original), it stands for ORIGINAL_CHECKSUMS: the archive,
# from any source, must be a byte-for-byte copy of the original release.
ORIGINAL = "original"
OFFICIAL_URL = "http://opihi.cs.uvic.ca/sound/genres.tar.gz"
KNOWN_CHECKSUMS: dict[str, dict[str, str]] = {
    OFFICIAL_URL: ORIGINAL_CHECKSUMS,
    "https://opihi.cs.uvic.ca/sound/genres.tar.gz": ORIGINAL_CHECKSUMS,
}

# Where GTZAN can be had now. The Hub address is the form Hugging Face serves a dataset
# repository's file at (/datasets/OWNER/NAME/resolve/REVISION/PATH), as public download
# scripts use it for this file; it was not reachable from where this was written, so
# whether it is byte-identical to the original is for --sha256 original to say.
HF_COPY_URL = "https://huggingface.co/datasets/marsyas/gtzan/resolve/main/data/genres.tar.gz"
KAGGLE_PAGE = (
    "https://www.kaggle.com/datasets/andradaolteanu/gtzan-dataset-music-genre-classification"
)
SOURCES = (
    f"a copy of the original genres.tar.gz, e.g. {HF_COPY_URL}, with --sha256 {ORIGINAL} "
    "(checked against the original's checksums)",
    f"the Kaggle copy's zip as downloaded ({KAGGLE_PAGE}; its unreadable "
    "jazz.00054.wav is skipped), with --sha256 of your download",
    "or a folder where either is already extracted",
)


def sources_hint() -> str:
    """The sources above as one line, for an error message."""
    return "; ".join(SOURCES)


MARKER_NAME = ".genreflow-download.json"
# Written before an install changes anything in out/, removed once the marker is written:
# the entries it names are this step's own, whatever state a kill left them in.
JOURNAL_NAME = ".genreflow-download.installing.json"
DOWNLOAD_DIR = ".download"


def expected_checksums(
    source: str, sha256: str | None = None, md5: str | None = None
) -> tuple[str | None, str | None]:
    """The checksums to verify ``source`` against: the user's, else the built-in ones.

    ``original`` for either checksum stands for the original release's (ORIGINAL_CHECKSUMS).
    """
    if ORIGINAL in (_keyword(sha256), _keyword(md5)):
        return ORIGINAL_CHECKSUMS["sha256"], ORIGINAL_CHECKSUMS["md5"]
    sha256 = storage.normalize_checksum(sha256, "sha256")
    md5 = storage.normalize_checksum(md5, "md5")
    if sha256 is None and md5 is None:
        known = KNOWN_CHECKSUMS.get(str(source), {})
        return known.get("sha256"), known.get("md5")
    return sha256, md5


def _keyword(value: str | None) -> str | None:
    return value.strip().lower() if value else None


def count_clips(root: str | Path) -> dict[str, int]:
    """Audio files per genre folder under a dataset root (0 for a missing genre)."""
    root = Path(root)
    counts = {}
    for genre in GENRES:
        folder = root / genre
        counts[genre] = (
            sum(1 for f in folder.iterdir() if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
            if folder.is_dir()
            else 0
        )
    return counts


def download(
    source: str | Path,
    out: str | Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch, verify and extract a GTZAN archive into ``out``; return the dataset root.

    Args:
        source: an http(s):// URL, gs://bucket/object, file:// URI or local path to an
            archive (.tar.gz, .tgz, .tar, .zip), or a folder that is already extracted
            (validated and returned as it is; nothing is copied).
        out: the folder that receives the extracted tree.
        sha256: expected SHA-256 of the archive, or ``original``: a copy of the original
            genres.tar.gz, checked against its built-in SHA-256 and MD5.
        md5: expected MD5 of the archive. For the official release URL the original's
            checksums are built in; for any other source without a checksum, the
            archive's SHA-256 is printed so that it can be pinned.
        progress: report progress on stderr (a bar on a terminal, else a line at intervals).

    Returns:
        The folder that holds the genre folders (``out/genres`` for the original release,
        ``out/genres_original`` for the common .wav copy).

    Raises:
        GenreflowError: unreachable or missing source, checksum mismatch (nothing is
            extracted), unsafe or corrupt archive, no GTZAN layout inside, or a name in
            ``out`` that the archive would overwrite but this step did not create.
    """
    source = str(source)
    out = Path(out)
    path = storage.local_path(source)
    if path is not None and path.is_dir():
        if sha256 or md5:
            raise GenreflowError(
                f"{path}: is a folder; a checksum (--sha256/--md5) can only verify an archive"
            )
        root = find_dataset_root(path)
        print(f"{path}: already extracted; using it in place (nothing copied)", file=sys.stderr)
        return root
    if path is not None and not path.exists():
        raise GenreflowError(f"{path}: no such file or folder")

    sha256, md5 = expected_checksums(source, sha256, md5)
    out.mkdir(parents=True, exist_ok=True)
    # Two runs downloading into one folder take turns: the second finds the first's result.
    with locked(out, what=str(out), wait=True):
        return _download_into(source, path, out, sha256, md5, progress)


def _download_into(
    source: str, path: Path | None, out: Path, sha256: str | None, md5: str | None, progress: bool
) -> Path:
    shown = storage.redacted(source)
    # A remote source is known by its hash: the marker must not keep a signed URL's query.
    source_key = (
        path.resolve().as_uri()
        if path is not None
        else "sha256:" + hashlib.sha256(source.encode()).hexdigest()
    )
    _clean_stale(out)
    previous = _read_marker(out)
    name = storage.file_name_of(source) or "archive"
    root = _previous_result(out, previous, source_key, sha256, md5)
    if root is not None:
        if path is None:  # left by a run killed between its marker and this cleanup
            _archive_path(source, out, name).unlink(missing_ok=True)
            _remove_if_empty(out / DOWNLOAD_DIR)
        print(
            f"{out}: already holds the verified download of {shown}; nothing to do",
            file=sys.stderr,
        )
        return root

    try:
        if path is None:
            archive, actual = _fetch_archive(source, out, name, sha256, md5, progress)
        else:
            archive = path
            actual = storage.verify(path, sha256=sha256, md5=md5, label=source)
    except ChecksumMismatch as exc:
        if sha256 != ORIGINAL_CHECKSUMS["sha256"]:
            raise
        raise ChecksumMismatch(
            f"{exc}: not a copy of the original {ORIGINAL_ARCHIVE} (damaged, altered or "
            "another archive; to use it anyway, pin its own --sha256)"
        ) from exc
    if sha256 is None and md5 is None:
        if actual["sha256"] == ORIGINAL_CHECKSUMS["sha256"]:
            print(f"{shown}: the original {ORIGINAL_ARCHIVE} (its checksums)", file=sys.stderr)
        else:
            print(
                f"{shown}: sha256 {actual['sha256']} (no checksum given; "
                f"pass --sha256 {actual['sha256']} to pin this archive)",
                file=sys.stderr,
            )

    label = f"{shown} ({name})" if path is None else source
    staging = extract_to_staging(archive, out, label)
    try:
        root_rel = find_dataset_root(staging).relative_to(staging)
    except GenreflowError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise GenreflowError(f"{label}: the archive holds no GTZAN genre folders") from exc
    entries = _install(staging, out, _our_entries(out, previous), label)

    files, size = _tree_stats(out, entries)
    _write_marker(
        out,
        {
            "source": shown,
            "source_key": source_key,
            "sha256": actual["sha256"],
            "md5": actual["md5"],
            "archive": name,
            "root": root_rel.as_posix(),
            "entries": entries,
            "files": files,
            "bytes": size,
            "genreflow": __version__,
        },
    )
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    if path is None:
        # The extracted tree and the marker's checksums are what the next steps use.
        archive.unlink(missing_ok=True)
        _remove_if_empty(out / DOWNLOAD_DIR)
    return out / root_rel


# --- fetching ----------------------------------------------------------------------------
def _archive_path(source: str, out: Path, name: str) -> Path:
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    return out / DOWNLOAD_DIR / f"{key}-{name}"


def _fetch_archive(
    source: str, out: Path, name: str, sha256: str | None, md5: str | None, progress: bool
) -> tuple[Path, dict[str, str]]:
    """Download into out/.download/, keyed by the source so a .part only resumes itself."""
    archive = _archive_path(source, out, name)
    if archive.is_file():
        # A verified archive left by a run that failed later (e.g. a name clash in out).
        try:
            actual = storage.verify(archive, sha256=sha256, md5=md5, label=str(archive))
            print(f"{archive}: reusing the archive already downloaded", file=sys.stderr)
            return archive, actual
        except GenreflowError as exc:
            print(f"{exc}; downloading again", file=sys.stderr)
            archive.unlink()
    try:
        storage.fetch(source, archive, sha256=sha256, md5=md5, progress=progress)
    except GenreflowError:
        _remove_if_empty(archive.parent)  # a .part worth resuming stays
        raise
    return archive, storage.digests(archive)


# --- putting the tree in place -----------------------------------------------------------
def _clean_stale(out: Path) -> None:
    """Remove what a killed run left in ``out`` (the caller holds its lock, so no other run
    is at work there): staging folders, the marker's and the journal's half-written
    temporary files, and a journal that a marker has made moot (the marker is removed
    before the first change and written after the last)."""
    for stale in out.glob(f"{EXTRACT_PREFIX}*"):
        print(f"{stale}: left by an interrupted extraction; removing it", file=sys.stderr)
        shutil.rmtree(stale)
    for name in (MARKER_NAME, JOURNAL_NAME):  # atomic.write_text_atomic's temporary names
        for stale in out.glob(f".{name}.*.tmp"):
            stale.unlink()
    if (out / MARKER_NAME).is_file():
        (out / JOURNAL_NAME).unlink(missing_ok=True)


def _our_entries(out: Path, previous: dict | None) -> set[str]:
    """The entries of ``out`` that genreflow download put there: the marker's, and those
    of an install that was interrupted (its journal)."""
    ours = set(previous.get("entries", [])) if previous else set()
    journal = out / JOURNAL_NAME
    if journal.is_file():
        try:
            ours.update(json.loads(journal.read_text())["entries"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GenreflowError(
                f"{journal}: unreadable install journal ({type(exc).__name__}); delete it "
                "and the entries it listed to download again"
            ) from exc
    return ours


def _install(staging: Path, out: Path, ours: set[str], label: str) -> list[str]:
    """Move the staged top-level entries into ``out``, replacing only our own earlier ones."""
    entries = sorted(p.name for p in staging.iterdir())
    bookkeeping = (MARKER_NAME, JOURNAL_NAME, DOWNLOAD_DIR)
    try:
        for entry in entries:
            if entry in bookkeeping or entry.startswith(EXTRACT_PREFIX):
                raise GenreflowError(
                    f"{label}: archive member {entry!r} clashes with genreflow's own "
                    f"bookkeeping in {out}"
                )
            target = out / entry
            if (target.exists() or target.is_symlink()) and entry not in ours:
                raise GenreflowError(
                    f"{target}: already exists and was not extracted by genreflow download; "
                    "remove it or choose another --out"
                )
    except GenreflowError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # From here the old result is being replaced. The journal first: every name this
    # install may leave behind, for the next run to clear; then the old marker goes, so
    # that none vouches for a half-replaced tree.
    write_text_atomic(out / JOURNAL_NAME, json.dumps({"entries": sorted(ours | set(entries))}))
    (out / MARKER_NAME).unlink(missing_ok=True)
    fsync_path(out)
    for entry in ours:
        _remove(out / entry)
    for entry in entries:
        move_into_place(staging / entry, out / entry)
    staging.rmdir()
    return entries


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (a .part of another source) or already gone: both fine


# --- the marker --------------------------------------------------------------------------
def _tree_stats(out: Path, entries: list[str]) -> tuple[int, int]:
    """Number of files and total bytes under the given top-level entries of ``out``."""
    files = size = 0
    for entry in entries:
        top = out / entry
        if top.is_file():
            files, size = files + 1, size + top.stat().st_size
            continue
        for folder, _, names in os.walk(top):
            for file_name in names:
                files += 1
                size += os.lstat(os.path.join(folder, file_name)).st_size
    return files, size


def recorded_sha256(out: str | Path) -> str | None:
    """The SHA-256 of the archive a finished download of `out` came from, if it says."""
    marker = _read_marker(Path(out))
    return marker.get("sha256") if marker else None


def _read_marker(out: Path) -> dict | None:
    marker = out / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise GenreflowError(
            f"{marker}: unreadable download marker ({exc}); delete it to download again"
        ) from exc
    return data if isinstance(data, dict) else None


def _write_marker(out: Path, record: dict) -> None:
    write_text_atomic(out / MARKER_NAME, json.dumps(record, indent=2) + "\n")


def _previous_result(
    out: Path, previous: dict | None, source_key: str, sha256: str | None, md5: str | None
) -> Path | None:
    """The dataset root of an earlier run that matches this request and is intact, else None."""
    if previous is None:
        return None
    if previous.get("source_key") != source_key:
        print(
            f"{out}: holds a download of {previous.get('source')}; replacing it with this source",
            file=sys.stderr,
        )
        return None
    if (sha256 and previous.get("sha256") != sha256) or (md5 and previous.get("md5") != md5):
        print(f"{out}: earlier download has other checksums; downloading again", file=sys.stderr)
        return None
    entries = previous.get("entries", [])
    stats = _tree_stats(out, entries)
    if stats != (previous.get("files"), previous.get("bytes")):
        print(
            f"{out}: extracted tree changed since it was verified "
            f"({previous.get('files')} files expected, {stats[0]} found); extracting again",
            file=sys.stderr,
        )
        return None
    root = out / previous.get("root", "")
    return root if root.is_dir() else None
