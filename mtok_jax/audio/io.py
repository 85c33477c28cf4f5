"""Host-side audio decoding: any file soundfile (or, if installed, librosa) reads → mono float32 clip.

`load_audio` is the one decoder used by the dataset builder and by sampling on user files:
decode (libsndfile: wav/flac/ogg/mp3/aiff/...; librosa/audioread only as a fallback when installed),
mix to mono (`stereo="mean"` averages the channels as librosa does; `"first"` keeps channel 0 as the
reference's `wav[0]`), resample with soxr "HQ" (the resampler `librosa.load` uses; bit-identical
to `librosa.load(path, sr=16000, mono=True)`), keep the first `clip_seconds`, repeat-pad short clips.
Bad input raises `AudioDecodeError` whose message starts with the file path.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from mtok_jax.constants import SAMPLE_RATE

STEREO_MODES = ("first", "mean")  # multi-channel → mono: channel 0 (the reference) | channel average (librosa)

# A clip whose RMS level is at or below this counts as silence (dBFS: 20·log10(RMS), 1.0 = full scale,
# so a full-scale sine is −3 dBFS). −60 dBFS catches digital zeros and codec/dither noise floors
# (a "silent" mp3 track measures ≈ −78 dBFS) while quiet music (≈ −40 to −20 dBFS) passes.
SILENCE_DBFS = -60.0


class AudioDecodeError(ValueError):
    """A file that cannot be turned into a usable clip; `str(err)` is '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _read_soundfile(path: str, max_frames: int, start_frame: int = 0) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(path) as f:
        if start_frame:
            f.seek(min(start_frame, f.frames))
        x = f.read(frames=max_frames if max_frames > 0 else -1, dtype="float32", always_2d=True)
        return x, int(f.samplerate)


def _read_librosa(path: str, max_seconds: float, start_seconds: float = 0.0) -> tuple[np.ndarray, int]:
    import librosa  # optional extra; only reached when soundfile cannot open the file

    x, sr = librosa.load(path, sr=None, mono=False, offset=start_seconds, duration=max_seconds or None)
    x = np.asarray(x, np.float32)
    return (x[:, None] if x.ndim == 1 else x.T), int(sr)


