"""Audio as Cnn14 expects it: 32 kHz mono, fixed-length clips (its log-mel: genreflow.logmel).

The rate matches the published PANNs checkpoints (audioset_tagging_cnn, Cnn14 at 32 kHz);
change it and the pretrained weights no longer fit the features.

Decoding goes through soundfile (libsndfile): .au, .wav, .flac, .ogg and the other formats
it knows by their header. Only a file whose extension libsndfile does not handle natively
(.mp3 on an old libsndfile, .m4a, ...) falls back to audioread. Channels are averaged to
mono and the rate is converted with soxr at HQ quality, the resampler librosa uses by
default, so clips match what the seed's `librosa.load(path, sr=32000)` gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile
import soxr

from genreflow.errors import GenreflowError
from genreflow.limits import limit, over

SAMPLE_RATE = 32000
CLIP_SECONDS = 30.0

# load_segments drops a trailing remainder shorter than this: a fraction of a second of
# fade-out padded to a whole clip would add a near-silent segment that skews averages.
MIN_TAIL_SECONDS = 1.0

# Extensions whose formats libsndfile decodes itself: a failure there is final, trying
# another decoder would only hide the reason.
_SOUNDFILE_SUFFIXES = frozenset(
    {".wav", ".wave", ".au", ".snd", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc"}
    | {".caf", ".w64", ".rf64"}
)
# libsndfile logs "data : 88200 (should be 36)" when the header promises more audio than
# the file holds; it then quietly reads what is there.
_SHORT_DATA = re.compile(r"^\s*data(?: size)?\s*:\s*(\d+)\s*\(should be (\d+)\)", re.I | re.M)


class AudioDecodeError(GenreflowError):
    """A file that cannot be decoded to audio; `reason` says why without the path."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def clip_samples(seconds: float) -> int:
    """Samples in a clip of `seconds` at SAMPLE_RATE (30 s -> 960000)."""
    if not seconds > 0:
        raise GenreflowError(f"clip length must be a positive number of seconds, got {seconds}")
    return int(round(seconds * SAMPLE_RATE))


def load_audio(
    path: str | Path, sample_rate: int = SAMPLE_RATE, *, max_samples: int | None = None
) -> np.ndarray:
    """Decode a file to float32 mono at `sample_rate`: full length, or its first
    `max_samples` samples.

    With `max_samples`, only the frames those samples need are decoded (a small compressed
    file can decode to gigabytes), and the samples are exactly the first `max_samples` of
    the full decode. Without it, a file longer than GENREFLOW_MAX_AUDIO_SECONDS is refused.

    Raises:
        AudioDecodeError: the file is empty, truncated, not audio, of an unknown format,
            too long, holds no samples or non-finite ones.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise AudioDecodeError(path, "empty file (0 bytes)")

    def frames_wanted(rate: int) -> int:
        return _frames_wanted(rate, sample_rate, max_samples)

    try:
        frames, rate = _read_soundfile(path, frames_wanted)
    except AudioDecodeError as exc:
        if path.suffix.lower() in _SOUNDFILE_SUFFIXES:
            raise
        frames, rate = _read_audioread(path, frames_wanted, soundfile_reason=exc.reason)
    if max_samples is None:
        seconds = limit("GENREFLOW_MAX_AUDIO_SECONDS")
        if frames.shape[0] > seconds * rate:
            raise AudioDecodeError(
                path, over("GENREFLOW_MAX_AUDIO_SECONDS", f"longer than {seconds} s")
            )
    if frames.shape[0] == 0:
        raise AudioDecodeError(path, "no samples (the audio data is empty)")
    if not np.isfinite(frames).all():
        raise AudioDecodeError(path, "corrupt samples (NaN or infinite values)")
    # Averaging keeps the level of a centred source; summing would clip it.
    mono = frames[:, 0] if frames.shape[1] == 1 else frames.mean(axis=1, dtype=np.float32)
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return mono if max_samples is None else mono[:max_samples]


def _frames_wanted(rate: int, sample_rate: int, max_samples: int | None) -> int:
    """How many frames at `rate` to decode: what `max_samples` output samples need, else
    one past the longest audio allowed (so that a longer file shows itself)."""
    if max_samples is None:
        return limit("GENREFLOW_MAX_AUDIO_SECONDS") * rate + 1
    # A quarter second beyond what the clip needs: soxr's filter looks ahead, and with this
    # margin its first max_samples outputs are the full decode's, bit for bit (checked at
    # 8 to 192 kHz in tests/test_audio.py).
    return -(-max_samples * rate // sample_rate) + rate // 4


def _read_soundfile(path: Path, frames_wanted: Callable[[int], int]) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the sample rate, through libsndfile: at most
    frames_wanted(sample rate) frames."""
    try:
        f = soundfile.SoundFile(path)
    except (RuntimeError, OSError, ValueError) as exc:  # LibsndfileError is a RuntimeError
        raise AudioDecodeError(
            path,
            "not a recognised audio format (not audio, a wrong extension, or a corrupt or "
            f"truncated header); libsndfile: {_libsndfile_says(exc)}",
        ) from None
    with f:
        # libsndfile guesses a headerless .au/.snd as raw 8 kHz u-law: a text file or a
        # header cut short would decode as noise instead of failing.
        if f.format == "RAW":
            raise AudioDecodeError(
                path, "no audio header recognised (not audio, or a corrupt header)"
            )
        short = _SHORT_DATA.search(f.extra_info)
        if short and int(short[2]) < int(short[1]):
            raise AudioDecodeError(
                path,
                f"truncated: the header declares {short[1]} bytes of audio, "
                f"the file holds {short[2]}",
            )
        wanted = frames_wanted(f.samplerate)
        # What a complete file gives when read this far; fewer frames means truncated.
        declared = min(f.frames, wanted)
        # 16-bit PCM (GTZAN's .au and .wav) is read as integers and scaled here: the very
        # floats libsndfile's own conversion gives (x / 32768, exact in float32), in less
        # time than its sample-by-sample big-endian-to-float loop (a fifth of a 30 s .au's
        # decoding).
        as_int16 = f.subtype == "PCM_16"
        try:
            data = f.read(wanted, dtype="int16" if as_int16 else "float32", always_2d=True)
        except (RuntimeError, OSError, ValueError, EOFError) as exc:
            raise AudioDecodeError(
                path, f"corrupt or truncated audio data; libsndfile: {_libsndfile_says(exc)}"
            ) from None
        rate = f.samplerate
    if data.shape[0] < declared:
        raise AudioDecodeError(
            path, f"truncated: the header declares {declared} frames, only {data.shape[0]} read"
        )
    if as_int16:
        scaled = data.astype(np.float32)
        scaled *= np.float32(1 / 32768)
        return scaled, rate
    return data, rate


