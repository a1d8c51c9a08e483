"""`genreflow pack`: the HDF5 contract, folds, bad inputs, atomic output, the command."""

from __future__ import annotations

import faulthandler
import functools
import multiprocessing
import os
import re
import signal
import threading
from multiprocessing import shared_memory
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile
import soxr
from killable_child import held_pack_worker

from genreflow.audio import (
    SAMPLE_RATE,
    clip_samples,
    float32_to_int16,
    int16_to_float32,
    load_audio,
)
from genreflow.cli import main
from genreflow.data.genres import GENRE_INDEX, GENRES, assign_folds
from genreflow.errors import GenreflowError
from genreflow.features import RowLayout, describe, pack, packing, read_index, workers
from genreflow.features.workers import _Workers, plan_workers, shm_name

CLIP_SECONDS = 3.0
SHA = "0123456789abcdef" * 4


def write_clip(path, seconds: float, freq: float, rate: int = 22050, channels: int = 1):
    t = np.arange(int(round(seconds * rate))) / rate
    x = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    if channels > 1:
        x = np.stack([x] + [np.zeros_like(x)] * (channels - 1), axis=1)
    fmt = "AU" if path.suffix == ".au" else "WAV"
    soundfile.write(path, x, rate, format=fmt, subtype="PCM_16")


def make_dataset(root, clips_per_genre: int = 3, seconds: float = 2.0):
    """The original layout: genres/<genre>/<genre>.000NN.au plus the stray .mf lists."""
    for g, genre in enumerate(GENRES):
        folder = root / "genres" / genre
        folder.mkdir(parents=True)
        for k in range(clips_per_genre):
            write_clip(folder / f"{genre}.{k:05d}.au", seconds, 200.0 + 40 * g + 7 * k)
        (folder / f"{genre}.mf").write_text(f"{genre}.00000.au\t{genre}\n")
    (root / "genres" / "input.mf").write_text("stray list\n")
    return root


def datasets_and_attrs(path):
    with h5py.File(path, "r") as hf:
        data = {name: hf[name][()] for name in hf}
        attrs = {k: v for k, v in hf.attrs.items() if k != "created"}
    return data, attrs


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "dataset")


def test_layout_dtypes_attributes_targets_and_folds(dataset, tmp_path):
    out = tmp_path / "features.h5"
    summary = pack(dataset, out, clip_seconds=CLIP_SECONDS, workers=1, source_sha256=SHA)
    n_samples = clip_samples(CLIP_SECONDS)
    assert summary.path == out and summary.clips == 30 and summary.skipped == []
    assert summary.per_genre == {genre: 3 for genre in GENRES}
    assert summary.seconds > 0 and summary.clips_per_second > 0

    with h5py.File(out, "r") as hf:
        assert set(hf) == {"audio_name", "waveform", "target", "fold", "skipped"}
        names = [n.decode() for n in hf["audio_name"][:]]  # bytes, as the seed stored them
        assert hf["waveform"].dtype == np.int16
        assert hf["waveform"].shape == (30, n_samples)
        assert hf["waveform"].chunks == (1, n_samples)
        assert hf["target"].dtype == np.float32 and hf["target"].shape == (30, 10)
        assert hf["fold"].dtype == np.int32 and hf["fold"].shape == (30,)
        assert hf["skipped"].shape == (0, 2)
        target, fold = hf["target"][:], hf["fold"][:]
        blues0 = hf["waveform"][0]
        attrs = dict(hf.attrs)

    # .mf files are not clips; rows are in sorted name order.
    assert names == sorted(f"{g}.{k:05d}.au" for g in GENRES for k in range(3))
    for name, row in zip(names, target, strict=True):
        expected = np.zeros(10, np.float32)
        expected[GENRE_INDEX[name.split(".")[0]]] = 1.0
        np.testing.assert_array_equal(row, expected)
    # The seed's rule: names sorted, fold = index mod 10 + 1.
    np.testing.assert_array_equal(fold, [i % 10 + 1 for i in range(30)])

    assert attrs["sample_rate"] == SAMPLE_RATE
    assert attrs["clip_samples"] == n_samples
    assert attrs["clip_seconds"] == CLIP_SECONDS
    assert list(attrs["genres"]) == list(GENRES)
    assert attrs["source_sha256"] == SHA
    assert attrs["clips_found"] == 30
    assert attrs["genreflow_version"]
    assert attrs["created"].endswith("+00:00")

    # Content: the decoded, resampled clip, zero-padded from 2 s to 3 s, stored as int16.
    decoded = load_audio(dataset / "genres/blues/blues.00000.au")
    assert len(decoded) == 2 * SAMPLE_RATE
    np.testing.assert_array_equal(blues0[: len(decoded)], float32_to_int16(decoded))
    assert not blues0[len(decoded) :].any()

    names_read, targets, folds, attrs_read = read_index(out)
    assert list(names_read) == names
    np.testing.assert_array_equal(targets, target.argmax(axis=1))
    np.testing.assert_array_equal(folds, fold)
    assert attrs_read["genres"] == list(GENRES) and attrs_read["skipped"] == []

    text = describe(out)
    assert "30 packed of 30 found, 0 skipped" in text
    assert "blues 3" in text and "rock 3" in text and "1: 3" in text and SHA in text


