"""Decoding, mono mixing, resampling, pad/trim and the int16 storage form."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile
from crafted_audio import flac_claiming, huge_rate_wav, one_hz_wav, silent_flac, truncated_wav

from genreflow.audio import (
    SAMPLE_RATE,
    AudioDecodeError,
    clip_samples,
    fit_length,
    float32_to_int16,
    int16_to_float32,
    load_audio,
    load_clip,
    load_segments,
)
from genreflow.errors import GenreflowError


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def write_au(path, x: np.ndarray, rate: int = 22050) -> None:
    soundfile.write(path, x, rate, format="AU", subtype="PCM_16")


def test_au_22050_is_resampled_to_32k_keeping_its_pitch(tmp_path):
    path = tmp_path / "blues.00000.au"
    write_au(path, sine(440.0, 2.0, 22050))
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) == 2 * SAMPLE_RATE
    assert abs(peak_hz(x, SAMPLE_RATE) - 440.0) < 1.0
    # Level kept: a 0.5 sine has RMS 0.354 (away from the edges the filter touches).
    assert np.sqrt(np.mean(x[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # audioread's stdlib imports
def test_matches_the_seeds_librosa_load(tmp_path):
    path = tmp_path / "jazz.00001.au"
    rng = np.random.default_rng(1)
    write_au(path, (0.2 * rng.standard_normal(22050)).astype(np.float32))
    ours = load_audio(path)
    seeds = librosa.load(path, sr=SAMPLE_RATE)[0]
    assert ours.shape == seeds.shape
    np.testing.assert_allclose(ours, seeds, atol=1e-6)


def test_stereo_44k_wav_is_mixed_to_mono_and_resampled(tmp_path):
    path = tmp_path / "rock.00003.wav"
    left = sine(440.0, 1.0, 44100)
    right = np.zeros_like(left)
    soundfile.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    x = load_audio(path)
    assert x.ndim == 1 and len(x) == SAMPLE_RATE
    assert abs(peak_hz(x, SAMPLE_RATE) - 440.0) < 1.0
    # The average of a 0.5 sine and silence is a 0.25 sine.
    assert np.abs(x[1000:-1000]).max() == pytest.approx(0.25, rel=0.01)


def test_32k_input_is_passed_through_unchanged(tmp_path):
    path = tmp_path / "pop.00000.wav"
    x = sine(1000.0, 0.5, SAMPLE_RATE)
    soundfile.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path), x)


def test_flac_decodes(tmp_path):
    path = tmp_path / "metal.00000.flac"
    soundfile.write(path, sine(300.0, 1.0, 22050), 22050)
    assert abs(peak_hz(load_audio(path), SAMPLE_RATE) - 300.0) < 1.5


def test_content_wins_over_extension(tmp_path):
    # A real WAV named .au decodes by its header: the content decides, not the name.
    path = tmp_path / "disco.00000.au"
    soundfile.write(path, sine(500.0, 1.0, 22050), 22050, format="WAV", subtype="PCM_16")
    assert len(load_audio(path)) == SAMPLE_RATE


def test_zero_byte_file_is_an_error(tmp_path):
    path = tmp_path / "blues.00001.au"
    path.touch()
    with pytest.raises(AudioDecodeError, match="empty file") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(AudioDecodeError, match="cannot read"):
        load_audio(tmp_path / "nope.wav")


@pytest.mark.parametrize("suffix", [".wav", ".au"])
def test_text_file_with_an_audio_extension_is_an_error(tmp_path, suffix):
    # libsndfile would read a headerless .au as raw u-law noise; it must fail instead.
    path = tmp_path / f"jazz.00054{suffix}"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert "not a recognised audio format" in info.value.reason or "no audio header" in (
        info.value.reason
    )


@pytest.mark.parametrize(
    ("fmt", "cut", "expected"),
    [
        ("AU", 3, "header"),  # not even the magic number: raw u-law to libsndfile
        ("AU", 12, "header"),  # the 24-byte header cut short
        ("WAV", 30, "header"),  # no data chunk left
        ("AU", 0.5, "truncated"),  # half the samples missing
        ("WAV", 0.5, "truncated"),
    ],
)
def test_truncated_file_is_an_error(tmp_path, fmt, cut, expected):
    full = tmp_path / f"full.{fmt.lower()}"
    soundfile.write(full, sine(440.0, 1.0, 22050), 22050, format=fmt, subtype="PCM_16")
    data = full.read_bytes()
    path = tmp_path / f"country.00007.{fmt.lower()}"
    path.write_bytes(data[: int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(AudioDecodeError, match=expected):
        load_audio(path)


def test_truncated_flac_is_an_error(tmp_path):
    full = tmp_path / "full.flac"
    soundfile.write(full, np.random.default_rng(0).uniform(-0.5, 0.5, 22050), 22050)
    path = tmp_path / "hiphop.00002.flac"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(AudioDecodeError):
        load_audio(path)


def test_file_without_samples_is_an_error(tmp_path):
    path = tmp_path / "reggae.00000.wav"
    soundfile.write(path, np.zeros(0, np.float32), 22050, subtype="PCM_16")
    with pytest.raises(AudioDecodeError, match="no samples"):
        load_audio(path)


def test_non_finite_samples_are_an_error(tmp_path):
    path = tmp_path / "reggae.00001.wav"
    x = sine(440.0, 0.1, 22050)
    x[10] = np.nan
    soundfile.write(path, x, 22050, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="NaN"):
        load_audio(path)


def test_a_file_is_decoded_only_by_the_decoder_its_first_bytes_name(tmp_path):
    # A truncated WAV without a suffix (as a served row is written): libsndfile refuses it,
    # and nothing else gets a try (audioread's wave-module backend would accept it).
    row = tmp_path / "row-0"
    row.write_bytes(truncated_wav())
    with pytest.raises(AudioDecodeError, match=r"row-0: truncated: the header declares 44100"):
        load_audio(row)
    # Bytes no format opens with: refused whatever the name says, no decoder tried.
    for name in ("blues.00009.xyz", "blues.00010.mp3", "row-1"):
        (tmp_path / name).write_bytes(b"\x01\x02garbage" * 50)
        with pytest.raises(AudioDecodeError) as info:
            load_audio(tmp_path / name)
        assert info.value.reason.startswith("unknown or unreadable format: not a recognised")
        assert "audioread" not in info.value.reason and "\n" not in str(info.value)
    # MP4 names ffmpeg, the one decoder for it; without ffmpeg that is the reason given.
    mp4 = tmp_path / "song.m4a"
    mp4.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(100))
    with pytest.raises(AudioDecodeError, match=r"MP4.*ffmpeg|ffmpeg.*MP4"):
        load_audio(mp4)


def test_mp3_decodes_through_libsndfile_after_an_id3_tag(tmp_path):
    path = tmp_path / "pop.00001.mp3"
    soundfile.write(path, sine(440.0, 1.0, 44100), 44100, format="MP3")
    x = load_audio(path)
    assert abs(peak_hz(x, SAMPLE_RATE) - 440.0) < 2.0
    # An ID3v2 tag before the first frame (a 4-byte TIT2 frame, in syncsafe sizes).
    frame = b"TIT2" + bytes([0, 0, 0, 5]) + b"\x00\x00\x03pop\x00"
    tagged = tmp_path / "row-2"
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, len(frame)]) + frame
    tagged.write_bytes(tag + path.read_bytes())
    np.testing.assert_array_equal(load_audio(tagged), x)


def test_decode_error_is_a_genreflow_error():
    assert issubclass(AudioDecodeError, GenreflowError)


def test_clip_samples():
    assert clip_samples(30) == 960_000
    assert clip_samples(3.0) == 96_000
    assert clip_samples(0.01) == 320
    with pytest.raises(GenreflowError):
        clip_samples(0)
    with pytest.raises(GenreflowError):
        clip_samples(-1.0)


def test_fit_length_pads_with_zeros_and_trims():
    x = np.arange(1, 6, dtype=np.float32)
    np.testing.assert_array_equal(fit_length(x, 8), [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(fit_length(x, 3), [1, 2, 3])
    np.testing.assert_array_equal(fit_length(x, 5), x)
    assert fit_length(x, 8).dtype == np.float32
    with pytest.raises(ValueError):
        fit_length(x, 0)


def test_load_clip_pads_a_short_file_and_trims_a_long_one(tmp_path):
    short, long = tmp_path / "a.au", tmp_path / "b.au"
    write_au(short, sine(440.0, 1.0, 22050))
    write_au(long, sine(440.0, 4.0, 22050))
    n = clip_samples(3.0)
    padded = load_clip(short, n)
    assert len(padded) == n
    assert not padded[SAMPLE_RATE:].any()
    assert np.abs(padded[: SAMPLE_RATE - 100]).max() > 0.4
    trimmed = load_clip(long, n)
    np.testing.assert_array_equal(trimmed, load_audio(long)[:n])


@pytest.mark.parametrize(
    ("seconds", "rows"),
    [(0.4, 1), (2.0, 1), (2.5, 1), (3.2, 2), (4.9, 2), (5.0, 3), (6.0, 3)],
)
def test_load_segments_cuts_consecutive_clips(tmp_path, seconds, rows):
    # 2 s clips: a tail of 1 s or more becomes a padded clip, a shorter tail is dropped,
    # and a file shorter than one clip is still one (padded) segment.
    path = tmp_path / "classical.00000.au"
    rng = np.random.default_rng(0)
    write_au(path, rng.uniform(-0.5, 0.5, int(seconds * 22050)).astype(np.float32))
    x = load_audio(path)
    n = clip_samples(2.0)
    segments = load_segments(path, n)
    assert segments.shape == (rows, n) and segments.dtype == np.float32
    flat = segments.reshape(-1)
    used = min(len(x), flat.size)
    np.testing.assert_array_equal(flat[:used], x[:used])
    assert not flat[used:].any()


def test_int16_round_trip_follows_the_seed():
    x = np.array([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0], dtype=np.float32)
    stored = float32_to_int16(x)
    assert stored.dtype == np.int16
    # Clipped to [-1, 1], times 32767, truncated toward zero.
    np.testing.assert_array_equal(stored, [-32767, -32767, -16383, 0, 8191, 32767, 32767])
    back = int16_to_float32(stored)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, np.clip(x, -1, 1), atol=1 / 32767)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000, 192000])
def test_a_clip_decodes_only_its_frames_and_equals_the_full_decode(tmp_path, rate):
    path = tmp_path / "noise.wav"
    rng = np.random.default_rng(rate)
    soundfile.write(path, rng.uniform(-0.5, 0.5, (5 * rate, 2)).astype(np.float32), rate)
    n = clip_samples(2.0)
    np.testing.assert_array_equal(load_clip(path, n), load_audio(path)[:n])
    np.testing.assert_array_equal(load_audio(path, max_samples=n), load_audio(path)[:n])


def _silent_flac(path, seconds: int, rate: int = 48000) -> None:
    """A FLAC of silence: a few kB on disk that decodes to `seconds` of audio."""
    with soundfile.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(60 * rate, dtype=np.int16)
        for _ in range(seconds // 60):
            f.write(block)


def test_a_small_file_that_decodes_to_gigabytes_is_bounded(tmp_path, monkeypatch):
    import tracemalloc

    path = tmp_path / "bomb.flac"
    _silent_flac(path, seconds=600)  # 10 min: 115 MB as float32 at 48 kHz
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        clip = load_clip(path, clip_samples(2.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert clip.shape == (clip_samples(2.0),) and not clip.any()
    assert peak < 5_000_000  # a few seconds of audio, not ten minutes of it

    # Decoding a whole file (predict, embed) is capped, with the setting named.
    monkeypatch.setenv("GENREFLOW_MAX_AUDIO_SECONDS", "300")
    with pytest.raises(
        AudioDecodeError, match=r"bomb\.flac: longer than 300 s.*GENREFLOW_MAX_AUDIO_SECONDS"
    ):
        load_segments(path, clip_samples(2.0))
    monkeypatch.setenv("GENREFLOW_MAX_AUDIO_SECONDS", "601")
    assert load_segments(path, clip_samples(30.0)).shape == (20, clip_samples(30.0))
    monkeypatch.setenv("GENREFLOW_MAX_AUDIO_SECONDS", "lots")
    with pytest.raises(GenreflowError, match="GENREFLOW_MAX_AUDIO_SECONDS='lots'"):
        load_segments(path, clip_samples(2.0))


def _peak_bytes(fn) -> tuple[object, int]:
    """fn()'s result (or the exception it raised) and the most memory it had allocated
    at once (tracemalloc: Python's and numpy's allocations, touched or not)."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result = fn()
        except Exception as exc:  # returned, for the caller to check
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _refused(path, **kwargs) -> AudioDecodeError:
    """The AudioDecodeError load_audio raises for `path`, and that it took little memory."""
    result, peak = _peak_bytes(lambda: load_audio(path, **kwargs))
    assert isinstance(result, AudioDecodeError), f"decoded, not refused: {result!r}"
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse it"
    assert "\n" not in str(result) and str(path) in str(result)
    return result


