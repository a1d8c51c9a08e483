"""Audio as Cnn14 expects it: 32 kHz mono, fixed-length clips (its log-mel: genreflow.logmel).

The rate matches the published PANNs checkpoints (audioset_tagging_cnn, Cnn14 at 32 kHz);
change it and the pretrained weights no longer fit the features.

A file is decoded by the decoder its first bytes name, and by no other: libsndfile
(through soundfile) for WAV, RF64, W64, AIFF, AU, FLAC, Ogg, CAF and MP3; ffmpeg (through
audioread), where installed, for MP4/M4A. Channels are averaged to mono and the rate is
converted with soxr at HQ quality, the resampler librosa uses by default, so clips match
what the seed's `librosa.load(path, sr=32000)` gives. What a decode may cost is capped
(genreflow.limits): the input is untrusted, and a few kilobytes can claim hours of audio.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile
import soxr

from genreflow.errors import GenreflowError
from genreflow.limits import limit, over

SAMPLE_RATE = 32000
CLIP_SECONDS = 30.0

# cut_clips drops a trailing remainder shorter than this: a fraction of a second of
# fade-out padded to a whole clip would add a near-silent segment that skews averages.
MIN_TAIL_SECONDS = 1.0

# Frames decoded at a time are at most this many bytes as float32: a decode holds one block
# at the file's own rate and channels, never the whole file.
BLOCK_BYTES = 4 << 20

# libsndfile logs "data : 88200 (should be 36)" when the header promises more audio than
# the file holds; it then quietly reads what is there.
_SHORT_DATA = re.compile(r"^\s*data(?: size)?\s*:\s*(\d+)\s*\(should be (\d+)\)", re.I | re.M)

# The formats decoded, each named by its first bytes (see _format_of), and what libsndfile
# calls each once it has opened the file: anything else it reads is refused.
_SOUNDFILE_FORMATS = {
    "WAV": {"WAV", "WAVEX"},
    "RF64": {"RF64"},
    "W64": {"W64"},
    "AIFF": {"AIFF"},
    "AU": {"AU"},
    "FLAC": {"FLAC"},
    "OGG": {"OGG"},
    "CAF": {"CAF"},
    "MP3": {"MP3"},
}
# Decoded by ffmpeg (through audioread), where installed: libsndfile has no AAC or ALAC.
_FFMPEG_FORMATS = {"MP4"}
KNOWN_FORMATS = "WAV, RF64, W64, AIFF, AU, FLAC, Ogg, CAF, MP3 or MP4"
_W64_GUID = b"riff\x2e\x91\xcf\x11"


class AudioDecodeError(GenreflowError):
    """A file that cannot be decoded to audio; `reason` says why without the path, and
    `limit` names the cap (genreflow.limits) that refused it, if one did."""

    def __init__(self, path: str | Path, reason: str, *, limit: str | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.limit = limit


def clip_samples(seconds: float) -> int:
    """Samples in a clip of `seconds` at SAMPLE_RATE (30 s -> 960000)."""
    if not seconds > 0:
        raise GenreflowError(f"clip length must be a positive number of seconds, got {seconds}")
    return int(round(seconds * SAMPLE_RATE))


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    *,
    max_samples: int | None = None,
    request_seconds_left: float | None = None,
) -> np.ndarray:
    """Decode a file to float32 mono at `sample_rate`: full length, or its first
    `max_samples` samples.

    The decoder is the one the file's first bytes name (libsndfile, or ffmpeg for MP4), and
    no other is tried. It decodes block by block, mixing each to mono and resampling it as
    it goes, so what a decode holds is its output, whatever the header claims. A file is
    refused once it decodes to more than GENREFLOW_MAX_DECODED_BYTES (frames x channels x
    4), or when its sample rate is outside GENREFLOW_MIN_SAMPLE_RATE..MAX_SAMPLE_RATE.

    With `max_samples`, only the frames those samples need are decoded, and the samples are
    exactly the first `max_samples` of the full decode. Without it, a file longer than
    GENREFLOW_MAX_AUDIO_SECONDS is refused, or longer than `request_seconds_left`, what is
    left of a served request's GENREFLOW_MAX_REQUEST_SECONDS.

    Raises:
        AudioDecodeError: the file is empty, truncated, not audio, of an unknown format,
            over a limit, holds no samples or non-finite ones, or does not fit in memory.
    """
    path = Path(path)
    audio_format = _format_of(path)
    try:
        with _open(path, audio_format) as source:
            return _decode(path, source, sample_rate, max_samples, request_seconds_left)
    except MemoryError:
        raise AudioDecodeError(path, "too large to decode in the memory available") from None


def _format_of(path: Path) -> str:
    """The format a file's first bytes name (after an ID3v2 tag, which MP3s carry)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            offset = _id3_size(head)
            if offset:
                f.seek(offset)
                head = f.read(12)
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot read: {exc.strerror or exc}") from None
    if size == 0:
        raise AudioDecodeError(path, "empty file (0 bytes)")
    found = _format_named_by(head)
    if found is None and offset:
        found = "MP3"  # an ID3v2 tag introduces an MP3 stream, possibly after padding
    if found is None:
        raise AudioDecodeError(
            path,
            "unknown or unreadable format: not a recognised audio format (no "
            f"{KNOWN_FORMATS} header at its start)",
        )
    return found