def test_short_clip_padded_long_clip_trimmed_stereo_44k_mixed(dataset, tmp_path):
    # A 1 s and a 4 s clip against 3 s clips, and a stereo 44.1 kHz .wav.
    write_clip(dataset / "genres/jazz/jazz.00000.au", 1.0, 440.0)
    write_clip(dataset / "genres/metal/metal.00001.au", 4.0, 330.0)
    write_clip(dataset / "genres/pop/pop.00099.wav", 2.0, 550.0, rate=44100, channels=2)
    out = tmp_path / "f.h5"
    pack(dataset, out, clip_seconds=CLIP_SECONDS, workers=1, progress=False)
    n_samples = clip_samples(CLIP_SECONDS)
    with h5py.File(out, "r") as hf:
        rows = {n.decode(): i for i, n in enumerate(hf["audio_name"][:])}
        short = hf["waveform"][rows["jazz.00000.au"]]
        long = hf["waveform"][rows["metal.00001.au"]]
        stereo = hf["waveform"][rows["pop.00099.wav"]]

    assert not short[SAMPLE_RATE:].any() and np.abs(short[:SAMPLE_RATE]).max() > 10_000
    full = load_audio(dataset / "genres/metal/metal.00001.au")
    assert len(full) == 4 * SAMPLE_RATE
    np.testing.assert_array_equal(long, float32_to_int16(full[:n_samples]))
    # Mono = the mean of a 0.4 sine and silence; 2 s at 32 kHz, then zeros.
    assert len(stereo) == n_samples and not stereo[2 * SAMPLE_RATE :].any()
    peak = np.abs(int16_to_float32(stereo[1000 : 2 * SAMPLE_RATE - 1000])).max()
    assert peak == pytest.approx(0.2, rel=0.02)
    spectrum = np.abs(np.fft.rfft(int16_to_float32(stereo[: 2 * SAMPLE_RATE])))
    assert abs(np.fft.rfftfreq(2 * SAMPLE_RATE, 1 / SAMPLE_RATE)[spectrum.argmax()] - 550) < 1