def _libsndfile_says(exc: Exception) -> str:
    return (getattr(exc, "error_string", None) or str(exc)).strip()


def _read_audioread(
    path: Path, frames_wanted: Callable[[int], int], soundfile_reason: str
) -> tuple[np.ndarray, int]:
    """Decode what libsndfile cannot (e.g. mp3 on old builds) through audioread: at most
    frames_wanted(sample rate) frames."""
    import audioread  # librosa's fallback decoder; needed only for such files

    try:
        with audioread.audio_open(str(path)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            wanted_bytes = frames_wanted(rate) * channels * 2
            blocks, got = [], 0
            for block in f:
                blocks.append(bytes(block))
                got += len(blocks[-1])
                if got >= wanted_bytes:
                    break  # the decoder stops with the loop; the rest is never decoded
            pcm = b"".join(blocks)[:wanted_bytes]
    except (audioread.DecodeError, OSError, EOFError, ValueError) as exc:
        raise AudioDecodeError(
            path,
            f"unknown or unreadable format: {soundfile_reason}; "
            f"audioread: {type(exc).__name__} {exc}".rstrip(),
        ) from None
    # audioread yields 16-bit little-endian interleaved PCM whatever the source.
    samples = np.frombuffer(pcm, dtype="<i2")
    samples = samples[: samples.size // channels * channels].reshape(-1, channels)
    return samples.astype(np.float32) / 32768.0, rate


def fit_length(x: np.ndarray, clip_samples: int) -> np.ndarray:
    """`x` trimmed to `clip_samples`, or padded with zeros at the end to that length."""
    if clip_samples <= 0:
        raise ValueError(f"clip_samples must be positive, got {clip_samples}")
    if len(x) >= clip_samples:
        return x[:clip_samples]
    out = np.zeros(clip_samples, dtype=x.dtype)
    out[: len(x)] = x
    return out


def load_clip(path: str | Path, clip_samples: int) -> np.ndarray:
    """One fixed-length float32 clip: the start of the file, padded or trimmed; only the
    frames the clip needs are decoded."""
    return fit_length(load_audio(path, max_samples=clip_samples), clip_samples)


def load_segments(path: str | Path, clip_samples: int) -> np.ndarray:
    """A file cut into consecutive clips, shape (n, clip_samples) float32.

    The last clip is zero-padded. A trailing remainder shorter than MIN_TAIL_SECONDS is
    dropped, unless the file is shorter than one clip: then it is the only segment,
    padded, so every decodable file gives at least one row.
    """
    x = load_audio(path)
    if clip_samples <= 0:
        raise ValueError(f"clip_samples must be positive, got {clip_samples}")
    whole, tail = divmod(len(x), clip_samples)
    if tail and (whole == 0 or tail >= MIN_TAIL_SECONDS * SAMPLE_RATE):
        whole += 1
    out = np.zeros((whole, clip_samples), dtype=np.float32)
    flat = out.reshape(-1)
    used = min(len(x), flat.size)
    flat[:used] = x[:used]
    return out


def float32_to_int16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The seed's storage form: clipped to [-1, 1], scaled by 32767, truncated to int16.

    `out`, an int16 array of x's shape, receives the result instead of a new array (a
    pack worker writes straight into shared memory that way).
    """
    scaled = np.clip(x, -1.0, 1.0)
    scaled *= 32767.0  # in place: this runs once per clip, on 960000 samples
    if out is None:
        return scaled.astype(np.int16)
    if out.dtype != np.int16 or out.shape != scaled.shape:
        raise ValueError(f"out must be int16 of shape {scaled.shape}, got {out.dtype} {out.shape}")
    # The same C cast as astype: truncation toward zero.
    np.copyto(out, scaled, casting="unsafe")
    return out


def int16_to_float32(x: np.ndarray) -> np.ndarray:
    """Back from storage: int16 / 32767 as float32."""
    return (x / 32767.0).astype(np.float32)