def test_a_1_hz_wav_is_refused_by_its_sample_rate(tmp_path):
    # 7,244 bytes: an hour at 1 Hz, which was 120 clips of 30 s (915 MiB served).
    path = tmp_path / "row-0"
    path.write_bytes(one_hz_wav())
    assert path.stat().st_size == 7244
    error = _refused(path)
    assert error.reason == (
        "sample rate 1 Hz, under the lowest allowed, 4000 Hz (set GENREFLOW_MIN_SAMPLE_RATE "
        "to lower it)"
    )
    assert error.limit == "GENREFLOW_MIN_SAMPLE_RATE"


def test_a_wav_at_2_31_hz_is_refused_by_its_sample_rate(tmp_path):
    # Resampled to 32 kHz its 100 samples were none at all, and the server's 400 a trace.
    path = tmp_path / "row-0"
    path.write_bytes(huge_rate_wav())
    error = _refused(path)
    assert error.reason.startswith("sample rate 2147483647 Hz, over the limit of 384000 Hz")
    assert "GENREFLOW_MAX_SAMPLE_RATE" in error.reason


def test_audio_that_resamples_to_no_samples_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "row-0"
    monkeypatch.setenv("GENREFLOW_MAX_SAMPLE_RATE", str(2**31 - 1))
    path.write_bytes(huge_rate_wav())
    error = _refused(path)
    assert error.reason == "no samples at 32000 Hz (100 frame(s) at 2147483647 Hz)"