def add_bad_files(dataset):
    """A zero-byte file, a truncated one, and a text file with a .wav extension."""
    (dataset / "genres/blues/blues.00003.au").touch()
    good = (dataset / "genres/rock/rock.00000.au").read_bytes()
    (dataset / "genres/disco/disco.00003.au").write_bytes(good[: len(good) // 3])
    (dataset / "genres/jazz/jazz.00054.wav").write_text("<html>404 Not Found</html>\n" * 5)
    return {"blues.00003.au", "disco.00003.au", "jazz.00054.wav"}


def test_bad_files_are_skipped_and_recorded_without_shifting_folds(dataset, tmp_path, capsys):
    bad = add_bad_files(dataset)
    out = tmp_path / "f.h5"
    summary = pack(dataset, out, clip_seconds=1.0, workers=1)
    assert {name for name, _ in summary.skipped} == bad
    reasons = dict(summary.skipped)
    assert "empty file" in reasons["blues.00003.au"]
    assert "truncated" in reasons["disco.00003.au"]
    assert "not a recognised audio format" in reasons["jazz.00054.wav"]

    stderr = capsys.readouterr().err
    for name in bad:
        assert f"skipped {dataset / 'genres'}" in stderr and name in stderr

    names, _, folds, attrs = read_index(out)
    assert summary.clips == len(names) == 30 and bad.isdisjoint(names)
    assert attrs["clips_found"] == 33
    assert sorted(attrs["skipped"]) == sorted(summary.skipped)
    # Folds come from every name found, the unreadable ones included ...
    everything = assign_folds(list(names) + sorted(bad))
    assert folds.tolist() == [everything[n] for n in names]
    # ... which is not what numbering only the readable clips would give.
    assert folds.tolist() != [assign_folds(names)[n] for n in names]
    shown = describe(out)
    assert "3 skipped" in shown and "jazz.00054.wav: unknown or unreadable format" in shown


def test_on_error_fail_stops_and_leaves_no_output(dataset, tmp_path):
    add_bad_files(dataset)
    out = tmp_path / "out" / "f.h5"
    with pytest.raises(GenreflowError, match="blues.00003.au: empty file"):
        pack(dataset, out, clip_seconds=1.0, workers=2, on_error="fail", progress=False)
    # Interrupted part-way: nothing at the output path, and no leftover partial file.
    assert list(out.parent.iterdir()) == []


def test_a_failed_pack_keeps_the_previous_complete_output(dataset, tmp_path):
    out = tmp_path / "f.h5"
    pack(dataset, out, clip_seconds=1.0, workers=1, progress=False)
    before = out.read_bytes()
    add_bad_files(dataset)
    with pytest.raises(GenreflowError):
        pack(dataset, out, clip_seconds=1.0, workers=1, on_error="fail", progress=False)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["f.h5"]


def test_genre_with_nothing_readable_is_an_error(dataset, tmp_path):
    folder = dataset / "genres" / "reggae"
    for clip in folder.glob("*.au"):
        clip.write_bytes(b"")
    out = tmp_path / "f.h5"
    with pytest.raises(
        GenreflowError, match=re.escape(f"no readable clip in genre folder {folder}")
    ):
        pack(dataset, out, clip_seconds=1.0, workers=1, progress=False)
    assert list(tmp_path.glob("f.h5*")) == []


def test_missing_genre_is_an_error(dataset, tmp_path):
    for clip in (dataset / "genres" / "country").iterdir():
        clip.unlink()
    (dataset / "genres" / "country").rmdir()
    with pytest.raises(GenreflowError, match="country: genre folder missing"):
        pack(dataset, tmp_path / "f.h5", clip_seconds=1.0, workers=1, progress=False)


def test_genre_folder_with_only_list_files_is_an_error(dataset, tmp_path):
    for clip in (dataset / "genres" / "hiphop").glob("*.au"):
        clip.unlink()
    with pytest.raises(GenreflowError, match="hiphop: no audio files"):
        pack(dataset, tmp_path / "f.h5", clip_seconds=1.0, workers=1, progress=False)


def test_one_and_two_workers_write_the_same_file(dataset, tmp_path):
    add_bad_files(dataset)
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    pack(dataset, one, clip_seconds=1.0, workers=1, progress=False)
    pack(dataset, two, clip_seconds=1.0, workers=2, progress=False)
    data_one, attrs_one = datasets_and_attrs(one)
    data_two, attrs_two = datasets_and_attrs(two)
    assert data_one.keys() == data_two.keys()
    for name in data_one:
        np.testing.assert_array_equal(data_one[name], data_two[name], err_msg=name)
    assert attrs_one.keys() == attrs_two.keys()
    for key in attrs_one:
        np.testing.assert_array_equal(attrs_one[key], attrs_two[key], err_msg=key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"clip_seconds": 0}, "positive number of seconds"),
        ({"source_sha256": "abc"}, "64 hex digits"),
    ],
)
def test_bad_arguments(dataset, tmp_path, kwargs, message):
    with pytest.raises(GenreflowError, match=message):
        pack(dataset, tmp_path / "f.h5", **{"clip_seconds": 1.0, **kwargs})


