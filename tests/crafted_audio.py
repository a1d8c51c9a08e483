"""Audio files crafted byte by byte, as someone who wants a decoder to misbehave writes them
(issue 26): headers that lie, rates no recording has, silence that decodes to gigabytes."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile


def wav_header(rate: int, channels: int, data_bytes: int, bits: int = 16) -> bytes:
    """A canonical 44-byte PCM WAV header announcing `data_bytes` of samples."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    riff_size = 4 + (8 + len(fmt)) + (8 + data_bytes)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def wav(samples: np.ndarray, rate: int) -> bytes:
    """16-bit mono PCM WAV bytes of `samples` (int16 values) at any `rate` the header holds."""
    data = np.asarray(samples, dtype="<i2").tobytes()
    return wav_header(rate, 1, len(data)) + data


def one_hz_wav() -> bytes:
    """7,244 bytes that say: an hour of audio at 1 Hz (3600 samples), which resampled to
    32 kHz is 115 million samples, 120 clips of 30 s."""
    rng = np.random.default_rng(0)
    return wav(rng.integers(-1000, 1000, 3600), 1)


def huge_rate_wav() -> bytes:
    """100 samples at 2^31 - 1 Hz: resampled to 32 kHz they are no samples at all."""
    return wav(np.arange(100) * 100, 2**31 - 1)


def truncated_wav() -> bytes:
    """A WAV whose header announces a second of 22.05 kHz audio; the file holds a tenth."""
    samples = (3000 * np.sin(np.arange(2205) / 5)).astype(np.int16)
    return wav_header(22050, 1, 44100) + samples.tobytes()


def silent_flac(seconds: float, rate: int, channels: int) -> bytes:
    """A real FLAC of silence: a few kB per minute, whatever it decodes to."""
    buffer = io.BytesIO()
    with soundfile.SoundFile(buffer, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        frames = int(round(seconds * rate))
        block = np.zeros((min(frames, rate), channels), dtype=np.int16)
        for start in range(0, frames, len(block)):
            f.write(block[: frames - start])
    return buffer.getvalue()


def flac_claiming(frames: int, rate: int = 96000, channels: int = 8) -> bytes:
    """119 bytes of FLAC (64 frames of silence) whose STREAMINFO claims `frames` frames
    (at most 2^36 - 1, the field's 36 bits)."""
    data = bytearray(silent_flac(64 / rate, rate, channels))
    # fLaC, then STREAMINFO first: a 4-byte block header, 10 bytes of block and frame
    # sizes, then 64 bits of rate (20), channels (3), bits (5) and total frames (36).
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0
    (packed,) = struct.unpack(">Q", data[18:26])
    data[18:26] = struct.pack(">Q", (packed & ~((1 << 36) - 1)) | frames)
    data[26:42] = bytes(16)  # the MD5 of the audio: 0, "unknown"
    return bytes(data)