def test_a_small_flac_of_8_channels_at_192_khz_is_refused_by_its_decoded_bytes(
    tmp_path, monkeypatch
):
    # 93 KB that decode to 60 s x 8 channels x 192 kHz x 4 bytes = 352 MiB (564 MiB served).
    path = tmp_path / "row-0"
    path.write_bytes(silent_flac(60, 192000, 8))
    assert path.stat().st_size < 100_000
    error = _refused(path)
    assert error.limit == "GENREFLOW_MAX_DECODED_BYTES"
    assert error.reason.startswith("8 channel(s) at 192000 Hz, more than 43.7 s of it, over")
    assert "(set GENREFLOW_MAX_DECODED_BYTES to raise it)" in error.reason
    # Allowed, it decodes block by block: the memory it takes is its 32 kHz mono output
    # (7.7 MB), not the 352 MiB of its frames.
    monkeypatch.setenv("GENREFLOW_MAX_DECODED_BYTES", str(400 << 20))
    audio, peak = _peak_bytes(lambda: load_audio(path))
    assert audio.shape == (60 * SAMPLE_RATE,) and not audio.any()
    assert peak < 32 << 20


def test_a_flac_header_claiming_2_36_frames_allocates_nothing_for_them(tmp_path):
    # 119 bytes claiming 2^36 - 1 frames of 8 channels: decoding asked for 5 GiB up front.
    path = tmp_path / "row-0"
    path.write_bytes(flac_claiming(2**36 - 1))
    error = _refused(path)
    assert "truncated" in error.reason or "corrupt" in error.reason


