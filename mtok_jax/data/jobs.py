"""Per-file build work, in a module light enough for spawned worker processes (no TFDS import)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from mtok_jax.audio.io import AudioDecodeError, load_audio, to_pcm16
from mtok_jax.data.images import ImageDecodeError, encode_image, load_image


def image_job(job: tuple) -> Optional[str]:
    """Decode/resize/encode one image into its cache file; returns None or the skip reason.

    job = (source path, cache path, height, width, centre crop, 'jpeg'|'png'). The cache file (or
    '<cache>.err' holding the reason) is written to a temp name and renamed, so an interrupted
    build never leaves a partial entry.
    """
    src, cache, h, w, crop, fmt = job
    try:
        data, target = encode_image(load_image(src, h, w, crop=crop), fmt), cache
        reason = None
    except ImageDecodeError as e:
        data, target, reason = e.reason.encode("utf-8"), f"{cache}.err", e.reason
    tmp = f"{target}.tmp{os.getpid()}"
    Path(tmp).write_bytes(data)
    os.replace(tmp, target)
    return reason


def audio_job(job: tuple):
    """job = (path, sample_rate, clip_seconds, stereo, silence_dbfs) → (int16 PCM [clip samples], None) or
    (None, reason)."""
    src, sample_rate, clip_seconds, stereo, silence_dbfs = job
    try:
        pcm = load_audio(src, sample_rate=sample_rate, clip_seconds=clip_seconds, stereo=stereo,
                         silence_dbfs=silence_dbfs)
        return to_pcm16(pcm), None
    except AudioDecodeError as e:
        return None, e.reason