def decode_audio(path, max_seconds: Optional[float] = None, start_seconds: float = 0.0) -> tuple[np.ndarray, int]:
    """Decode a file to (float32 [frames, channels], native sample rate): at most `max_seconds` from
    `start_seconds` on (a start at or past the end is an error naming the track's length)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise AudioDecodeError(path, f"cannot stat file ({e.strerror})") from None
    if size == 0:
        raise AudioDecodeError(path, "empty file (0 bytes)")
    try:
        import soundfile as sf

        info = sf.info(path)
        sr = int(info.samplerate)
        if start_seconds and info.frames > 0 and start_seconds * sr >= info.frames:
            raise AudioDecodeError(path, f"start {start_seconds:g} s is past the end of the track "
                                         f"({info.frames / sr:.2f} s)")
        x, sr = _read_soundfile(path, int(math.ceil(max_seconds * sr)) if max_seconds else 0,
                                int(round(start_seconds * sr)))
    except AudioDecodeError:
        raise
    except Exception as sf_err:  # noqa: BLE001 - libsndfile raises several types
        try:
            import librosa  # noqa: F401
        except ImportError:
            raise AudioDecodeError(path, f"unreadable audio ({type(sf_err).__name__}: {sf_err})") from None
        try:
            x, sr = _read_librosa(path, max_seconds or 0.0, start_seconds)
        except Exception as lr_err:  # noqa: BLE001
            raise AudioDecodeError(
                path, f"unreadable audio (soundfile: {sf_err}; librosa: {lr_err})") from None
    if x.shape[0] == 0:
        raise AudioDecodeError(path, "no audio frames (empty or truncated file)")
    if not np.all(np.isfinite(x)):
        raise AudioDecodeError(path, "audio contains NaN or Inf samples")
    return x, sr


def to_mono(x: np.ndarray, stereo: str = "mean") -> np.ndarray:
    """float32 [frames, channels] → [frames]: channel 0 (`"first"`, the reference's `wav[0]`) or the
    channel mean (`"mean"`, librosa's mono)."""
    if stereo not in STEREO_MODES:
        raise ValueError(f"stereo must be one of {STEREO_MODES}, got {stereo!r}")
    if x.shape[1] == 1 or stereo == "first":
        return x[:, 0]
    return x.mean(axis=1, dtype=np.float32)


def duration_seconds(path) -> float:
    """Length of an audio file in seconds (header only where libsndfile reads it, else a full decode)."""
    try:
        import soundfile as sf

        info = sf.info(os.fspath(path))
        if info.frames > 0:
            return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - decode_audio gives the proper error below
        pass
    x, sr = decode_audio(path)
    return x.shape[0] / sr


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """soxr HQ resampling of float32 [frames] (what librosa.load uses by default)."""
    if sr_in == sr_out:
        return np.ascontiguousarray(x, np.float32)
    import soxr

    return soxr.resample(np.ascontiguousarray(x, np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level of float samples (any shape, full scale 1.0) in dBFS; −inf for all zeros."""
    ms = float(np.mean(np.square(x, dtype=np.float64)))
    return 10.0 * math.log10(ms) if ms > 0 else -math.inf


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """First `n` samples of `x`; a shorter `x` is tiled (repeat-padded) up to `n`."""
    if x.shape[0] >= n:
        return x[:n]
    reps = int(math.ceil(n / x.shape[0]))
    return np.tile(x, reps)[:n]


def load_audio(
    path,
    sample_rate: int = SAMPLE_RATE,
    clip_seconds: float = 30.0,
    *,
    start_seconds: float = 0.0,
    min_seconds: float = 1.0,
    silence_dbfs: Optional[float] = SILENCE_DBFS,
    stereo: str = "mean",
) -> np.ndarray:
    """Decode `path` to a mono float32 clip of exactly round(clip_seconds · sample_rate) samples.

    Channels are mixed per `stereo` (:func:`to_mono`); the source is resampled (soxr HQ) to `sample_rate`; the first
    `clip_seconds` from `start_seconds` on are kept and a shorter clip is repeat-padded. Samples are clipped to [-1, 1].
    Raises `AudioDecodeError` ('<path>: <reason>') for empty, unreadable, non-finite, shorter than
    `min_seconds`, or silent input: RMS level (`rms_dbfs`) of the decoded mono part ≤ `silence_dbfs`
    (None: keep silent clips).
    """
    n_out = int(round(clip_seconds * sample_rate))
    # Decode slightly more than needed so the resampler's filter sees real signal at the clip end.
    x, sr = decode_audio(path, max_seconds=clip_seconds + 0.25, start_seconds=start_seconds)
    duration = x.shape[0] / sr
    if duration < min_seconds:
        raise AudioDecodeError(path, f"too short ({duration:.2f} s < {min_seconds:g} s)")
    mono = to_mono(x, stereo)
    if silence_dbfs is not None:
        level = rms_dbfs(mono)
        if level <= silence_dbfs:
            raise AudioDecodeError(path, f"silence (RMS {level:.1f} dBFS ≤ {silence_dbfs:g} dBFS)")
    y = resample(mono, sr, sample_rate)
    n_src = int(round(min(duration, clip_seconds) * sample_rate))
    y = y[: max(1, min(n_src, y.shape[0]))]
    return np.clip(fit_length(y, n_out), -1.0, 1.0).astype(np.float32, copy=False)


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] → int16 PCM (round to nearest, saturating)."""
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def from_pcm16(x: np.ndarray) -> np.ndarray:
    """int16 PCM → float32 in [-1, 1)."""
    return np.asarray(x, np.int16).astype(np.float32) * np.float32(1.0 / 32768.0)