def test_read_index_names_what_is_missing(dataset, tmp_path):
    out = tmp_path / "f.h5"
    pack(dataset, out, clip_seconds=1.0, workers=1, progress=False)
    with h5py.File(out, "a") as hf:
        del hf["fold"]
        del hf.attrs["clip_samples"]
    with pytest.raises(GenreflowError, match="missing dataset 'fold', attribute 'clip_samples'"):
        read_index(out)

    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("not hdf5")
    with pytest.raises(GenreflowError, match="not a readable HDF5 file"):
        read_index(not_hdf5)
    with pytest.raises(GenreflowError, match="features file not found"):
        read_index(tmp_path / "absent.h5")


def test_read_index_rejects_inconsistent_shapes(dataset, tmp_path):
    out = tmp_path / "f.h5"
    pack(dataset, out, clip_seconds=1.0, workers=1, progress=False)
    with h5py.File(out, "a") as hf:
        hf["target"][0] = np.ones(10, np.float32)
    with pytest.raises(GenreflowError, match="not one-hot"):
        read_index(out)


def test_command_packs_and_describes(dataset, tmp_path, capsys):
    out = tmp_path / "features.h5"
    argv = ["pack", "--dataset", str(dataset), "--out", str(out), "--clip-seconds", "1"]
    assert main([*argv, "--workers", "1", "--source-sha256", SHA, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "30 packed of 30 found" in printed
    assert "clips/s with 1 worker" in printed and SHA in printed

    add_bad_files(dataset)
    assert main([*argv, "--workers", "1", "--on-error", "fail", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "genreflow pack: error:" in err and "blues.00003.au" in err

    with pytest.raises(SystemExit):
        main([*argv, "--on-error", "ignore"])


def decoded_row(path, n_samples):
    """What a row must hold: the clip decoded, padded or trimmed, in int16."""
    x = load_audio(path)[:n_samples]
    return float32_to_int16(np.pad(x, (0, n_samples - len(x))))


@pytest.mark.parametrize("workers", [1, 2])
def test_every_row_is_its_clip_decoded_when_rows_are_reused(tmp_path, workers):
    # Many more clips than the ring has rows (8), of five lengths, so that rows are reused
    # by shorter clips that must not keep the previous one's tail; a stereo 44.1 kHz .wav.
    root = tmp_path / "dataset"
    for g, genre in enumerate(GENRES):
        folder = root / genre
        folder.mkdir(parents=True)
        for k, seconds in enumerate([1.5, 0.3, 1.2, 0.6, 0.2]):
            write_clip(folder / f"{genre}.{k:05d}.au", seconds, 200.0 + 30 * g + 11 * k)
    write_clip(root / "rock/rock.00009.wav", 0.4, 500.0, rate=44100, channels=2)
    out = tmp_path / "f.h5"
    summary = pack(root, out, clip_seconds=1.0, workers=workers, progress=False)
    assert summary.clips == 51 and summary.workers == workers
    n_samples = clip_samples(1.0)
    with h5py.File(out, "r") as hf:
        names = [n.decode() for n in hf["audio_name"][:]]
        waveform = hf["waveform"][:]
    paths = {p.name: p for p in root.rglob("*.*")}
    for name, row in zip(names, waveform, strict=True):
        np.testing.assert_array_equal(row, decoded_row(paths[name], n_samples), err_msg=name)


def test_float32_to_int16_into_an_array():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.49999, 1.0, 3.0], dtype=np.float32)
    out = np.full(7, 99, dtype=np.int16)
    assert float32_to_int16(x, out=out) is out
    np.testing.assert_array_equal(out, float32_to_int16(x))
    np.testing.assert_array_equal(out, [-32767, -32767, -16383, 0, 16383, 32767, 32767])
    with pytest.raises(ValueError, match="out must be int16"):
        float32_to_int16(x, out=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="out must be int16"):
        float32_to_int16(x, out=np.zeros(6, np.int16))


@pytest.mark.parametrize(
    ("workers", "shm_free", "expected"),
    [
        (2, None, (2, 4)),  # nothing to measure: two tasks in flight per worker
        (2, 1 << 30, (2, 4)),
        (16, 64 << 20, (8, 8)),  # a default Docker /dev/shm: 8 tasks of 3.84 MB in 32 MB
        (4, 24 << 20, (3, 3)),
        (2, 7 << 20, (1, 0)),  # a single task's rows fit: decode in this process
        (1, 1 << 30, (1, 0)),
    ],
)
def test_workers_are_fewer_where_shared_memory_is_small(workers, shm_free, expected):
    assert plan_workers(workers, clip_samples(30.0) * 2, shm_free) == expected


def shm_segments():
    """This process's pack rings in /dev/shm (others' may come and go meanwhile)."""
    return set(Path("/dev/shm").glob(shm_name().rsplit("-", 1)[0] + "-*"))


def pack_workers():
    """pack's worker processes: the children of this process's multiprocessing fork server.
    (Only those: the session's MLflow server is a child of this process too, with workers.)"""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])

    def is_fork_server(pid: int) -> bool:
        try:
            return b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    servers = {p for p, parent in parents.items() if parent == os.getpid() and is_fork_server(p)}
    return [pid for pid, parent in parents.items() if parent in servers]


