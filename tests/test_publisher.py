"""The background publisher (genreflow.publisher) against a real GCS emulator: snapshots
that later writes cannot change, the newest snapshot winning, retries, failures raised at
the end, and nothing done for a local folder.

Where a test needs an upload held in flight, or a first try to fail, the folder's real
upload is wrapped (GatedFolder): the bytes still go to the emulator through
genreflow.storage; only when they go is decided by the test, with events, never sleeps.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from genreflow import storage
from genreflow.atomic import write_atomic
from genreflow.errors import GenreflowError
from genreflow.publisher import SNAPSHOTS, Publisher
from genreflow.storage import OutputFolder


@pytest.fixture
def bucket(emulator, monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "genreflow-test")
    monkeypatch.setenv("GENREFLOW_CACHE", str(tmp_path / "cache"))
    name = f"publisher-{uuid.uuid4().hex[:12]}"
    storage.gcs_client().create_bucket(name)
    return name


def remote(bucket: str, name: str) -> bytes:
    return storage.gcs_client().bucket(bucket).blob(name).download_as_bytes()


def write(folder: OutputFolder, name: str, data: bytes) -> None:
    """As genreflow writes every checkpoint: a temporary file renamed into place."""
    write_atomic(folder.path / name, lambda f: f.write(data))


class GatedFolder(OutputFolder):
    """An OutputFolder whose uploads (real ones) wait for `gate`, after setting `entered`;
    `fail_first` makes the first try raise that exception before anything is sent."""

    def __init__(self, *args, fail_first: BaseException | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate, self.entered = threading.Event(), threading.Event()
        self.tries = 0
        self.fail_first = fail_first
        self.sent: list[str] = []

    def publish_file(self, name: str, local: Path) -> int:
        self.tries += 1
        self.sent.append(name)
        self.entered.set()
        self.gate.wait(timeout=60)
        if self.fail_first is not None and self.tries == 1:
            raise self.fail_first
        return super().publish_file(name, local)


def gated(folder: OutputFolder, **kwargs) -> GatedFolder:
    return GatedFolder(folder.path, folder.uri, folder.generations, **kwargs)


def test_a_snapshot_is_uploaded_as_it_was_when_submitted(bucket):
    uri = f"gs://{bucket}/fold"
    with storage.output_folder(uri, commit="summary.json") as opened:
        folder = gated(opened)
        write(folder, "resume.pt", b"state at iteration 200")
        with Publisher(folder) as publisher:
            publisher.submit("resume.pt")
            # Training goes on and writes the next state before the upload is sent.
            write(folder, "resume.pt", b"state at iteration 400, not yet submitted")
            folder.gate.set()
            publisher.close()
        assert remote(bucket, "fold/resume.pt") == b"state at iteration 200"
        assert publisher.stats.files == 1 and publisher.stats.bytes == 22
        assert not (folder.path / SNAPSHOTS).exists()  # the snapshots go with the publisher
        opened.generations = folder.generations  # the end's publish replaces what went up
    assert remote(bucket, "fold/resume.pt") == b"state at iteration 400, not yet submitted"


def test_the_newest_snapshot_wins_and_the_commit_point_goes_last(bucket):
    with storage.output_folder(f"gs://{bucket}/fold") as opened:
        folder = gated(opened)
        write(folder, "best.pth", b"best 200")
        write(folder, "resume.pt", b"resume 200")
        with Publisher(folder) as publisher:
            publisher.submit("best.pth", "resume.pt")
            assert folder.entered.wait(timeout=60)  # best 200 is in flight, resume 200 waits
            write(folder, "resume.pt", b"resume 400")
            publisher.submit("resume.pt")  # replaces resume 200 before it went
            write(folder, "best.pth", b"best 600")
            write(folder, "resume.pt", b"resume 600")
            publisher.submit("best.pth", "resume.pt")  # replaces resume 400
            folder.gate.set()
            publisher.close()
        stats = publisher.stats
        assert (stats.files, stats.dropped, stats.failed) == (3, 2, 0)
        assert folder.sent == ["best.pth", "best.pth", "resume.pt"]
        assert remote(bucket, "fold/best.pth") == b"best 600"
        assert remote(bucket, "fold/resume.pt") == b"resume 600"
        opened.generations = folder.generations


def test_a_transient_failure_is_retried(bucket, capsys):
    with storage.output_folder(f"gs://{bucket}/fold") as opened:
        folder = gated(opened, fail_first=ConnectionResetError(104, "Connection reset by peer"))
        folder.gate.set()
        write(folder, "resume.pt", b"state")
        with Publisher(folder, first_delay=0.01) as publisher:
            publisher.submit("resume.pt")
        assert folder.tries == 2 and publisher.stats.failed == 0
        assert remote(bucket, "fold/resume.pt") == b"state"
        assert "ConnectionResetError" in capsys.readouterr().err
        opened.generations = folder.generations


def test_a_failure_that_remains_is_raised_at_the_end(bucket, capsys):
    uri = f"gs://{bucket}/fold"
    with pytest.raises(GenreflowError, match="no such object or bucket"):
        with storage.output_folder(uri) as folder:
            # The bucket goes while the fold trains: a 404, not transient, and training is
            # not interrupted by it; the end is.
            storage.gcs_client().bucket(bucket).delete()
            write(folder, "resume.pt", b"ours")
            publisher = Publisher(folder)
            publisher.submit("resume.pt")
            try:
                publisher.close()
            finally:
                assert (publisher.stats.failed, publisher.stats.files) == (1, 0)
    assert "upload of resume.pt failed" in capsys.readouterr().err


def test_the_commit_point_never_follows_a_file_that_failed(bucket, capsys):
    # best.pth fails for good: the resume.pt submitted with it, which vouches for that
    # best.pth, must not go up beside the older best.pth still in the bucket.
    with storage.output_folder(f"gs://{bucket}/fold") as opened:
        folder = gated(opened, fail_first=PermissionError(13, "Permission denied"))
        folder.gate.set()
        write(folder, "best.pth", b"best 200")
        write(folder, "resume.pt", b"resume 200")
        publisher = Publisher(folder)
        publisher.submit("best.pth", "resume.pt")
        with pytest.raises(PermissionError):
            publisher.close()
        assert folder.sent == ["best.pth"]  # resume.pt never tried
        assert (publisher.stats.failed, publisher.stats.dropped, publisher.stats.files) == (1, 1, 0)
        said = capsys.readouterr().err
        assert "resume.pt not uploaded: a file submitted before it failed" in said
        assert not storage.gcs_client().bucket(bucket).blob("fold/resume.pt").exists()
        opened.generations = folder.generations


def test_a_newer_upload_makes_an_older_failure_moot(bucket):
    with storage.output_folder(f"gs://{bucket}/fold") as opened:
        folder = gated(opened, fail_first=GenreflowError("refused"))  # not transient
        write(folder, "resume.pt", b"200")
        with Publisher(folder) as publisher:
            publisher.submit("resume.pt")
            assert folder.entered.wait(timeout=60)  # 200 in flight: it will fail
            write(folder, "resume.pt", b"400")
            publisher.submit("resume.pt")
            folder.gate.set()
        # close() raised nothing: the newest resume.pt is up.
        assert (publisher.stats.failed, publisher.stats.files) == (1, 1)
        assert remote(bucket, "fold/resume.pt") == b"400"
        opened.generations = folder.generations


def test_abort_drops_what_waits_and_raises_nothing(bucket):
    with storage.output_folder(f"gs://{bucket}/fold") as opened:
        folder = gated(opened)
        write(folder, "a.pt", b"a")
        write(folder, "b.pt", b"b")
        with pytest.raises(RuntimeError, match="training failed"):
            with Publisher(folder) as publisher:
                publisher.submit("a.pt", "b.pt")
                assert folder.entered.wait(timeout=60)
                folder.gate.set()
                raise RuntimeError("training failed")
        assert publisher.stats.dropped + publisher.stats.files == 2
        assert not (folder.path / SNAPSHOTS).exists()
        opened.generations = folder.generations
        for name in ("a.pt", "b.pt"):
            (folder.path / name).unlink()


def test_a_local_folder_needs_no_thread(tmp_path):
    folder = OutputFolder(tmp_path)
    (tmp_path / "resume.pt").write_bytes(b"state")
    with Publisher(folder) as publisher:
        publisher.submit("resume.pt")
    assert publisher.stats.files == 0 and not (tmp_path / SNAPSHOTS).exists()