def _id3_size(head: bytes) -> int:
    """Bytes of the ID3v2 tag that `head` opens, 0 if none: a 10-byte header, a size in
    four 7-bit bytes, and a 10-byte footer when flagged."""
    if len(head) < 10 or head[:3] != b"ID3" or any(b & 0x80 for b in head[6:10]):
        return 0
    size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
    return 10 + size + (10 if head[5] & 0x10 else 0)


def _format_named_by(head: bytes) -> str | None:
    if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] in (b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "RF64"
    if head[:8] == _W64_GUID:
        return "W64"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    magic = {b".snd": "AU", b"dns.": "AU", b"fLaC": "FLAC", b"OggS": "OGG", b"caff": "CAF"}
    if head[:4] in magic:
        return magic[head[:4]]
    if head[4:8] == b"ftyp":
        return "MP4"
    # An MPEG audio frame: 11 sync bits, a version that is not the reserved one, layer I-III.
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        if (head[1] >> 3) & 3 != 1 and (head[1] >> 1) & 3 != 0:
            return "MP3"
    return None


@contextlib.contextmanager
def _open(path: Path, audio_format: str) -> Iterator[_Source]:
    if audio_format in _SOUNDFILE_FORMATS and (
        audio_format != "MP3" or "MP3" in soundfile.available_formats()
    ):
        with _SoundfileSource(path, audio_format) as source:
            yield source
    else:  # MP4, or MP3 where libsndfile is older than 1.1 and has no MPEG decoder
        with _FFmpegSource(path, audio_format) as source:
            yield source


class _Source:
    """An open file: its rate, channels, the frames its header declares (None: unknown),
    and `read(n)`: up to n frames as float32 (frames, channels), none at the end."""

    rate: int
    channels: int
    frames: int | None

    def read(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class _SoundfileSource(_Source):
    def __init__(self, path: Path, audio_format: str) -> None:
        self.path = path
        try:
            self.f = soundfile.SoundFile(path)
        except (RuntimeError, OSError, ValueError) as exc:  # LibsndfileError: RuntimeError
            raise AudioDecodeError(
                path,
                f"unknown or unreadable format: not a recognised audio format (its {audio_format} "
                f"header is corrupt or truncated); libsndfile: {_libsndfile_says(exc)}",
            ) from None
        if self.f.format not in _SOUNDFILE_FORMATS[audio_format]:
            self.f.close()
            raise AudioDecodeError(
                path,
                f"its first bytes say {audio_format}, but libsndfile reads it as {self.f.format}",
            )
        short = _SHORT_DATA.search(self.f.extra_info)
        if short and int(short[2]) < int(short[1]):
            self.f.close()
            raise AudioDecodeError(
                path,
                f"truncated: the header declares {short[1]} bytes of audio, "
                f"the file holds {short[2]}",
            )
        self.rate, self.channels, self.frames = self.f.samplerate, self.f.channels, self.f.frames
        # 16-bit PCM (GTZAN's .au and .wav) is read as integers and scaled here: the very
        # floats libsndfile's own conversion gives (x / 32768, exact in float32), in less
        # time than its sample-by-sample big-endian-to-float loop (a fifth of a 30 s .au's
        # decoding).
        self.as_int16 = self.f.subtype == "PCM_16"

    def read(self, n: int) -> np.ndarray:
        try:
            data = self.f.read(n, dtype="int16" if self.as_int16 else "float32", always_2d=True)
        except (RuntimeError, OSError, ValueError, EOFError) as exc:
            raise AudioDecodeError(
                self.path,
                f"corrupt or truncated audio data; libsndfile: {_libsndfile_says(exc)}",
            ) from None
        if not self.as_int16:
            return data
        scaled = data.astype(np.float32)
        scaled *= np.float32(1 / 32768)
        return scaled

    def close(self) -> None:
        self.f.close()


class _FFmpegSource(_Source):
    """What libsndfile cannot decode, through ffmpeg (audioread's FFmpegAudioFile), which
    gives 16-bit little-endian interleaved PCM whatever the source."""

    def __init__(self, path: Path, audio_format: str) -> None:
        from audioread.exceptions import DecodeError
        from audioread.ffdec import FFmpegAudioFile, NotInstalledError

        self.path, self._errors = path, (DecodeError, OSError, EOFError, ValueError)
        try:
            self.f = FFmpegAudioFile(str(path))
        except NotInstalledError:
            raise AudioDecodeError(
                path, f"{audio_format} needs ffmpeg to decode, and it is not installed here"
            ) from None
        except self._errors as exc:
            raise AudioDecodeError(
                path, f"unreadable {audio_format}; ffmpeg: {type(exc).__name__} {exc}".rstrip()
            ) from None
        self.rate, self.channels, self.frames = int(self.f.samplerate), int(self.f.channels), None
        if self.channels < 1:
            self.f.close()
            raise AudioDecodeError(path, f"unreadable {audio_format}: no audio channels")
        self._blocks, self._pending = iter(self.f), bytearray()

    def read(self, n: int) -> np.ndarray:
        wanted = n * self.channels * 2
        try:
            while len(self._pending) < wanted:
                block = next(self._blocks, None)
                if block is None:
                    break
                self._pending += block
        except self._errors as exc:
            raise AudioDecodeError(
                self.path, f"corrupt audio data; ffmpeg: {type(exc).__name__} {exc}".rstrip()
            ) from None
        usable = min(len(self._pending), wanted) // (self.channels * 2) * self.channels * 2
        pcm = np.frombuffer(bytes(self._pending[:usable]), dtype="<i2")
        del self._pending[:usable]
        return pcm.reshape(-1, self.channels).astype(np.float32) / np.float32(32768)

    def close(self) -> None:
        self.f.close()  # ends ffmpeg: the rest of the file is never decoded


def _decode(
    path: Path,
    source: _Source,
    sample_rate: int,
    max_samples: int | None,
    request_seconds_left: float | None,
) -> np.ndarray:
    """The source mixed to mono and resampled to `sample_rate`, block by block, within
    the limits (see load_audio)."""
    rate, channels = source.rate, source.channels
    _check_rate(path, rate)
    if max_samples is None:
        seconds, cap = _seconds_allowed(request_seconds_left)
        wanted = int(seconds * rate) + 1  # one frame past the limit shows a longer file
    else:
        wanted = _frames_wanted(rate, sample_rate, max_samples)
    max_bytes = limit("GENREFLOW_MAX_DECODED_BYTES")
    # One frame past the decoded-bytes limit, and no more, is ever read.
    readable = min(wanted, max_bytes // (channels * 4) + 1)
    block_frames = max(1, BLOCK_BYTES // (channels * 4))
    resampler = (
        soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
        if rate != sample_rate
        else None
    )
    out, frames = [], 0
    while frames < readable:
        block = source.read(min(block_frames, readable - frames))
        if not len(block):
            break
        frames += len(block)
        if frames * channels * 4 > max_bytes:
            raise AudioDecodeError(
                path,
                over(
                    "GENREFLOW_MAX_DECODED_BYTES",
                    f"{channels} channel(s) at {rate} Hz, more than {frames / rate:.1f} s of it",
                ),
                limit="GENREFLOW_MAX_DECODED_BYTES",
            )
        # Averaging keeps the level of a centred source; summing would clip it.
        mono = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32)
        if not np.isfinite(mono).all():  # a NaN or infinity in any channel reaches the mean
            raise AudioDecodeError(path, "corrupt samples (NaN or infinite values)")
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        out.append(resampler.resample_chunk(mono) if resampler else mono)
    declared = min(source.frames, wanted) if source.frames is not None else 0
    if frames < declared:
        raise AudioDecodeError(
            path, f"truncated: the header declares {declared} frames, only {frames} read"
        )
    if max_samples is None and frames > seconds * rate:
        raise AudioDecodeError(path, _longer_than(seconds, cap), limit=cap)
    if frames == 0:
        raise AudioDecodeError(path, "no samples (the audio data is empty)")
    if resampler:
        out.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    audio = np.concatenate(out)
    if audio.size == 0:
        raise AudioDecodeError(
            path, f"no samples at {sample_rate} Hz ({frames} frame(s) at {rate} Hz)"
        )
    return audio if max_samples is None else audio[:max_samples]


def _check_rate(path: Path, rate: int) -> None:
    lowest, highest = limit("GENREFLOW_MIN_SAMPLE_RATE"), limit("GENREFLOW_MAX_SAMPLE_RATE")
    if rate < lowest:
        raise AudioDecodeError(
            path,
            f"sample rate {rate} Hz, under the lowest allowed, {lowest} Hz (set "
            "GENREFLOW_MIN_SAMPLE_RATE to lower it)",
            limit="GENREFLOW_MIN_SAMPLE_RATE",
        )
    if rate > highest:
        raise AudioDecodeError(
            path,
            over("GENREFLOW_MAX_SAMPLE_RATE", f"sample rate {rate} Hz"),
            limit="GENREFLOW_MAX_SAMPLE_RATE",
        )


def _seconds_allowed(request_seconds_left: float | None) -> tuple[float, str]:
    """The longest a whole file may be, and the limit that says so."""
    per_file = limit("GENREFLOW_MAX_AUDIO_SECONDS")
    if request_seconds_left is None or per_file <= request_seconds_left:
        return per_file, "GENREFLOW_MAX_AUDIO_SECONDS"
    return max(request_seconds_left, 0.0), "GENREFLOW_MAX_REQUEST_SECONDS"


def _longer_than(seconds: float, cap: str) -> str:
    if cap == "GENREFLOW_MAX_REQUEST_SECONDS":
        return over(cap, f"longer than the {seconds:g} s left of the request")
    return over(cap, f"longer than {seconds:g} s")


def _frames_wanted(rate: int, sample_rate: int, max_samples: int) -> int:
    """How many frames at `rate` the first `max_samples` output samples need."""
    # A quarter second beyond what the clip needs: soxr's filter looks ahead, and with this
    # margin its first max_samples outputs are the full decode's, bit for bit (checked at
    # 8 to 192 kHz in tests/test_audio.py).
    return -(-max_samples * rate // sample_rate) + rate // 4


def _libsndfile_says(exc: Exception) -> str:
    return (getattr(exc, "error_string", None) or str(exc)).strip()


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
    """A file cut into consecutive clips (see cut_clips), shape (n, clip_samples) float32."""
    return cut_clips(load_audio(path), clip_samples)


def cut_clips(x: np.ndarray, clip_samples: int) -> np.ndarray:
    """Decoded audio cut into consecutive clips, shape (n, clip_samples) float32.

    The last clip is zero-padded. A trailing remainder shorter than MIN_TAIL_SECONDS is
    dropped, unless the audio is shorter than one clip: then it is the only segment,
    padded, so every decodable file gives at least one row.
    """
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