@pytest.fixture
def watchdog():
    """A hang fails the test session within a minute, with every thread's traceback,
    instead of holding CI until its time is up."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def ring():
    """The shared memory _Workers' processes decode into: 8 rows of 1 s."""
    layout = RowLayout.of("waveform", clip_samples(1.0))
    shm = shared_memory.SharedMemory(create=True, size=8 * layout.nbytes)
    yield (shm.name, 8, layout)
    shm.close()
    shm.unlink()


# What happens to the two workers (pids p) before the writer submits a task to each, and
# after worker 1 has answered its task, while the writer waits for worker 0's answer.
SIGSTOP, SIGKILL = signal.SIGSTOP, signal.SIGKILL
DEATHS = {
    # worker 0 dies before any task was sent: the writer is still submitting
    "before any task": ([(0, SIGKILL)], []),
    # worker 0 is stuck on its task; worker 1, done and idle, dies
    "the idle one, while the other works": ([(0, SIGSTOP)], [(1, SIGKILL)]),
    # worker 0 dies on its task; worker 1, idle, is the survivor that must not be left
    "the busy one, while the other idles": ([(0, SIGSTOP)], [(0, SIGKILL)]),
    "both at once, both idle": ([], [(0, SIGKILL), (1, SIGKILL)]),
}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("case", list(DEATHS))
def test_a_worker_death_ends_every_worker_whatever_the_others_do(case, dataset, ring, watchdog):
    # Python 3.11's ProcessPoolExecutor could miss a surviving worker and wait for it
    # forever (1 run in 20). Each state is set up exactly, ten times over.
    clips = sorted(str(p) for p in dataset.rglob("*.au"))
    before, after = DEATHS[case]
    for _ in range(10):
        pool = _Workers(2, ring)
        try:
            assert len(pack_workers()) == 2
            pids = [p.pid for p in pool._processes]
            with pytest.raises(GenreflowError, match="a decoding worker process died"):
                for worker, sig in before:
                    os.kill(pids[worker], sig)
                # The first task goes to worker 0, the second to worker 1.
                first = pool.submit([(clips[0], 0), (clips[1], 1)])
                second = pool.submit([(clips[2], 2)])
                assert (first, second) == (0, 1)
                assert pool.result(second) == [None]
                for worker, sig in after:
                    os.kill(pids[worker], sig)
                for worker, _ in after:  # dead by now, whatever it had answered before
                    pool._processes[worker].join(timeout=10)
                pool.result(first)
            # Every worker killed and reaped, the survivor included.
            assert pack_workers() == []
        finally:
            pool.close(kill=True)