def test_the_block_by_block_decode_equals_the_whole_file_resampled(tmp_path):
    # 30 s of stereo 44.1 kHz float is three blocks: the same samples as one decode and
    # one resampling of the whole file, bit for bit.
    import soxr

    path = tmp_path / "noise.wav"
    rng = np.random.default_rng(3)
    soundfile.write(path, rng.uniform(-0.5, 0.5, (30 * 44100, 2)).astype(np.float32), 44100)
    whole = soundfile.read(path, dtype="float32")[0].mean(axis=1, dtype=np.float32)
    expected = soxr.resample(whole, 44100, SAMPLE_RATE, quality="HQ")
    np.testing.assert_array_equal(load_audio(path), expected)


def test_running_out_of_memory_while_decoding_is_the_files_decode_error(tmp_path):
    # In a process whose address space ends 200 MB past what it uses, a file whose 32 kHz
    # output is 307 MB: numpy's MemoryError becomes the file's AudioDecodeError.
    import subprocess
    import sys

    path = tmp_path / "long.flac"
    path.write_bytes(silent_flac(2400, SAMPLE_RATE, 1))
    script = f"""
import resource
from genreflow.audio import AudioDecodeError, load_audio
status = open("/proc/self/status").read()
used = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + (200 << 20),) * 2)
try:
    load_audio({str(path)!r})
except AudioDecodeError as exc:
    print("refused:", exc)
"""
    env = {**__import__("os").environ, "GENREFLOW_MAX_DECODED_BYTES": str(1 << 30)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"refused: {path}: too large to decode in the memory available\n"
