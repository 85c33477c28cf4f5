"""Synthetic demo sources for the `music_image` dataset (no download needed).

`write_demo_sources` writes real wav/png files in the `folders` layout whose content depends on the
label (audio: pitch, band of noise and pulse rate; images: hue and a smooth light-to-dark layout),
so a model can actually learn the label from audio and images.
`build_demo_dataset` builds them with the `demo` config (4 s clips, 32×32 PNG images).
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Optional

import numpy as np

from mtok_jax.constants import SAMPLE_RATE
from mtok_jax.data.music_image import DEMO_CONFIG, build
from mtok_jax.data.sources import DEFAULT_LABELS, SPLITS, split_counts

DEFAULT_AUDIO_PER_LABEL = {"train": 8, "validation": 2, "test": 2}
DEFAULT_IMAGES_PER_LABEL = {"train": 3, "validation": 1, "test": 1}
DEMO_IMAGE_SIDE = 48  # written size (≥ the builder's minimum side); stored at 32×32
_DONE = ".demo_sources_complete"


def _total_for(per_label: dict) -> int:
    """Files per label whose derived split sizes (`split_counts`) are exactly `per_label`."""
    n = sum(int(per_label.get(s, 0)) for s in SPLITS)
    if split_counts(n) != {s: int(per_label.get(s, 0)) for s in SPLITS}:
        raise ValueError(f"per-label counts {per_label} are not what the id-derived split gives for {n} "
                         f"files ({split_counts(n)}); e.g. use train/validation/test = 8/2/2 or 3/1/1")
    return n


def _band_noise(rng: np.random.Generator, n: int, sample_rate: int, low: float, high: float) -> np.ndarray:
    """White noise keeping only the [low, high] Hz band, unit peak."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sample_rate)
    x = np.fft.irfft(spec * ((f >= low) & (f <= high)), n)
    return x / (np.abs(x).max() + 1e-9)


def demo_audio(label: int, rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 [seconds·sample_rate] label-dependent clip, peak 0.8: a pulsing tone (pitch by label,
    18 labels over 5 octaves from 200 Hz; pulse rate by label % 5) over noise in a third-octave band
    around that pitch, so every label sits in its own part of the spectrum."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    f0 = 200.0 * 2.0 ** (label * 5.0 / (len(DEFAULT_LABELS) - 1) + rng.uniform(-1, 1) / 24.0)
    tone = sum((0.6 / k) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
               for k in (1, 2) if k * f0 < 0.45 * sample_rate)
    rate = 1.0 + label % 5  # pulses per second
    env = 0.5 + 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    x = tone * env + 0.5 * _band_noise(rng, n, sample_rate, f0 / 2 ** (1 / 6), f0 * 2 ** (1 / 6))
    return (0.8 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def demo_image(label: int, rng: np.random.Generator, side: int = DEMO_IMAGE_SIDE) -> np.ndarray:
    """uint8 [side, side, 3] label-dependent picture: hue by label, a smooth light-to-dark layout by
    label % 3 (top→bottom, left→right, bright centre) with a random offset, and a little pixel noise.

    The layouts vary over the whole image (no fine stripes), so the demo VAE's 4×4 latents
    (SD's downsampling factor 8) can carry them.
    """
    base = np.array(colorsys.hsv_to_rgb(label / len(DEFAULT_LABELS), 0.75, 0.9))
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side
    dy, dx = rng.uniform(-0.15, 0.15, 2)
    kind = label % 3
    if kind == 0:
        pattern = np.cos(np.pi * np.clip(yy + dy, 0, 1))
    elif kind == 1:
        pattern = np.cos(np.pi * np.clip(xx + dx, 0, 1))
    else:
        pattern = 1.0 - 8.0 * ((yy - 0.5 - dy) ** 2 + (xx - 0.5 - dx) ** 2)
    img = base[None, None, :] * (0.65 + 0.35 * pattern[..., None]) + 0.04 * rng.standard_normal((side, side, 3))
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def write_demo_sources(manual_dir, per_label: Optional[dict] = None, clip_seconds: float = 4.0, seed: int = 0,
                       images_per_label: Optional[dict] = None, labels=DEFAULT_LABELS) -> Path:
    """Write audio/<label>/*.wav and image/<label>/*.png under manual_dir; returns manual_dir.

    per_label / images_per_label: files per label and split (default 8/2/2 audio incl. the held-out
    test audio, 3/1/1 images); the split of each file is derived from its id by the builder, so the
    counts must be ones the 80/10/10 rule produces (`sources.split_counts`).
    """
    import soundfile as sf
    from PIL import Image

    manual = Path(manual_dir)
    n_audio = _total_for(per_label or DEFAULT_AUDIO_PER_LABEL)
    n_image = _total_for(images_per_label or DEFAULT_IMAGES_PER_LABEL)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(labels):
        (manual / "audio" / name).mkdir(parents=True, exist_ok=True)
        (manual / "image" / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_audio):
            sf.write(manual / "audio" / name / f"clip{i:03d}.wav", demo_audio(label, rng, clip_seconds),
                     SAMPLE_RATE, subtype="PCM_16")
        for i in range(n_image):
            Image.fromarray(demo_image(label, rng)).save(manual / "image" / name / f"art{i:03d}.png")
    (manual / _DONE).write_text("ok\n")
    return manual


def build_demo_dataset(root="demo_assets", *, seed: int = 0, workers: int = 0, progress: bool = False) -> Path:
    """Write ROOT/manual (unless already complete) and build ROOT/data with the `demo` config.

    Returns the TFDS data_dir (ROOT/data); read it with config_name='demo'.
    """
    root = Path(root)
    manual = root / "manual"
    if not (manual / _DONE).exists():
        write_demo_sources(manual, clip_seconds=DEMO_CONFIG.clip_seconds, seed=seed)
    data_dir = root / "data"
    build(manual, data_dir, DEMO_CONFIG, workers=workers, progress=progress)
    return data_dir


if __name__ == "__main__":
    import sys

    print(build_demo_dataset(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MTOK_DEMO", "demo_assets")))