def test_a_worker_error_is_raised_and_ends_every_worker(dataset, ring, watchdog, tmp_path):
    pool = _Workers(2, ring)
    clip = str(next(dataset.rglob("*.au")))
    try:
        assert pool.result(pool.submit([(clip, 0)])) == [None]
        pool.submit([(clip, 99)])  # a row outside the ring: an IndexError in the worker
        with pytest.raises(GenreflowError, match="IndexError"):
            pool.result(0)
        assert pack_workers() == []
    finally:
        pool.close(kill=True)


# Where the pack is when a worker dies: a worker holds the task of the first clip, of one
# mid-way, or of the last; then the held worker dies, the other one, or both.
HOLD_AT = (0, 101, 199)
KILLED = ("the held one", "the other one", "both")


def kill_when_held(hold, killed: str, pack_done: threading.Event, seen: list) -> None:
    """Wait for a held worker's pid on `hold`, then SIGKILL the workers `killed` names,
    noting (holder, workers found) in `seen`; return if the pack ended first."""
    # Polled (not waited on) so that a pack that ended anyway fails the test, not hangs it.
    while not hold.poll(0.1):
        if pack_done.is_set():
            return
    holder = hold.recv()
    found = pack_workers()
    seen.append((holder, found))
    victims = {
        "the held one": [holder],
        "the other one": [pid for pid in found if pid != holder],
        "both": found,
    }[killed]
    for pid in victims if len(found) == 2 else found:  # else: fail, but end the pack
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_worker_that_dies_stops_the_pack_and_leaves_nothing_behind(
    tmp_path, watchdog, monkeypatch
):
    # A worker holds its task until the kill: the pack is provably mid-work when it lands
    # (killed after a delay instead, a pack on a busy machine sometimes finished first).
    root = tmp_path / "dataset"
    for g, genre in enumerate(GENRES):
        folder = root / genre
        folder.mkdir(parents=True)
        write_clip(folder / f"{genre}.00000.au", 2.0, 300.0 + 20 * g)
        for k in range(1, 20):
            (folder / f"{genre}.{k:05d}.au").hardlink_to(folder / f"{genre}.00000.au")
    clips = sorted(str(p) for p in root.rglob("*.au"))  # pack's order
    segments_before = shm_segments()
    out = tmp_path / "out" / "f.h5"
    for hold_at in HOLD_AT:
        for killed in KILLED:
            case = f"held at clip {hold_at}, {killed} killed"
            # The watchdog's minute is per pack: ten on a busy machine take longer.
            faulthandler.dump_traceback_later(60, exit=True)
            ours, theirs = multiprocessing.Pipe()
            pack_done, seen = threading.Event(), []
            killer = threading.Thread(target=kill_when_held, args=(ours, killed, pack_done, seen))
            with monkeypatch.context() as patch:
                held = functools.partial(held_pack_worker, theirs, clips[hold_at])
                patch.setattr(workers, "_serve", held)
                killer.start()
                try:
                    with pytest.raises(GenreflowError, match="a decoding worker process died"):
                        pack(root, out, clip_seconds=2.0, workers=2, progress=False)
                finally:
                    pack_done.set()
                    killer.join()
                    ours.close()
                    theirs.close()
            ((holder, found),) = seen
            assert holder in found and len(found) == 2, f"{case}: workers {found}"
            assert pack_workers() == [], f"{case}: a worker outlived the pack"
            assert list(out.parent.iterdir()) == [], case
            assert shm_segments() <= segments_before, case

    # The next pack starts new workers and succeeds.
    faulthandler.dump_traceback_later(60, exit=True)
    summary = pack(root, out, clip_seconds=1.0, workers=2, progress=False)
    assert summary.clips == 200 and out.is_file()
    assert shm_segments() <= segments_before
    assert pack_workers() == []


