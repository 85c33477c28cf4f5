"""Kaldi-compatible log-mel filterbank in JAX (the BEATs front-end, docs/design.md §2.1).

Reproduces ``torchaudio.compliance.kaldi.fbank(w * 2**15, num_mel_bins=128, sample_frequency=16000,
frame_length=25, frame_shift=10)`` with its defaults: dither 0, snip_edges, DC removal, pre-emphasis
0.97, Povey window, FFT size rounded up to a power of two (512), power spectrum, Kaldi mel triangles
between 20 Hz and Nyquist (torchaudio keeps empty filters, e.g. filter 3 at 128 bins, which then
output log(eps)), natural log floored at float32 eps. Batched and jit-able; float32 throughout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mtok_jax.constants import SAMPLE_RATE

WAVE_SCALE = 2.0**15                 # torchaudio's kaldi.fbank expects 16-bit-scaled samples
LOG_FLOOR = float(np.finfo(np.float32).eps)
BEATS_FBANK_MEAN = 15.41663          # BEATs.extract_features defaults (all released checkpoints)
BEATS_FBANK_STD = 6.55582


def _mel(freq):
    """Kaldi mel scale: 1127 · ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + freq / 700.0)


def povey_window(length: int) -> np.ndarray:
    """Kaldi's Povey window, symmetric Hann to the power 0.85, float32 ``[length]``."""
    n = np.arange(length, dtype=np.float64)
    hann = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / (length - 1))
    return (hann.astype(np.float32) ** np.float32(0.85)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: float,
                    low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi triangular mel filters ``[num_bins, n_fft // 2 + 1]`` (float32, Nyquist column zero).

    Follows torchaudio's ``get_mel_banks``: band edges in float64 scalars, grid arithmetic in float32,
    weight = max(0, min(up_slope, down_slope)), evaluated at the FFT bins 0 .. n_fft/2 − 1.
    Empty triangles (no bin inside) stay all-zero, as torchaudio does.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"bad mel band {low_freq}..{high_freq} Hz for sample rate {sample_rate}")
    mel_low, mel_high = _mel(float(low_freq)), _mel(float(high_freq))
    delta = (mel_high - mel_low) / (num_bins + 1)
    f32 = np.float32
    b = np.arange(num_bins, dtype=f32)[:, None]
    left = f32(mel_low) + b * f32(delta)
    center = f32(mel_low) + (b + f32(1.0)) * f32(delta)
    right = f32(mel_low) + (b + f32(2.0)) * f32(delta)
    freqs = f32(sample_rate / n_fft) * np.arange(n_fft // 2, dtype=f32)
    mel = (f32(1127.0) * np.log(f32(1.0) + freqs / f32(700.0)))[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.pad(np.maximum(f32(0.0), np.minimum(up, down)).astype(f32), ((0, 0), (0, 1)))
    banks.setflags(write=False)                         # cached: shared by every caller
    return banks


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE,
               frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0) -> int:
    """Frames kept by snip_edges: 1 + (N − window) // shift (0 if the clip is shorter than a window)."""
    win = int(sample_rate * frame_length_ms * 1e-3)
    hop = int(sample_rate * frame_shift_ms * 1e-3)
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


def kaldi_fbank(waveforms: jax.Array, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                preemphasis: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0) -> jax.Array:
    """Raw Kaldi log-mel fbank of float waveforms in [−1, 1].

    Args:
      waveforms: ``[B, N]`` (or ``[N]``) float samples at ``sample_rate`` Hz, about ±1; scaled by 2¹⁵ here.
    Returns:
      ``[B, F, num_mel_bins]`` float32 natural-log mel energies, F = 1 + (N − 400) // 160 at 16 kHz.
    """
    x = jnp.asarray(waveforms, jnp.float32)
    squeeze = x.ndim == 1
    if squeeze:
        x = x[None]
    win = int(sample_rate * frame_length_ms * 1e-3)
    hop = int(sample_rate * frame_shift_ms * 1e-3)
    n_fft = 1 << (win - 1).bit_length()
    n = num_frames(x.shape[-1], sample_rate, frame_length_ms, frame_shift_ms)
    if n < 1:
        raise ValueError(f"waveform of {x.shape[-1]} samples is shorter than one {win}-sample window")
    idx = np.arange(n)[:, None] * hop + np.arange(win)[None, :]
    frames = (x * WAVE_SCALE)[:, idx]                                   # [B, F, win]
    frames = frames - jnp.mean(frames, axis=-1, keepdims=True)          # remove DC offset
    prev = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = frames - preemphasis * prev                                # y[0] = x[0] − 0.97·x[0]
    frames = frames * jnp.asarray(povey_window(win))
    spec = jnp.abs(jnp.fft.rfft(frames, n=n_fft, axis=-1)) ** 2         # [B, F, n_fft/2 + 1]
    banks = jnp.asarray(kaldi_mel_banks(num_mel_bins, n_fft, float(sample_rate), low_freq, high_freq))
    mel = jnp.einsum("bfk,mk->bfm", spec, banks, precision=jax.lax.Precision.HIGHEST)
    out = jnp.log(jnp.maximum(mel, LOG_FLOOR))
    return out[0] if squeeze else out


def beats_normalize(fbank: jax.Array, mean: float = BEATS_FBANK_MEAN, std: float = BEATS_FBANK_STD) -> jax.Array:
    """BEATs input normalisation ``(fbank − mean) / (2 · std)`` (the factor 2 is the reference's)."""
    return (fbank - mean) / (2.0 * std)
