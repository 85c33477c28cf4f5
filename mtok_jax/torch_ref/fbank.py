"""Kaldi log-mel fbank in PyTorch, the same computation as :mod:`mtok_jax.audio.fbank` (docs/design.md §2.1).

``torchaudio.compliance.kaldi.fbank(w * 2**15, num_mel_bins=128, sample_frequency=16000, frame_length=25,
frame_shift=10)`` with its defaults, batched over rows (torchaudio itself takes one row at a time). The Povey
window and the mel matrix are the JAX module's float32 numpy constants, so both ports use identical tables.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtok_jax.audio.fbank import (
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    LOG_FLOOR,
    WAVE_SCALE,
    kaldi_mel_banks,
    num_frames,
    povey_window,
)
from mtok_jax.constants import SAMPLE_RATE


class KaldiFbank(nn.Module):
    """Raw Kaldi log-mel fbank of float waveforms in [−1, 1]; the Povey window and mel matrix are (non-persistent)
    buffers, so the module moves with ``.to(device)`` and ``torch.compile`` sees constants."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 128, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0, preemphasis: float = 0.97, low_freq: float = 20.0,
                 high_freq: float = 0.0):
        super().__init__()
        self.sample_rate, self.preemphasis = sample_rate, preemphasis
        self.frame_length_ms, self.frame_shift_ms = frame_length_ms, frame_shift_ms
        self.win = int(sample_rate * frame_length_ms * 1e-3)
        self.hop = int(sample_rate * frame_shift_ms * 1e-3)
        self.n_fft = 1 << (self.win - 1).bit_length()
        banks = kaldi_mel_banks(num_mel_bins, self.n_fft, float(sample_rate), low_freq, high_freq)
        self.register_buffer("window", torch.from_numpy(povey_window(self.win)), persistent=False)
        self.register_buffer("mel_banks", torch.from_numpy(banks.T.copy()), persistent=False)   # [n_fft/2 + 1, M]

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``waveforms`` [B, N] (or [N]) float at ``sample_rate`` Hz, about ±1 (scaled by 2¹⁵ here) →
        ``[B, F, num_mel_bins]`` float32 natural-log mel energies, F = 1 + (N − 400) // 160 at 16 kHz."""
        x = waveforms.to(torch.float32)
        squeeze = x.dim() == 1
        if squeeze:
            x = x[None]
        if num_frames(x.shape[-1], self.sample_rate, self.frame_length_ms, self.frame_shift_ms) < 1:
            raise ValueError(f"waveform of {x.shape[-1]} samples is shorter than one {self.win}-sample window")
        frames = (x * WAVE_SCALE).unfold(-1, self.win, self.hop)            # [B, F, win], tail dropped
        frames = frames - frames.mean(dim=-1, keepdim=True)                  # remove DC offset
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - self.preemphasis * previous) * self.window        # y[0] = x[0] − 0.97·x[0]
        power = torch.fft.rfft(frames, n=self.n_fft, dim=-1).abs() ** 2     # [B, F, n_fft/2 + 1]
        out = torch.log(torch.clamp(power @ self.mel_banks, min=LOG_FLOOR))
        return out[0] if squeeze else out


def kaldi_fbank(waveforms: torch.Tensor, **options: Any) -> torch.Tensor:
    """``KaldiFbank(**options)(waveforms)``: ``[B, N]`` (or ``[N]``) → ``[B, F, 128]`` raw log-mel fbank (eager use)."""
    return KaldiFbank(**options).to(waveforms.device)(waveforms)


def beats_normalize(fbank: torch.Tensor, mean: float = BEATS_FBANK_MEAN, std: float = BEATS_FBANK_STD) -> torch.Tensor:
    """BEATs input normalisation ``(fbank − mean) / (2 · std)`` (the factor 2 is the reference's)."""
    return (fbank - mean) / (2.0 * std)


def beats_fbank(waveforms: torch.Tensor) -> torch.Tensor:
    """What ``BEATs.preprocess`` returns: waveforms ``[B, N]`` 16 kHz → normalised fbank ``[B, F, 128]`` float32."""
    return beats_normalize(kaldi_fbank(waveforms))