def test_writeback_as_it_goes_keeps_the_file_intact(dataset, tmp_path, monkeypatch):
    # Start writeback after every row: the output is the same as with none at all.
    plain, synced = tmp_path / "plain.h5", tmp_path / "synced.h5"
    pack(dataset, plain, clip_seconds=1.0, workers=2, progress=False)
    monkeypatch.setattr(packing, "WRITEBACK_BYTES", 1)
    pack(dataset, synced, clip_seconds=1.0, workers=2, progress=False)
    data_plain, _ = datasets_and_attrs(plain)
    data_synced, _ = datasets_and_attrs(synced)
    for name in data_plain:
        np.testing.assert_array_equal(data_plain[name], data_synced[name], err_msg=name)


@pytest.mark.parametrize(("suffix", "channels"), [(".au", 1), (".wav", 2)])
def test_16_bit_pcm_decodes_to_the_floats_libsndfile_gives(tmp_path, suffix, channels):
    # pack's decoder reads 16-bit PCM as integers and scales them itself: every value,
    # the extremes included, must come out as libsndfile's float conversion has it.
    rng = np.random.default_rng(3)
    samples = rng.integers(-32768, 32768, size=(22050, channels), dtype=np.int16)
    samples[:2] = [[-32768] * channels, [32767] * channels]
    path = tmp_path / f"pop.00001{suffix}"
    soundfile.write(path, samples, 22050, subtype="PCM_16")
    floats = soundfile.read(path, dtype="float32", always_2d=True)[0]
    assert soundfile.info(path).subtype == "PCM_16" and floats.min() == -1.0
    mono = floats[:, 0] if channels == 1 else floats.mean(axis=1, dtype=np.float32)
    expected = soxr.resample(np.ascontiguousarray(mono), 22050, SAMPLE_RATE, quality="HQ")
    np.testing.assert_array_equal(load_audio(path), expected)


def test_read_index_refuses_float_waveforms(dataset, tmp_path):
    out = tmp_path / "f.h5"
    pack(dataset, out, clip_seconds=1.0, workers=1, progress=False)
    with h5py.File(out, "a") as hf:
        clips = hf["waveform"][:]
        del hf["waveform"]
        hf.create_dataset("waveform", data=clips.astype(np.float32) / 32767.0)
    with pytest.raises(GenreflowError, match=r"f\.h5: waveform is float32, expected int16"):
        read_index(out)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (b"\xffblues.00000.au", "row 2: not UTF-8 text (invalid start byte at byte 0)"),
        (b"", "row 2: '' is empty (expected a clip's file name, e.g. blues.00000.au)"),
        (
            b"../../etc/passwd.au",
            "row 2: '../../etc/passwd.au' is a path, not a file name (expected a clip's "
            "file name, e.g. blues.00000.au)",
        ),
        (
            b"notes.txt",
            "row 2: 'notes.txt' does not end in .aif, .aiff, .au, .flac, .mp3, .ogg, .wav "
            "(expected a clip's file name, e.g. blues.00000.au)",
        ),
        (b"blues.00000.au", "row 2: 'blues.00000.au' already names row 0"),
    ],
)
def test_read_index_names_the_row_of_a_malformed_audio_name(dataset, tmp_path, name, problem):
    out = tmp_path / "f.h5"
    pack(dataset, out, clip_seconds=1.0, workers=1, progress=False)
    with h5py.File(out, "a") as hf:
        names = hf["audio_name"][:].tolist()
        names[2] = name
        del hf["audio_name"]
        hf.create_dataset(
            "audio_name", data=np.array(names, dtype=object), dtype=h5py.string_dtype()
        )
    with pytest.raises(GenreflowError) as err:
        read_index(out)
    assert str(err.value) == f"{out}: audio_name {problem}"


def test_read_index_refuses_audio_name_that_is_not_text(dataset, tmp_path):
    out = tmp_path / "f.h5"
    pack(dataset, out, clip_seconds=1.0, workers=1, progress=False)
    with h5py.File(out, "a") as hf:
        n = len(hf["audio_name"])
        del hf["audio_name"]
        hf.create_dataset("audio_name", data=np.arange(n))
    with pytest.raises(GenreflowError, match="audio_name is int64 of shape .*expected one UTF-8"):
        read_index(out)
